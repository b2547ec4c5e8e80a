"""`git theta install` (filter driver in git config) and `git theta track` (.gitattributes lines)."""

from __future__ import annotations

import glob as globmod
import os
import shutil
import sys
from pathlib import Path

from gittheta_merge.errors import ThetaError
from gittheta_merge.gitutil import Repo, run_git

SCOPES = {"repo": "--local", "user": "--global", "global": "--system"}
ATTRS = "filter=theta diff=theta merge=theta -text"
HF_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def command_prefix() -> str:
    """How git should call us: the console script if it is ours on PATH, else this interpreter."""
    found = shutil.which("git-theta")
    if found and Path(found).resolve().parent == Path(sys.executable).resolve().parent:
        return "git-theta"
    if found:
        return "git-theta"
    return f'"{sys.executable}" -m gittheta_merge'


def install(scope: str = "repo", cwd: str | None = None) -> list[tuple[str, str]]:
    """Write the filter configuration; returns what was set."""
    if scope not in SCOPES:
        raise ThetaError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    if scope == "repo":
        Repo.discover(cwd)  # clear error outside a repository
    cmd = command_prefix()
    settings = [
        ("filter.theta.process", f"{cmd} filter-process"),
        ("filter.theta.clean", f"{cmd} clean %f"),
        ("filter.theta.smudge", f"{cmd} smudge %f"),
        ("filter.theta.required", "true"),
    ]
    for key, value in settings:
        run_git("config", SCOPES[scope], key, value, cwd=cwd)
    return settings


def is_installed(repo: Repo) -> bool:
    return bool(repo.config_get("filter.theta.process") or repo.config_get("filter.theta.clean"))


def _escape_pattern(path: str) -> str:
    """gitattributes has no quoting: spaces must be written as a character class."""
    return path.replace(" ", "[[:space:]]")


def patterns_for(repo: Repo, target: str, cwd: Path) -> list[str]:
    """gitattributes patterns (relative to the repo root) for a file, directory or glob."""
    absolute = (cwd / target).resolve() if not os.path.isabs(target) else Path(target).resolve()
    is_glob = any(ch in target for ch in "*?[")
    if not is_glob and absolute.is_dir():
        rel = absolute.relative_to(repo.root.resolve()).as_posix()
        prefix = "" if rel == "." else rel + "/"
        return [prefix + pattern for pattern in HF_WEIGHT_PATTERNS]
    if is_glob:
        base = (cwd.resolve()).relative_to(repo.root.resolve()).as_posix()
        if "/" not in target and base == ".":
            return [target]  # a bare glob matches at any depth, like git itself
        return [target if base == "." else f"{base}/{target}"]
    try:
        rel = absolute.relative_to(repo.root.resolve()).as_posix()
    except ValueError:
        raise ThetaError(f"{target} is outside the repository {repo.root}") from None
    return [_escape_pattern(rel)]


def track(targets: list[str], cwd: str | None = None) -> list[str]:
    """Append tracking lines to .gitattributes; refuses when the filter is not installed."""
    repo = Repo.discover(cwd)
    if not is_installed(repo):
        raise ThetaError(
            "the theta filter is not configured for this repository, so git would commit the raw "
            "checkpoint instead of per-tensor objects. Run `git theta install` first "
            "(once per clone, or `git theta install --scope user` once per machine)"
        )
    here = Path(cwd or os.getcwd())
    attributes = repo.root / ".gitattributes"
    existing = attributes.read_text().splitlines() if attributes.exists() else []
    added: list[str] = []
    for target in targets:
        if not any(ch in target for ch in "*?[") and not (here / target).exists():
            raise ThetaError(f"{target}: no such file or directory (quote globs: git theta track '*.pt')")
        for pattern in patterns_for(repo, target, here):
            line = f"{pattern} {ATTRS}"
            if line not in existing and line not in added:
                added.append(line)
    if added:
        text = "\n".join(existing + added) + "\n"
        tmp = attributes.with_suffix(".theta-tmp")
        tmp.write_text(text)
        os.replace(tmp, attributes)
    return added


def committed_raw(repo: Repo, paths: list[str]) -> list[str]:
    """Tracked paths whose committed version is a raw file (they need `git add --renormalize`)."""
    from gittheta_merge.gitutil import iter_tree_blobs
    from gittheta_merge.metadata import is_metadata

    if not repo.git("rev-parse", "--verify", "-q", "HEAD", check=False).strip():
        return []
    raw: list[str] = []
    for blob, path in iter_tree_blobs(repo, "HEAD", paths):
        head = repo.git("cat-file", "blob", blob)[:64]
        if not is_metadata(head):
            raw.append(path)
    return raw


def expand(repo: Repo, targets: list[str], cwd: Path) -> list[str]:
    """Existing files matched by the targets (for hints after tracking)."""
    found: list[str] = []
    for target in targets:
        for match in globmod.glob(str(cwd / target), recursive=True):
            path = Path(match)
            files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
            for f in files:
                found.append(f.resolve().relative_to(repo.root.resolve()).as_posix())
    return found
