"""Push, clone and fetch through real git-lfs to file:// remotes (no server needed)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import git, init_repo, random_state, store_objects
from safetensors.torch import save_file

from gittheta_merge.storage.tracking import PRE_PUSH_HOOK

pytestmark = pytest.mark.skipif(shutil.which("git-lfs") is None, reason="git-lfs not installed")


def remote_objects(remote: Path) -> set[str]:
    root = remote / "lfs" / "objects"
    return {p.name for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def save_commit(repo: Path, state: dict, msg: str) -> bytes:
    save_file(state, repo / "model.safetensors")
    git(repo, "add", "model.safetensors", ".gitattributes")
    git(repo, "commit", "-q", "-m", msg)
    return (repo / "model.safetensors").read_bytes()


@pytest.fixture
def origin(tmp_path: Path) -> tuple[Path, Path]:
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(remote))
    repo = init_repo(tmp_path / "a")
    git(repo, "theta", "track", "*.safetensors")
    git(repo, "remote", "add", "origin", remote.as_uri())
    return repo, remote


def clone(tmp_path: Path, remote: Path, name: str) -> Path:
    """A clone with no git identity configured anywhere (as on a fresh CI machine) until it commits."""
    no_identity = {"HOME": str(tmp_path / "no-home"), "GIT_CONFIG_NOSYSTEM": "1", "EMAIL": ""}
    git(tmp_path, "clone", "-q", remote.as_uri(), name, env=no_identity)
    return tmp_path / name


def set_identity(repo: Path) -> None:
    for key, value in (("user.email", "t@example.com"), ("user.name", "T")):
        git(repo, "config", key, value)


def test_push_clone_fetch_branch_and_new_branch_from_clone(tmp_path: Path, origin: tuple[Path, Path]) -> None:
    repo, remote = origin
    base = random_state(8)
    v1 = save_commit(repo, base, "base")
    git(repo, "push", "-q", "origin", "main")
    assert remote_objects(remote) == store_objects(repo) and len(remote_objects(remote)) == 8

    # a clone made before `git theta install`: metadata text, then install materialises the model
    copy = clone(tmp_path, remote, "copy")
    assert (copy / "model.safetensors").read_bytes().startswith(b'{"gittheta"')
    hint = git(copy, "theta", "ls").stderr.decode()
    assert "not configured in this clone" in hint and "git theta install" in hint
    git(copy, "theta", "install", env={"HOME": str(tmp_path / "no-home"), "GIT_CONFIG_NOSYSTEM": "1"})
    assert (copy / "model.safetensors").read_bytes() == v1
    assert git(copy, "status", "--porcelain").stdout == b""

    # a teammate's branch: only the new objects move
    git(repo, "checkout", "-q", "-b", "ft-b")
    ft = dict(base, **{k: base[k] * 2 for k in ("layer1.weight", "layer6.weight")})
    v2 = save_commit(repo, ft, "ft")
    before_remote = remote_objects(remote)
    git(repo, "push", "-q", "origin", "ft-b")
    assert len(remote_objects(remote) - before_remote) == 2
    before = store_objects(copy)
    git(copy, "fetch", "-q", "origin")
    git(copy, "checkout", "-q", "ft-b")
    assert (copy / "model.safetensors").read_bytes() == v2
    assert len(store_objects(copy) - before) == 2

    # a new branch pushed from the fresh clone (no local history of earlier pushes)
    set_identity(copy)
    git(copy, "checkout", "-q", "-b", "from-clone")
    v3 = save_commit(copy, dict(ft, **{"layer0.weight": ft["layer0.weight"] + 1}), "clone work")
    git(copy, "push", "-q", "origin", "from-clone")
    third = clone(tmp_path, remote, "third")
    git(third, "theta", "install")
    git(third, "checkout", "-q", "from-clone")
    assert (third / "model.safetensors").read_bytes() == v3


def test_push_after_git_merge_and_several_refs_and_force(tmp_path: Path, origin: tuple[Path, Path]) -> None:
    repo, remote = origin
    base = random_state(8)
    save_commit(repo, base, "base")
    git(repo, "checkout", "-q", "-b", "x")
    save_commit(repo, dict(base, **{"layer1.weight": base["layer1.weight"] + 1}), "x")
    git(repo, "checkout", "-q", "-b", "y", "main")
    save_commit(repo, dict(base, **{"layer6.weight": base["layer6.weight"] - 1}), "y")
    git(repo, "checkout", "-q", "main")
    git(repo, "merge", "-q", "--no-edit", "x")
    git(repo, "merge", "-q", "--no-edit", "y")  # disjoint tensor lines: git's text merge is exact
    merged = (repo / "model.safetensors").read_bytes()
    git(repo, "push", "-q", "origin", "main", "x", "y")  # several refs at once
    assert remote_objects(remote) == store_objects(repo)

    # force-push a rewritten branch
    git(repo, "checkout", "-q", "x")
    save_commit(repo, dict(base, **{"layer2.weight": base["layer2.weight"] * 5}), "x2")
    git(repo, "reset", "-q", "--hard", "HEAD~1")
    xr = save_commit(repo, dict(base, **{"layer3.weight": base["layer3.weight"] * 7}), "x rewritten")
    git(repo, "push", "-q", "-f", "origin", "x")

    fresh = init_repo(tmp_path / "fresh")  # installed before cloning into it
    git(fresh, "remote", "add", "origin", remote.as_uri())
    git(fresh, "fetch", "-q", "origin")
    git(fresh, "checkout", "-q", "-b", "main", "origin/main")
    assert (fresh / "model.safetensors").read_bytes() == merged
    git(fresh, "checkout", "-q", "-b", "x", "origin/x")
    assert (fresh / "model.safetensors").read_bytes() == xr


def test_plain_git_lfs_file_pushes_beside_the_model(tmp_path: Path, origin: tuple[Path, Path]) -> None:
    repo, remote = origin
    git(repo, "lfs", "track", "*.bin")
    (repo / "data.bin").write_bytes(os.urandom(5000))
    save_commit(repo, random_state(3), "model")
    git(repo, "add", "data.bin", ".gitattributes")
    git(repo, "commit", "-q", "-m", "lfs data")
    hook = (repo / ".git" / "hooks" / "pre-push").read_text()
    assert hook == PRE_PUSH_HOOK == (Path(__file__).parents[2] / "hooks" / "pre-push").read_text()
    git(repo, "push", "-q", "origin", "main")
    assert len(remote_objects(remote)) == 4  # 3 tensors + the git-lfs file

    copy = clone(tmp_path, remote, "copy")
    git(copy, "theta", "install")
    git(copy, "lfs", "install", "--local", "--skip-repo")  # our hook already chains to git-lfs
    git(copy, "lfs", "pull")
    assert (copy / "data.bin").read_bytes() == (repo / "data.bin").read_bytes()
    assert (copy / "model.safetensors").read_bytes() == (repo / "model.safetensors").read_bytes()


def test_existing_hook_is_kept_and_chained(tmp_path: Path, origin: tuple[Path, Path]) -> None:
    repo, remote = origin
    hooks = repo / ".git" / "hooks"
    marker = tmp_path / "custom-hook-ran"
    (hooks / "pre-push").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (hooks / "pre-push").chmod(0o755)
    git(repo, "theta", "install")
    assert (hooks / "pre-push.local").exists()
    save_commit(repo, random_state(2), "m")
    git(repo, "push", "-q", "origin", "main")
    assert marker.exists() and len(remote_objects(remote)) == 2


def test_corrupt_object_on_remote_is_caught(tmp_path: Path, origin: tuple[Path, Path]) -> None:
    repo, remote = origin
    save_commit(repo, random_state(3), "m")
    git(repo, "push", "-q", "origin", "main")
    victim = sorted((remote / "lfs" / "objects").rglob("*"))[-1]
    victim.chmod(0o644)
    data = bytearray(victim.read_bytes())
    data[0] ^= 1
    victim.write_bytes(bytes(data))
    copy = clone(tmp_path, remote, "copy")
    proc = git(copy, "theta", "install", check=False)
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert "corrupt" in err and "model.safetensors" in err and "tensor" in err
    assert not (copy / "model.safetensors").exists() or \
        (copy / "model.safetensors").read_bytes().startswith(b'{"gittheta"')  # never half-written
    assert not any(o == victim.name for o in store_objects(copy))


def test_without_git_lfs_local_work_continues_and_remote_ops_explain(tmp_path: Path, origin: tuple[Path, Path]) -> None:
    repo, _ = origin
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("git", "git-theta", "sh", "python", "python3"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    env = {"PATH": str(bin_dir)}
    save_file(random_state(2), repo / "model.safetensors")
    git(repo, "add", "model.safetensors", ".gitattributes", env=env)
    git(repo, "commit", "-q", "-m", "local", env=env)
    proc = git(repo, "theta", "pull-objects", env=env, check=False)
    assert proc.returncode == 0  # nothing missing: no git-lfs needed
    shutil.rmtree(repo / ".git" / "lfs" / "objects")
    proc = git(repo, "theta", "pull-objects", env=env, check=False)
    assert proc.returncode == 1 and b"git-lfs is not installed" in proc.stderr


def test_fsck_in_a_lazy_clone_tells_not_downloaded_from_missing(tmp_path: Path, origin: tuple[Path, Path]) -> None:
    """A fresh clone has only the checked-out commit's objects: the rest of the remote's history is "not
    downloaded yet" (exit 0, with the command that fetches them), while an object that no remote has and
    that is gone locally is "missing" (exit 1)."""
    from gittheta_merge.storage.store import ObjectStore

    repo, remote = origin
    base = random_state(4)
    save_commit(repo, base, "base")
    git(repo, "push", "-q", "origin", "main")
    git(repo, "checkout", "-q", "-b", "ft")
    ft = dict(base, **{"layer1.weight": base["layer1.weight"] * 2})
    save_commit(repo, ft, "ft")
    git(repo, "push", "-q", "origin", "ft")

    copy = clone(tmp_path, remote, "copy")
    git(copy, "theta", "install")
    proc = git(copy, "theta", "fsck", check=False)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out
    assert "0 corrupt, 0 missing, 1 not downloaded yet" in out and "git theta pull-objects" in out
    assert "missing:" not in out

    git(copy, "theta", "pull-objects", "origin/ft")
    out = git(copy, "theta", "fsck").stdout.decode()
    assert "0 missing" in out and "not downloaded" not in out

    set_identity(copy)
    git(copy, "checkout", "-q", "-b", "local", "origin/ft")
    before = store_objects(copy)
    save_commit(copy, dict(ft, **{"layer2.weight": ft["layer2.weight"] + 1}), "never pushed")
    (lost,) = store_objects(copy) - before
    ObjectStore(copy / ".git" / "lfs").delete(lost)
    proc = git(copy, "theta", "fsck", check=False)
    out = proc.stdout.decode()
    assert proc.returncode == 1 and f"missing: {lost}" in out and "not downloaded" not in out
