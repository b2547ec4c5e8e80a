"""git plumbing: the one place that runs git.

We call the git binary directly rather than through GitPython: every operation here is a plumbing
command whose output we parse anyway, GitPython would spawn the same processes, and its import adds
start-up time to the filter process that runs inside every `git add`/`git checkout`. (docs/design.md)
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from gittheta_merge.errors import ThetaError, UsageError


def run_git(*args: str, cwd: str | Path | None = None, input: bytes | None = None,
            check: bool = True, env: Mapping[str, str] | None = None) -> bytes:
    """Run a git command and return its stdout; a ThetaError with git's message on failure. `env`: variables
    set on top of this process's environment."""
    try:
        proc = subprocess.run(
            ["git", *args], cwd=cwd, input=input, capture_output=True, check=False,
            env={**os.environ, **env} if env else None,
        )
    except FileNotFoundError:
        raise UsageError("git is not installed or not on PATH") from None
    if check and proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip()
        raise ThetaError(f"`git {' '.join(args)}` failed: {msg}")
    return proc.stdout


def git_text(*args: str, cwd: str | Path | None = None, check: bool = True) -> str:
    return run_git(*args, cwd=cwd, check=check).decode().strip()


@cache
def _repo_paths(cwd: str) -> tuple[str, str, str]:
    out = run_git("rev-parse", "--show-toplevel", "--git-dir", "--git-common-dir",
                  cwd=cwd, check=False).decode().splitlines()
    if len(out) != 3:
        raise UsageError(f"{cwd} is not inside a git work tree (run `git init` first)")
    top, git_dir, common = out
    base = Path(cwd)
    return top, str((base / git_dir).resolve()), str((base / common).resolve())


@dataclass(frozen=True)
class Repo:
    """Paths of one repository: its work tree, its git dir and the common dir shared by worktrees."""

    root: Path
    git_dir: Path
    common_dir: Path

    @classmethod
    def discover(cls, cwd: str | Path | None = None) -> Repo:
        top, git_dir, common = _repo_paths(str(Path(cwd or os.getcwd()).resolve()))
        return cls(Path(top), Path(git_dir), Path(common))

    def git(self, *args: str, input: bytes | None = None, check: bool = True,
            env: Mapping[str, str] | None = None) -> bytes:
        return run_git(*args, cwd=self.root, input=input, check=check, env=env)

    def is_ancestor(self, commit: str, of: str) -> bool:
        return subprocess.run(["git", "merge-base", "--is-ancestor", commit, of], cwd=self.root,
                              capture_output=True).returncode == 0

    def config_get(self, key: str, default: str | None = None) -> str | None:
        out = run_git("config", "--get", key, cwd=self.root, check=False).decode().strip()
        return out if out else default

    def config_int(self, key: str, default: int) -> int:
        raw = run_git("config", "--type=int", "--get", key, cwd=self.root, check=False)
        text = raw.decode().strip()
        return int(text) if text else default

    def config_bool(self, key: str, default: bool) -> bool:
        raw = run_git("config", "--type=bool", "--get", key, cwd=self.root, check=False)
        text = raw.decode().strip()
        return text == "true" if text else default

    def check_attr(self, attr: str, paths: Iterable[str]) -> dict[str, str]:
        """Attribute value per path (as git reads .gitattributes)."""
        paths = list(paths)
        if not paths:
            return {}
        out = self.git("check-attr", "-z", "--stdin", attr, input=b"\0".join(p.encode() for p in paths) + b"\0")
        fields = out.split(b"\0")
        result: dict[str, str] = {}
        for i in range(0, len(fields) - 2, 3):
            result[fields[i].decode()] = fields[i + 2].decode()
        return result


class CatFile:
    """A persistent `git cat-file --batch` for reading many blobs without one process each."""

    def __init__(self, repo: Repo) -> None:
        self._proc = subprocess.Popen(
            ["git", "cat-file", "--batch"], cwd=repo.root,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )

    def read(self, rev: str) -> tuple[str, bytes] | None:
        """(type, content) of an object, or None if it does not exist."""
        assert self._proc.stdin and self._proc.stdout
        self._proc.stdin.write(rev.encode() + b"\n")
        self._proc.stdin.flush()
        header = self._proc.stdout.readline().decode().split()
        if len(header) != 3:
            return None
        _, kind, size = header
        data = self._proc.stdout.read(int(size))
        self._proc.stdout.read(1)
        return kind, data

    def close(self) -> None:
        if self._proc.stdin:
            self._proc.stdin.close()
        self._proc.wait()

    def __enter__(self) -> CatFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def blob_sizes(repo: Repo, blobs: Iterable[str]) -> dict[str, int]:
    """Sizes of many blobs from one `git cat-file --batch-check` (no content read)."""
    wanted = list(dict.fromkeys(blobs))
    if not wanted:
        return {}
    out = repo.git("cat-file", "--batch-check=%(objectname) %(objectsize)", input="\n".join(wanted).encode() + b"\n")
    sizes: dict[str, int] = {}
    for line in out.decode().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            sizes[parts[0]] = int(parts[1])
    return sizes


def _z_entries(repo: Repo, args: list[str], paths: list[str] | None) -> Iterator[tuple[list[str], str]]:
    """(fields before the tab, path) of each NUL-terminated entry `git <args> [-- paths]` prints."""
    for entry in repo.git(*args, *(["--", *paths] if paths else [])).split(b"\0"):
        if entry:
            meta, path = entry.split(b"\t", 1)
            yield meta.decode().split(), path.decode()


def iter_tree_blobs(repo: Repo, rev: str, paths: list[str] | None = None) -> Iterator[tuple[str, str]]:
    """(blob id, path) of every blob in a commit's tree (recursive)."""
    for (_mode, kind, oid), path in _z_entries(repo, ["ls-tree", "-r", "-z", "--full-tree", rev], paths):
        if kind == "blob":
            yield oid, path


def iter_index_blobs(repo: Repo, paths: list[str] | None = None) -> Iterator[tuple[str, str]]:
    """(blob id, path) of every stage-0 entry in the index."""
    for (_mode, oid, stage), path in _z_entries(repo, ["ls-files", "-s", "-z"], paths):
        if stage == "0":
            yield oid, path
