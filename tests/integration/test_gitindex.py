"""storage/gitindex.py against git itself: after we patch an entry's stat data, git reports the same stat data as
its own refresh would, `git fsck`-style checks of the index pass (git reads it: a bad checksum is fatal), and
index formats we do not patch are left to git."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from gittheta_merge.storage.gitindex import record_stat
from gittheta_merge.storage.gitutil import Repo


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def _debug(repo: Path, path: str) -> dict[str, str]:
    """`git ls-files --debug PATH`: the entry's stat data as git reads it from the index."""
    out = git(repo, "ls-files", "--debug", "--", path).splitlines()
    fields = {}
    for line in out[1:]:
        for part in line.strip().split("\t"):
            key, _, value = part.partition(":")
            fields[key.strip()] = value.strip()
    return fields


def _repo(tmp_path: Path, *init: str) -> Path:
    repo = tmp_path / "r"
    repo.mkdir()
    git(repo, "init", "-q", *init)
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    for i, name in enumerate(["a.bin", "dir/b.bin", "dir/sub/c-with-a-longer-name.bin", "z.txt"]):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(bytes([i]) * (100 + i))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "one")
    return repo


def _touch_all(repo: Path) -> None:
    """New stat data for every file (new inode, later times): the index's entries no longer match."""
    time.sleep(1.05)
    for name in ["a.bin", "dir/b.bin", "dir/sub/c-with-a-longer-name.bin"]:
        data = (repo / name).read_bytes()
        (repo / name).unlink()
        (repo / name).write_bytes(data)


def _patch(repo: Path, paths: list[str]) -> set[str]:
    r = Repo.discover(repo)
    files = {}
    for p in paths:
        blob = git(repo, "rev-parse", f":{p}").strip()
        files[p] = (blob, os.stat(repo / p))
    time.sleep(1.05)  # past the files' second, as materialize does
    return record_stat(r, files)


@pytest.mark.parametrize("setup", ["v2", "v3-intent-to-add", "v4", "sha256"])
def test_patched_entries_read_back_as_gits_own_refresh(tmp_path: Path, setup: str) -> None:
    repo = _repo(tmp_path, *(["--object-format=sha256"] if setup == "sha256" else []))
    if setup == "v4":
        git(repo, "update-index", "--index-version", "4")
    if setup == "v3-intent-to-add":
        (repo / "new.txt").write_text("new\n")
        git(repo, "add", "-N", "new.txt")  # an extended-flags entry: the index becomes version 3
    _touch_all(repo)
    paths = ["a.bin", "dir/sub/c-with-a-longer-name.bin"]
    assert _patch(repo, paths) == set(paths)
    ours = {p: _debug(repo, p) for p in paths}
    untouched = _debug(repo, "dir/b.bin")
    # git reads the patched index (a wrong checksum or offset is fatal to every git command) ...
    status = git(repo, "status", "--porcelain", "--untracked-files=no")
    assert "a.bin" not in status and "c-with-a-longer-name" not in status
    # ... and its own refresh agrees with what we wrote
    git(repo, "update-index", "-q", "--refresh")
    for p in paths:
        theirs = _debug(repo, p)
        for key in ("ctime", "mtime", "dev", "ino", "uid", "gid", "size"):
            assert ours[p][key] == theirs[key], (p, key)
    assert untouched["mtime"] != _debug(repo, "dir/b.bin")["mtime"]  # not ours to patch: git refreshed it itself


def test_an_entry_with_another_blob_is_left_alone(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    _touch_all(repo)
    r = Repo.discover(repo)
    wrong = "0" * 40
    before = (repo / ".git" / "index").read_bytes()
    assert record_stat(r, {"a.bin": (wrong, os.stat(repo / "a.bin"))}) == set()
    assert (repo / ".git" / "index").read_bytes() == before


def test_a_split_index_and_a_held_lock_are_left_to_git(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    git(repo, "update-index", "--split-index")
    _touch_all(repo)
    before = (repo / ".git" / "index").read_bytes()
    assert _patch(repo, ["a.bin"]) == set()
    assert (repo / ".git" / "index").read_bytes() == before
    git(repo, "update-index", "--no-split-index")
    (repo / ".git" / "index.lock").write_bytes(b"")
    assert _patch(repo, ["a.bin"]) == set()
    assert (repo / ".git" / "index.lock").exists()  # someone else's lock is never removed
