"""Direct materialization: tracked files above `theta.materializeBytes` are written by us, not through git.

Why: git reads a filter's whole smudge output into memory before it writes the file, so every git command that
writes a model into the work tree needs RAM equal to the file. Above the threshold the smudge hands git a
placeholder instead (the metadata itself: cleaning it gives the same metadata, so committing a placeholder stores
the model, never a text file), and this module writes the real file straight from the object store, streaming, into
a temporary file beside it that is renamed over the placeholder: a kill or a full disk leaves the placeholder (or
the old file), never a half-written model under the real name.

It runs from git's post-checkout, post-merge and post-rewrite hooks (storage/hooks.py), after `git theta merge` and
`pull-objects`, and on demand (`git theta checkout [PATHS]`; `git theta status` lists placeholders).

After writing, what was written is recorded (size, mtime, ctime, inode, device, the metadata blob, and digests of
the first and last 64 KiB) in .git/theta/materialized.json, and the file's stat is written into git's index entry
(storage/gitindex.py), so git sees it unmodified without reading it. Where the index cannot be patched, it is
refreshed through git instead: git then streams the file through the clean filter once, which recognises it from
the record and answers with the recorded metadata while only draining the stream (no sha256 of the model). A file
changed behind our back changes its ctime (which no user tool can set), so it no longer matches and is cleaned for
real; the index is written only once the clock has left the second of that ctime, because git compares seconds, and
only for a file whose stat, taken after that wait, is still exactly the recorded one.

The threshold's rule: git holds at most that many bytes of one file in memory. The default, 512 MiB, keeps every
checkout far inside a 16 GB machine's memory whatever the model's size (the materialization itself holds one block,
theta.blockBytes), while small models, which git handles quickly, keep git's own path and need no hook.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from gittheta_merge.constants import MAX_METADATA_BYTES
from gittheta_merge.errors import human_bytes, loads_untrusted
from gittheta_merge.storage.gitutil import Repo, iter_index_blobs
from gittheta_merge.storage.metadata import Metadata, is_metadata

if TYPE_CHECKING:
    from gittheta_merge.filter.process import Filter  # imported lazily: the filter imports this module

DEFAULT_THRESHOLD = 512 << 20  # theta.materializeBytes
SAMPLE = 64 << 10  # bytes at each end of a materialized file whose digests the record keeps
TMP_PREFIX = ".theta-materialize-"


def threshold(repo: Repo) -> int:
    return repo.config_int("theta.materializeBytes", DEFAULT_THRESHOLD)


def record_path(repo: Repo) -> Path:
    return repo.git_dir / "theta" / "materialized.json"


@dataclass
class Written:
    """What we wrote for one path: enough to recognise the same file without reading it."""

    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int
    blob: str  # the metadata blob's id: clean answers with exactly these bytes
    head: str  # sha256 of the first SAMPLE bytes
    tail: str  # sha256 of the last SAMPLE bytes

    @classmethod
    def of(cls, file: Path, st: os.stat_result, blob: str) -> Written:
        """The record of `file` as it is now (`st`), holding the metadata blob `blob`."""
        head, tail = _digest_ends(file, st.st_size)
        return cls(*stat_key(st), blob, head, tail)

    def matches(self, st: os.stat_result) -> bool:
        return stat_key(st) == (self.size, self.mtime_ns, self.ctime_ns, self.ino, self.dev)


def stat_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What identifies one version of a file without reading it: size, mtime, ctime (no tool can set it), inode."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


def load_records(repo: Repo) -> dict[str, Written]:
    """The record, or {} when it is missing or unreadable (it is an optimisation: losing it costs one re-clean)."""
    try:
        raw = loads_untrusted(record_path(repo).read_bytes(), str(record_path(repo)), "materialization record")
        return {path: Written(**entry) for path, entry in raw.items()}  # type: ignore[union-attr]
    except (OSError, TypeError, AttributeError, ValueError):
        return {}
    except Exception:  # noqa: BLE001 - a corrupt record is ignored, never trusted
        return {}


def save_records(repo: Repo, records: dict[str, Written]) -> None:
    path = record_path(repo)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({p: vars(w) for p, w in sorted(records.items())}, indent=0))
    os.replace(tmp, path)


def placeholder_of(file: Path) -> Metadata | None:
    """The metadata a work-tree file holds when it is a placeholder (or a clone made before install), else None."""
    try:
        with open(file, "rb") as fh:
            head = fh.read(64)
            if not is_metadata(head):
                return None
            data = head + fh.read(MAX_METADATA_BYTES)
    except OSError:
        return None
    try:
        return Metadata.from_bytes(data, str(file))
    except Exception:  # noqa: BLE001 - not our placeholder: leave the file alone
        return None


def tracked_paths(repo: Repo, paths: list[str] | None = None) -> list[tuple[str, str]]:
    """(index blob, path) of the index entries the theta filter handles, optionally limited to `paths`."""
    entries = list(iter_index_blobs(repo, paths))
    attrs = repo.check_attr("filter", [p for _, p in entries])
    return [(blob, p) for blob, p in entries if attrs.get(p) == "theta"]


def placeholders(repo: Repo, paths: list[str] | None = None) -> list[str]:
    return [p for _, p in tracked_paths(repo, paths) if placeholder_of(repo.root / p) is not None]


def _digest_ends(file: Path, size: int) -> tuple[str, str]:
    with open(file, "rb") as fh:
        head = hashlib.sha256(fh.read(SAMPLE)).hexdigest()
        fh.seek(max(0, size - SAMPLE))
        tail = hashlib.sha256(fh.read(SAMPLE)).hexdigest()
    return head, tail


def write_file(filt: Filter, path: str, meta: Metadata, fsync: bool = False) -> os.stat_result:
    """The real file for `meta` at `path`, via a temporary file in the same directory swapped with the old one."""
    from gittheta_merge import formats
    from gittheta_merge.storage.storelock import start_time

    target = filt.repo.root / path
    filt.require_checkout_space(path, meta.total_bytes)

    fd_tmp = target.parent / f"{TMP_PREFIX}{target.name}.{os.getpid()}-{start_time(os.getpid())}"
    mode = target.stat().st_mode & 0o777 if target.exists() else 0o644
    try:
        with open(fd_tmp, "wb") as out:
            ctx, bar = filt.context(path, "checkout", meta.total_bytes, len(meta.tensors))
            try:
                formats.by_name(meta.format).smudge(meta, out, ctx)
            finally:
                bar.close()
            if fsync:
                out.flush()
                os.fsync(out.fileno())
        os.chmod(fd_tmp, mode)
        _move_into_place(fd_tmp, target)
    except BaseException:
        fd_tmp.unlink(missing_ok=True)
        raise
    return target.stat()


def _move_into_place(tmp: Path, target: Path) -> None:
    """Put `tmp` at `target` atomically. Over an existing file, swap the two (renameat2 RENAME_EXCHANGE) and delete
    the old one: ext4 forces a file renamed *over* another to disk first (auto_da_alloc: 0.5 s for 2 GB here,
    which `cp` never waits for), and a swap is as atomic for readers and against a kill without that. Not against a
    power loss: the new file's data may not be on disk yet when the placeholder is gone (an empty or short file
    after the reboot, which `git status` shows modified and `git checkout -- PATH` restores); `theta.fsync` writes
    it to disk first. A kill between the swap and the delete leaves the old file under the temporary name, removed
    later as stale; where the swap is not supported, a plain replace."""
    if target.exists() and _exchange(tmp, target):
        tmp.unlink(missing_ok=True)
        return
    os.replace(tmp, target)


def _exchange(a: Path, b: Path) -> bool:
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def materialize(repo: Repo, paths: list[str] | None = None, echo: Callable[[str], Any] | None = None,
                refresh: bool = True) -> list[str]:
    """Write every placeholder among the tracked `paths` (all when None) as its real file; returns the paths.

    Objects a placeholder needs that are not local are fetched first (as a checkout would); then each file is
    written and recorded, and git's index refreshed so `git status` sees the files as unmodified."""
    from gittheta_merge.filter.process import Filter
    from gittheta_merge.storage.store import ObjectStore

    _remove_stale_temp(repo)
    todo = []
    index_blob = {}
    for blob, path in tracked_paths(repo, paths):
        meta = placeholder_of(repo.root / path)
        if meta is not None:
            todo.append((path, meta))
            index_blob[path] = blob
    if not todo:
        return []
    filt = Filter(repo)
    fsync = repo.config_bool("theta.fsync", False)
    records = load_records(repo)
    store = ObjectStore.for_repo(repo)
    done = []
    with store.guard.session():
        for path, meta in todo:
            meta = filt.parse_for_smudge(path, meta.to_bytes())  # fetches missing objects, or names them
            data = (repo.root / path).read_bytes()
            blob = repo.git("hash-object", "-w", "--no-filters", "--stdin", input=data).decode().strip()
            st = write_file(filt, path, meta, fsync)
            records[path] = Written.of(repo.root / path, st, blob)
            save_records(repo, records)
            done.append(path)
            if echo:
                echo(f"git-theta: wrote {path} ({human_bytes(meta.total_bytes)}) from the object store")
    if refresh:
        settle_index(repo, [(p, index_blob[p], records[p].blob) for p in done])
    return done


def settle_index(repo: Repo, written: list[tuple[str, str, str]]) -> None:
    """Let git see the written files as unmodified: each index entry whose blob is the one we wrote gets the file's
    stat data (gitindex.record_stat). Failing that: the index remembers the placeholder's size, and git calls a
    file of another size modified without asking the filter; so each such entry is re-entered without stat data
    (`--index-info`, the same blob: nothing staged), and the refresh then streams the file through clean once,
    which recognises it (recognise()) and lets git record the real file's stat.
    An entry whose blob differs (`git restore --source`: the work tree is not the index) is left modified."""
    from gittheta_merge.storage.gitindex import record_stat

    records = load_records(repo)
    same_blob = [(p, blob) for p, blob, ours in written if blob == ours and p in records]
    if same_blob:
        _next_second_after(max(records[p].ctime_ns for p, _ in same_blob))
    files = {}
    for p, blob in same_blob:
        # stat again *after* the wait: only a file still exactly as written gets its stat recorded (an edit since,
        # even in the same second, changed its ctime); any later edit lands in a later second, which git sees
        try:
            st = os.stat(repo.root / p)
        except OSError:
            continue
        if records[p].matches(st):
            files[p] = (blob, st)
    if files and len(files) == len(same_blob) and record_stat(repo, files) == set(files):
        return  # the index now holds the files' stat: git sees them unmodified without reading them
    modes = {p: mode for (mode, _, _), p in index_modes(repo, [p for p, _, _ in written])}
    same = [(p, blob) for p, blob, ours in written if blob == ours and p in modes]
    if same:
        lines = "".join(f"{modes[p]} {blob}\t{p}\n" for p, blob in same)
        repo.git("update-index", "--index-info", input=lines.encode())
    # no paths here: `update-index --refresh PATH` would also stage PATH's content
    subprocess.run(["git", "update-index", "-q", "--refresh"], cwd=repo.root, capture_output=True)


def _next_second_after(ctime_ns: int) -> None:
    """Wait until the clock is past the second of `ctime_ns` (0-1 s, once per materialization). git compares stat
    data to the second: an edit in the same second as the one the index records (keeping size and mtime) would
    otherwise look unmodified. The 20 ms margin covers the filesystem's coarse clock."""
    import time

    delay = (ctime_ns // 10**9 + 1) + 0.02 - time.time()
    if delay > 0:
        time.sleep(delay)


def index_modes(repo: Repo, paths: list[str]) -> list[tuple[tuple[str, str, str], str]]:
    from gittheta_merge.storage.gitutil import _z_entries

    return [(entry, p) for entry, p in _z_entries(repo, ["ls-files", "-s", "-z"], paths) if entry[2] == "0"]


def _remove_stale_temp(repo: Repo) -> None:
    """Temporary files of materializations that were killed (ours only, by name; never the real files)."""
    from gittheta_merge.storage.storelock import alive

    for _, path in tracked_paths(repo):
        folder = (repo.root / path).parent
        for tmp in folder.glob(f"{glob.escape(TMP_PREFIX + Path(path).name)}.*"):
            pid, _, start = tmp.name.rsplit(".", 1)[-1].partition("-")
            if pid.isdigit() and not alive(int(pid), start):
                tmp.unlink(missing_ok=True)


def recognise(repo: Repo, path: str, stream: BinaryIO) -> bytes | None:
    """clean's shortcut: if the work-tree file is exactly what we materialized (its stat unchanged, including the
    ctime no tool can set), drain git's stream without hashing it and return the recorded metadata blob's bytes;
    None when the file is not ours or changed (the caller then cleans for real, and the stream is untouched).
    A stream that turns out to differ from the recorded file (length or end digests) is an error, never a wrong
    answer."""
    from gittheta_merge.errors import InputError

    written = load_records(repo).get(path)
    if written is None:
        return None
    try:
        st = os.stat(repo.root / path)
    except OSError:
        return None
    if not written.matches(st):
        return None
    size, head_buf, tail_buf = 0, bytearray(), bytearray()
    buf = bytearray(8 << 20)  # one buffer for the whole drain: git's stream is read, never copied
    view = memoryview(buf)
    while n := stream.readinto(view):  # type: ignore[attr-defined]
        chunk = view[:n]
        if len(head_buf) < SAMPLE:
            head_buf += chunk[: SAMPLE - len(head_buf)]
        tail_buf = bytearray(chunk[n - SAMPLE:]) if n >= SAMPLE else (tail_buf + chunk)[-SAMPLE:]
        size += n
    if (size, hashlib.sha256(head_buf).hexdigest(), hashlib.sha256(tail_buf).hexdigest()) != (
            written.size, written.head, written.tail):
        records = load_records(repo)
        records.pop(path, None)
        save_records(repo, records)
        raise InputError(f"{path}: the content git sent differs from the file on disk (changed while git read it?); "
                         "run the command again")
    return repo.git("cat-file", "blob", written.blob)
