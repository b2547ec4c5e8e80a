"""The git side of `git theta align`: models read from revisions, the aligned model written as objects and
committed on a branch, without a checkout and without touching the user's work tree or index."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from gittheta_align.arch import Shape
from gittheta_merge.errors import InputError, MissingError, UsageError
from gittheta_merge.storage.gitutil import Repo
from gittheta_merge.storage.metadata import Metadata

# the files that define the token ids (tokenizer_config.json also holds incidental fields such as a saved path)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model")


def resolve(repo: Repo, rev: str) -> str:
    out = repo.git("rev-parse", "--verify", "-q", f"{rev}^{{commit}}", check=False).decode().strip()
    if not out:
        raise UsageError(f"{rev!r} is not a commit or branch here")
    return out


def _tree_files(repo: Repo, commit: str, folder: str) -> dict[str, str]:
    """path -> blob id of every file under `folder` at `commit`."""
    spec = [folder] if folder else []
    out = repo.git("ls-tree", "-r", "-z", commit, "--", *spec).decode()
    files = {}
    for item in filter(None, out.split("\0")):
        info, path = item.split("\t", 1)
        mode, kind, blob = info.split()
        if kind == "blob":
            files[path] = blob
    return files


def model_dir(repo: Repo, rev: str, given: str | None) -> str:
    """The model directory: `given`, or the one folder at `rev` holding a config.json beside tracked weights."""
    from gittheta_merge.storage.revisions import tracked_files

    tracked = tracked_files(repo, rev)
    if given is not None:
        folder = given.strip("/")
        if not any(p == f"{folder}/{Path(p).name}" or (not folder and "/" not in p) for p in tracked):
            raise MissingError(f"{given}: no tracked weights at {rev} (pass --path, a model directory)")
        return folder
    folders = sorted({str(Path(p).parent) if "/" in p else "" for p in tracked})
    found = [f for f in folders if f"{f}/config.json".lstrip("/") in _tree_files(repo, rev, f)]
    if len(found) != 1:
        raise UsageError(f"{rev}: {'no' if not found else 'more than one'} model directory (config.json beside "
                         f"tracked weights{': ' + ', '.join(found) if found else ''}); name it with --path DIR")
    return found[0]


def shape_at(repo: Repo, rev: str, folder: str) -> tuple[Shape, dict[str, Any]]:
    path = f"{folder}/config.json" if folder else "config.json"
    raw = repo.git("cat-file", "blob", f"{rev}:{path}", check=False)
    if not raw:
        raise MissingError(f"{rev}: no {path} (the model directory needs its config.json)")
    config = json.loads(raw)
    return Shape.from_config(config), config


def check_same_tokenizer(repo: Repo, a: str, b: str, folder: str) -> None:
    files_a, files_b = _tree_files(repo, a, folder), _tree_files(repo, b, folder)
    for name in TOKENIZER_FILES:
        path = f"{folder}/{name}" if folder else name
        if files_a.get(path) != files_b.get(path):
            raise InputError(f"{path} differs between {a[:12]} and {b[:12]}: alignment runs both models on the same "
                             "token stream, so they must share a tokenizer")


@contextmanager
def checked_out(repo: Repo, rev: str, folder: str) -> Iterator[Path]:
    """The model directory at `rev` in a temporary directory (tracked weights rebuilt from the store)."""
    from gittheta_merge.filter.process import Filter

    tmp = Path(tempfile.mkdtemp(prefix="theta-align-"))
    try:
        files = _tree_files(repo, rev, folder)
        attrs = repo.check_attr("filter", list(files))
        filt = Filter(repo)
        for path, blob in files.items():
            rel = Path(path).relative_to(folder) if folder else Path(path)
            if ".." in rel.parts:
                raise InputError(f"{path}: unsafe path")
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            data = repo.git("cat-file", "blob", blob)
            with open(target, "wb") as out:
                if attrs.get(path) == "theta":
                    filt.smudge_full(path, data, out)
                else:
                    out.write(data)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(folder: Path) -> Any:
    """The encoder (no task head) of a model directory, for the feature statistics."""
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return transformers.AutoModel.from_pretrained(str(folder)).eval()


def aligned_metadata(repo: Repo, meta: Metadata, shape: Shape, perms: dict[str, np.ndarray],
                     progress: Callable[[int], None] | None = None) -> Metadata:
    """B's metadata with every permuted tensor rewritten as new objects, one tensor in memory at a time; tensors
    no permutation touches keep their objects."""
    from gittheta_align.permute import permute_tensor
    from gittheta_merge.merge.sinks import StoreSink
    from gittheta_merge.merge.sources import StoreSource
    from gittheta_merge.storage.store import ObjectStore
    from gittheta_merge.storage.tensors import load_tensor

    store = ObjectStore.for_repo(repo)
    source = StoreSource(meta, store)
    sink = StoreSink(store, repo.config_int("theta.blockBytes", 64 << 20))
    infos = [source.info(t.name) for t in meta.tensors]
    sink.start(infos)  # type: ignore[arg-type]
    with store.guard.session():
        for entry, info in zip(meta.tensors, infos):
            row, col = shape.roles(entry.name)
            if (row is None or row not in perms) and (col is None or col not in perms):
                sink.keep(entry.name, source, info)
            else:
                tensor = permute_tensor(entry.name, load_tensor(store, entry, f"{entry.name}: "), shape, perms)
                sink.begin(info)  # type: ignore[arg-type]
                sink.write(tensor.contiguous())
                sink.end()
            if progress:
                progress(entry.nbytes)
        sink.finish()
    return sink.metadata(meta)


def commit_on_branch(repo: Repo, parent: str, files: dict[str, bytes], branch: str, message: str,
                     force: bool = False) -> str:
    """A commit with `parent`'s tree but `files` (path -> metadata bytes) replaced, on `branch`; through a
    temporary index, so the user's index and work tree are untouched. Refuses to move an existing branch
    unless `force`."""
    ref = f"refs/heads/{branch}"
    exists = repo.git("rev-parse", "--verify", "-q", ref, check=False).strip()
    if exists and not force:
        raise UsageError(f"branch {branch} exists already; pass --into NAME or --force to replace it")
    with tempfile.TemporaryDirectory(prefix="theta-align-index-") as tmp:
        env = dict(os.environ, GIT_INDEX_FILE=str(Path(tmp) / "index"))

        def git(*args: str, data: bytes | None = None) -> str:  # paths are literal, never pathspec patterns
            return subprocess.run(["git", "--literal-pathspecs", *args], cwd=repo.root, env=env, input=data,
                                  check=True, capture_output=True).stdout.decode().strip()

        git("read-tree", parent)
        for path, data in files.items():
            blob = git("hash-object", "-w", "--stdin", data=data)
            mode = git("ls-files", "-s", "--", path).split()[0]
            git("update-index", "--cacheinfo", f"{mode},{blob},{path}")
        tree = git("write-tree")
    commit = repo.git("commit-tree", tree, "-p", parent, "-m", message).decode().strip()
    repo.git("update-ref", "-m", f"theta align: {message.splitlines()[0]}", ref, commit,
             *([exists.decode()] if exists else [""]))
    return commit


def weights_digests(repo: Repo, rev: str, folder: str) -> dict[str, str]:
    """path -> digest of the weights (storage.metadata: over the tensors' objects) of every tracked file of the
    model directory at `rev`: what an alignment's statistics describe."""
    from gittheta_merge.storage.revisions import tracked_files

    return {path: meta.weights_digest() for path, meta in sorted(tracked_files(repo, rev).items())
            if not folder or path.startswith(folder + "/")}


def alignment_entry(repo: Repo, commit: str, folder: str) -> dict[str, Any] | None:
    """The `alignment` statistic entry of the model directory's weights at `commit` (None when there is none)."""
    from gittheta_merge.storage.revisions import tracked_files

    for path, meta in sorted(tracked_files(repo, commit).items()):
        if (not folder or path.startswith(folder + "/")) and "alignment" in meta.stats:
            return dict(meta.stats["alignment"])
    return None


def resolve_branch(repo: Repo, branch: str) -> str | None:
    out = repo.git("rev-parse", "--verify", "-q", f"refs/heads/{branch}", check=False).decode().strip()
    return out or None


def is_alignment_of(repo: Repo, branch: str, reference: str, rev: str) -> bool:
    """Whether `branch` is an alignment commit of `rev`'s model (its parent) to `reference`'s current weights."""
    head = resolve_branch(repo, branch)
    commit = resolve(repo, rev)
    parent = repo.git("rev-parse", "--verify", "-q", f"{head}^", check=False).decode().strip()
    if head is None or parent != commit:
        return False
    folder = model_dir(repo, commit, None)
    entry = alignment_entry(repo, head, folder)
    if entry is None:
        return False
    weights = entry["provenance"].get("weights") or {}
    return (weights.get("reference") == weights_digests(repo, resolve(repo, reference), folder)
            and weights.get("aligned") == weights_digests(repo, commit, folder))
