"""Helpers the command modules share: paths relative to the repository, tracked files under paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gittheta_merge.errors import MissingError, UsageError
from gittheta_merge.storage.gitutil import Repo


def repo_relative(repo: Repo, path: str) -> str:
    absolute = (Path.cwd() / path).resolve()
    try:
        return absolute.relative_to(repo.root.resolve()).as_posix()
    except ValueError:
        raise UsageError(f"{path} is outside the repository") from None


def tracked_at(repo: Repo, rev: str, paths: tuple[str, ...]) -> dict[str, Any]:
    """Tracked checkpoints (path → metadata) at a revision, under the given paths (relative to cwd)."""
    from gittheta_merge.storage import revisions

    return revisions.tracked_files(repo, rev, [repo_relative(repo, p) for p in paths] or None)


def expand_tracked(repo: Repo, paths: tuple[str, ...]) -> list[str]:
    """Tracked checkpoint files staged under the paths (files, or a directory such as an HF model's)."""
    found = list(tracked_at(repo, ":", paths))
    if not found:
        raise MissingError(f"no tracked checkpoint staged under {' '.join(paths)}")
    return found
