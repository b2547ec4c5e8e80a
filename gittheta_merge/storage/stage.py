"""`git theta add PATHSPEC…`: stage tracked models without git streaming them through the clean filter.

Why: `git add` pipes the whole file through the filter (git reads it, writes it into a pipe, the filter reads it back)
even when a fine-tune changed two of its tensors; with every unchanged block recognised by BLAKE3
(storage/fastindex.py), that pipe is what a re-add costs. Here the tool reads the file itself with the same clean as
the filter (so the metadata blob is byte-for-byte what `git add` would store), enters the blob into the index with
git's plumbing, and writes the file's stat data into the entry (storage/gitindex.py, as after a materialization), so
git sees the file staged and unmodified. Then `git add PATHSPEC…` does the rest (small files, deletions, everything
the theta filter does not track) and skips the models, whose stat now matches.

Nothing is lost on failure: objects are written first, then the metadata blob, then one index update; a file that
changes while it is read (its stat before and after differ) is refused, never staged half-old, half-new.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gittheta_merge.errors import InputError, human_bytes
from gittheta_merge.storage.gitutil import Repo, run_git


def _changed_paths(repo: Repo, pathspecs: list[str], cwd: Path) -> list[str]:
    """Repository-relative paths under `pathspecs` that `git add` would look at: tracked files whose stat differs
    from the index (no content is read: git lists them from stat data), and untracked files that are not ignored."""
    found: list[str] = []
    for args in (["diff-files", "-z", "--name-only"], ["ls-files", "-z", "-o", "--exclude-standard", "--full-name"]):
        out = run_git(*args, "--", *pathspecs, cwd=cwd)
        found += [p.decode() for p in out.split(b"\0") if p]
    return list(dict.fromkeys(found))


def stage(repo: Repo, pathspecs: list[str], cwd: Path | None = None,
          echo: Callable[[str], Any] | None = None) -> list[str]:
    """Stage the models the theta filter tracks under `pathspecs` (read by us, not piped through git), then run
    `git add -- PATHSPEC…` for everything else; returns the models staged by us."""
    from gittheta_merge.filter.process import Filter
    from gittheta_merge.storage.materialize import (
        Written,
        index_modes,
        load_records,
        placeholder_of,
        save_records,
        settle_index,
    )

    cwd = cwd or Path.cwd()
    candidates = _changed_paths(repo, pathspecs, cwd)
    attrs = repo.check_attr("filter", candidates)
    models = []
    for path in candidates:
        file = repo.root / path
        try:
            st = os.lstat(file)
        except OSError:
            continue  # deleted: `git add` stages the removal
        if attrs.get(path) == "theta" and stat.S_ISREG(st.st_mode) and placeholder_of(file) is None:
            models.append(path)
    staged: dict[str, tuple[str, os.stat_result]] = {}
    if models:
        filt = Filter(repo)
        modes = {p: mode for (mode, _, _), p in index_modes(repo, models)}
        records = load_records(repo)
        with filt.store.guard.session():  # objects stay safe from gc until the index refers to them
            for path in models:
                blob, st = _clean_file(filt, repo, path)
                staged[path] = (blob, st)
                records[path] = Written.of(repo.root / path, st, blob)
                if echo:
                    echo(f"git-theta: staged {path} ({human_bytes(st.st_size)}) without piping it through git")
            save_records(repo, records)
            lines = "".join(f"{modes.get(p) or _mode_of(st)} {blob}\t{p}\n" for p, (blob, st) in staged.items())
            repo.git("update-index", "--add", "--index-info", input=lines.encode())
        settle_index(repo, [(p, blob, blob) for p, (blob, _) in staged.items()])
    run_git("add", "--", *pathspecs, cwd=cwd)
    return list(staged)


def _mode_of(st: os.stat_result) -> str:
    return "100755" if st.st_mode & 0o111 else "100644"


def _clean_file(filt: Any, repo: Repo, path: str) -> tuple[str, os.stat_result]:
    """The metadata blob for the file at `path`, cleaned from the file itself; refused if it changed meanwhile."""
    from gittheta_merge.formats.streams import MappedFile
    from gittheta_merge.storage.materialize import stat_key

    file = repo.root / path
    before = os.stat(file)
    out = io.BytesIO()
    with open(file, "rb") as handle, MappedFile.or_plain(handle) as stream:  # hashed in the page cache, no copy
        filt.clean(path, stream, out)
    after = os.stat(file)
    if stat_key(before) != stat_key(after):
        raise InputError(f"{path}: the file changed while it was being read (is a training run still writing it?); "
                         "nothing was staged for it: run `git theta add` again once it is complete")
    blob = repo.git("hash-object", "-w", "--no-filters", "--stdin", input=out.getvalue()).decode().strip()
    return blob, after
