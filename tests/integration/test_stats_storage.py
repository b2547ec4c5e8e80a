"""Statistic blobs versioned with the weights: attach, stale detection, push/clone, gc."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import git, init_repo, random_state
from safetensors.torch import load_file, save_file

from gittheta_merge.errors import ThetaError
from gittheta_merge.stats import attach
from gittheta_merge.storage.gitutil import Repo
from gittheta_merge.storage.revisions import read_metadata
from gittheta_merge.storage.store import ObjectStore


def setup_model(repo: Path) -> dict:
    state = random_state(4)
    git(repo, "theta", "track", "*.safetensors")
    save_file(state, repo / "model.safetensors")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "base")
    fisher = {k: v.square() for k, v in state.items()}
    save_file(fisher, repo.parent / "fisher.safetensors", metadata={"provenance": '{"task": "test", "n_examples": 3}'})
    return state


def test_attach_commit_list_and_stale(repo: Path) -> None:
    state = setup_model(repo)
    out = git(repo, "theta", "stats", "add", "../fisher.safetensors", "model.safetensors", "--kind", "fisher")
    assert b"staged fisher statistics" in out.stdout
    assert git(repo, "status", "--porcelain").stdout.decode().strip() == "M  model.safetensors"  # staged, clean tree
    git(repo, "commit", "-q", "-m", "stats")
    listing = git(repo, "theta", "stats", "ls", "--rev", "HEAD").stdout.decode()
    assert "fisher" in listing and "fresh" in listing and "task=test" in listing
    r = Repo.discover(repo)
    meta = read_metadata(r, "HEAD", "model.safetensors")
    path = attach.blob_path(ObjectStore.for_repo(r), meta, "fisher", "model.safetensors")
    assert torch.equal(load_file(path)["layer1.weight"], state["layer1.weight"].square())

    state["layer1.weight"] += 1  # new weights: the statistics stay attached but are stale
    save_file(state, repo / "model.safetensors")
    git(repo, "add", "model.safetensors")
    assert "STALE" in git(repo, "theta", "stats", "ls").stdout.decode()
    meta = read_metadata(r, ":", "model.safetensors")
    with pytest.raises(ThetaError, match="stale"):
        attach.blob_path(ObjectStore.for_repo(r), meta, "fisher", "model.safetensors")
    assert attach.blob_path(ObjectStore.for_repo(r), meta, "fisher", "model.safetensors", allow_stale=True)
    with pytest.raises(ThetaError, match="git theta stats compute"):
        attach.blob_path(ObjectStore.for_repo(r), meta, "gram", "model.safetensors")


def test_attach_refuses_mismatch_and_unstaged(repo: Path) -> None:
    state = setup_model(repo)
    save_file({"other.weight": torch.ones(2)}, repo.parent / "bad.safetensors")
    proc = git(repo, "theta", "stats", "add", "../bad.safetensors", "model.safetensors", "--kind", "fisher",
               check=False)
    assert proc.returncode == 1 and b"none of its tensor names" in proc.stderr
    state["layer0.weight"] *= 2
    save_file(state, repo / "model.safetensors")
    proc = git(repo, "theta", "stats", "add", "../fisher.safetensors", "model.safetensors", "--kind", "fisher",
               check=False)
    assert proc.returncode == 1 and b"not staged" in proc.stderr


@pytest.mark.skipif(shutil.which("git-lfs") is None, reason="git-lfs not installed")
def test_statistics_travel_with_push_and_clone(tmp_path: Path) -> None:
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(remote))
    repo = init_repo(tmp_path / "a")
    setup_model(repo)
    git(repo, "theta", "stats", "add", "../fisher.safetensors", "model.safetensors", "--kind", "fisher")
    git(repo, "commit", "-q", "-m", "stats")
    git(repo, "remote", "add", "origin", remote.as_uri())
    git(repo, "push", "-q", "origin", "main")
    fresh = init_repo(tmp_path / "b")
    git(fresh, "remote", "add", "origin", remote.as_uri())
    git(fresh, "fetch", "-q", "origin")
    git(fresh, "checkout", "-q", "-b", "main", "origin/main")
    r = Repo.discover(fresh)
    meta = read_metadata(r, "HEAD", "model.safetensors")
    path = attach.blob_path(ObjectStore.for_repo(r), meta, "fisher", "model.safetensors")
    assert path.read_bytes() == (tmp_path / "fisher.safetensors").read_bytes()
    assert git(fresh, "status", "--porcelain").stdout == b""
    git(fresh, "theta", "gc", "--prune", "now")
    assert path.exists()  # gc keeps statistics referenced by history
