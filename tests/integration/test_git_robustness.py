"""Failures never lose data: bad input stages nothing, a killed add leaves a consistent store,
corrupt or missing objects fail checkout without a half-written file; fsck and gc."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import git, random_state, store_objects
from safetensors.torch import save_file

from gittheta_merge.storage.store import ObjectStore


def tracked(repo: Path) -> Path:
    git(repo, "theta", "track", "*.safetensors", "*.pt")
    git(repo, "add", ".gitattributes")
    git(repo, "commit", "-q", "-m", "attrs")
    return repo


def staged(repo: Path) -> str:
    return git(repo, "diff", "--cached", "--name-only").stdout.decode().strip()


@pytest.mark.parametrize("kind", ["truncated", "garbage", "lying-header", "code-pickle"])
def test_bad_input_stages_nothing(repo: Path, kind: str) -> None:
    tracked(repo)
    name = "model.pt" if kind == "code-pickle" else "model.safetensors"
    path = repo / name
    if kind == "code-pickle":
        torch.save({"w": torch.ones(2), "f": subprocess.Popen}, path)
    else:
        save_file(random_state(2), path)
        data = path.read_bytes()
        if kind == "truncated":
            data = data[:-100]
        elif kind == "garbage":
            data = b"this is not a checkpoint at all" * 10
        else:
            data = data.replace(b"[64,32]", b"[64,33]", 1)
        path.write_bytes(data)
    proc = git(repo, "add", name, check=False)
    assert proc.returncode != 0
    err = proc.stderr.decode()
    assert name in err and "git-theta: error" in err
    assert staged(repo) == ""
    assert git(repo, "ls-files", name).stdout == b""


def test_killed_add_leaves_consistent_store(repo: Path) -> None:
    tracked(repo)
    git(repo, "config", "theta.blockBytes", str(1 << 20))
    gen = torch.Generator().manual_seed(0)
    save_file({f"t{i}": torch.randn(1024, 512, generator=gen) for i in range(96)}, repo / "big.safetensors")
    proc = subprocess.Popen(["git", "add", "big.safetensors"], cwd=repo, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while len(store_objects(repo)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("git add finished before it could be killed")
    store = ObjectStore(repo / ".git" / "lfs")
    written = list(store.iter_oids())
    assert 0 < len(written) < 192  # 96 tensors × 2 row blocks of 1 MiB
    assert all(store.verify(oid) for oid in written)  # no half-written object under its final name
    (repo / ".git" / "index.lock").unlink(missing_ok=True)  # git's own lock, as git tells the user
    assert staged(repo) == ""
    git(repo, "add", "big.safetensors")  # a retry completes and reuses what was written
    git(repo, "commit", "-q", "-m", "big")
    assert len(store_objects(repo)) == 192
    assert git(repo, "theta", "fsck").returncode == 0


def commit_state(repo: Path, state: dict, msg: str) -> bytes:
    save_file(state, repo / "model.safetensors")
    git(repo, "add", "model.safetensors")
    git(repo, "commit", "-q", "-m", msg)
    return (repo / "model.safetensors").read_bytes()


def corrupt_one(repo: Path) -> str:
    store = ObjectStore(repo / ".git" / "lfs")
    oid = sorted(store.iter_oids())[0]
    path = store.path(oid)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    return oid


def test_fsck_catches_corruption_and_checkout_refuses(repo: Path) -> None:
    tracked(repo)
    commit_state(repo, random_state(4), "one")
    assert git(repo, "theta", "fsck").returncode == 0
    oid = corrupt_one(repo)
    proc = git(repo, "theta", "fsck", check=False)
    assert proc.returncode == 1 and f"corrupt: {oid}" in proc.stdout.decode()

    (repo / "model.safetensors").unlink()
    proc = git(repo, "checkout", "--", "model.safetensors", check=False)
    assert proc.returncode != 0
    assert b"corrupt" in proc.stderr and b"model.safetensors" in proc.stderr
    assert not (repo / "model.safetensors").exists()  # no half-written file


def test_missing_object_names_the_tensor(repo: Path) -> None:
    tracked(repo)
    commit_state(repo, random_state(3), "one")
    store = ObjectStore(repo / ".git" / "lfs")
    meta = git(repo, "theta", "ls", "model.safetensors").stdout.decode()
    assert "layer0.weight" in meta
    victim = next(iter(store.iter_oids()))
    store.delete(victim)
    (repo / "model.safetensors").unlink()
    proc = git(repo, "checkout", "--", "model.safetensors", check=False)
    assert proc.returncode != 0
    assert b"no local object" in proc.stderr and b"model.safetensors" in proc.stderr
    assert not (repo / "model.safetensors").exists()
    fsck = git(repo, "theta", "fsck", check=False)
    assert fsck.returncode == 1 and f"missing: {victim}" in fsck.stdout.decode()


def test_gc_keeps_everything_reachable(repo: Path) -> None:
    tracked(repo)
    base = random_state(4)
    v1 = commit_state(repo, base, "one")
    git(repo, "checkout", "-q", "-b", "side")
    commit_state(repo, dict(base, **{"layer0.weight": base["layer0.weight"] * 3}), "side")
    # an orphan: a commit that becomes unreachable once its branch and reflogs are gone
    git(repo, "checkout", "-q", "-b", "tmp", "main")
    commit_state(repo, dict(base, **{"layer2.weight": base["layer2.weight"] - 1}), "orphan")
    git(repo, "checkout", "-q", "main")
    git(repo, "branch", "-q", "-D", "tmp")
    git(repo, "reflog", "expire", "--expire=now", "--all")
    staged_only = dict(base, **{"layer1.weight": base["layer1.weight"] + 7})
    save_file(staged_only, repo / "model.safetensors")
    git(repo, "add", "model.safetensors")  # referenced only by the index
    before = store_objects(repo)
    assert len(before) == 7

    out = git(repo, "theta", "gc").stdout.decode()  # default grace period: recent objects are spared
    assert "removed 0" in out and store_objects(repo) == before
    out = git(repo, "theta", "gc", "--prune", "now").stdout.decode()
    assert "removed 1" in out
    assert len(store_objects(repo)) == 6
    assert git(repo, "theta", "fsck").returncode == 0
    git(repo, "checkout", "-q", "-f", "side")
    git(repo, "checkout", "-q", "-f", "main")
    assert (repo / "model.safetensors").read_bytes() == v1


def test_gc_keeps_plain_git_lfs_objects(repo: Path) -> None:
    """git-lfs pointer files share the store; gc must not delete their objects."""
    tracked(repo)
    oid = "ab" * 32
    store = ObjectStore(repo / ".git" / "lfs")
    content = b"plain lfs file content"
    real_oid, _ = store.put(content)
    (repo / "data.bin").write_text(
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{real_oid}\nsize {len(content)}\n")
    git(repo, "add", "data.bin")
    git(repo, "commit", "-q", "-m", "lfs pointer")
    assert oid != real_oid
    git(repo, "theta", "gc", "--prune", "now")
    assert store.has(real_oid)
