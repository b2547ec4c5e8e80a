"""Shared fixtures: real git repositories in temp dirs with the theta filter installed."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import torch


def git(cwd: Path, *args: str, check: bool = True, input: bytes | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, input=input,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout.decode(errors='replace')}\n{proc.stderr.decode(errors='replace')}")
    return proc


def init_repo(path: Path, install: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.email", "test@example.com")
    git(path, "config", "user.name", "Test")
    git(path, "config", "commit.gpgsign", "false")
    if install:
        git(path, "theta", "install")
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return init_repo(tmp_path / "repo")


def random_state(n: int = 6, shape: tuple[int, ...] = (64, 32), dtype: torch.dtype = torch.float32,
                 seed: int = 0, prefix: str = "layer") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"{prefix}{i}.weight": torch.randn(shape, generator=gen).to(dtype) for i in range(n)}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def store_objects(repo_path: Path) -> set[str]:
    root = repo_path / ".git" / "lfs" / "objects"
    return {p.name for p in root.rglob("*") if p.is_file()} if root.exists() else set()
