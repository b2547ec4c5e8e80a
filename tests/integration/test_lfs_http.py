"""Push, clone, fetch and lazy clones through a real git-lfs HTTP server (giftless on localhost, tests/lfs_server.py):
the git refs live in a bare repository, the objects on the server (`.lfsconfig` lfs.url, as a team would commit it).
Also: the server killed in the middle of a push, a wrong credential, a 1,000-object push, and a plain git-lfs file
beside the model."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import git, init_repo, random_state, sha, store_objects
from lfs_server import LfsServer, available
from safetensors.torch import save_file

pytestmark = [
    pytest.mark.skipif(shutil.which("git-lfs") is None, reason="git-lfs not installed"),
    pytest.mark.skipif(not available(), reason="giftless not installed: bash scripts/reference-tools.sh"),
]
NO_PROMPT = {"GIT_TERMINAL_PROMPT": "0", "GCM_INTERACTIVE": "never"}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LfsServer]:
    srv = LfsServer(tmp_path / "giftless").start()
    yield srv
    srv.kill()


def _origin(tmp_path: Path, lfs_url: str, commit_lfsconfig: bool = True) -> tuple[Path, Path]:
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(remote))
    repo = init_repo(tmp_path / "a")
    git(repo, "theta", "track", "*.safetensors")
    git(repo, "remote", "add", "origin", remote.as_uri())
    if commit_lfsconfig:
        git(repo, "config", "-f", ".lfsconfig", "lfs.url", lfs_url)
        git(repo, "add", ".lfsconfig")
    else:
        git(repo, "config", "lfs.url", lfs_url)
    return repo, remote


def _commit(repo: Path, state: dict[str, torch.Tensor], msg: str) -> str:
    save_file(state, repo / "model.safetensors")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", msg)
    return sha(repo / "model.safetensors")


def _clone(tmp_path: Path, remote: Path, name: str) -> Path:
    git(tmp_path, "clone", "-q", remote.as_uri(), name)
    copy = tmp_path / name
    git(copy, "theta", "install")
    return copy


@pytest.mark.slow  # push, clone, fetch and a lazy clone over HTTP (~16 s)
def test_push_clone_fetch_and_lazy_clone_over_http(tmp_path: Path, server: LfsServer) -> None:
    repo, remote = _origin(tmp_path, server.url())
    git(repo, "lfs", "track", "*.bin")  # a plain git-lfs file in the same repository
    (repo / "tokenizer.bin").write_bytes(os.urandom(50_000))
    base = random_state(8)
    v1 = _commit(repo, base, "base")
    git(repo, "push", "-q", "origin", "main", env=NO_PROMPT)
    plain_oid = git(repo, "lfs", "ls-files", "-l").stdout.decode().split()[0]
    assert set(server.objects()) == store_objects(repo) | {plain_oid}
    assert len(server.objects()) == 9

    copy = _clone(tmp_path, remote, "copy")
    assert sha(copy / "model.safetensors") == v1
    assert (copy / "tokenizer.bin").read_bytes() == (repo / "tokenizer.bin").read_bytes()
    assert git(copy, "status", "--porcelain").stdout == b""

    # a fine-tune of two tensors on a branch: exactly two objects go up, and two come down
    git(repo, "checkout", "-qb", "ft")
    ft = dict(base, **{k: base[k] * 2 for k in ("layer1.weight", "layer6.weight")})
    v2 = _commit(repo, ft, "ft")
    before_server = set(server.objects())
    git(repo, "push", "-q", "origin", "ft", env=NO_PROMPT)
    assert len(set(server.objects()) - before_server) == 2
    before = store_objects(copy)
    git(copy, "fetch", "-q", "origin")
    git(copy, "checkout", "-q", "ft")
    assert sha(copy / "model.safetensors") == v2 and len(store_objects(copy) - before) == 2

    # a lazy clone: only the checked-out commit's objects; the rest of history on demand from the server
    git(repo, "checkout", "-q", "main")
    lazy = _clone(tmp_path, remote, "lazy")
    fsck = git(lazy, "theta", "fsck").stdout.decode()
    assert "0 missing, 2 not downloaded yet" in fsck, fsck  # the two tensors only ft changed
    git(lazy, "theta", "pull-objects", "origin/ft")
    assert "not downloaded" not in git(lazy, "theta", "fsck").stdout.decode()
    git(lazy, "checkout", "-q", "ft")
    assert sha(lazy / "model.safetensors") == v2


def test_server_killed_mid_push_then_repush_completes(tmp_path: Path, server: LfsServer) -> None:
    repo, remote = _origin(tmp_path, server.url())
    git(repo, "config", "theta.blockBytes", str(1 << 20))
    g = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(512, 1024, generator=g) for i in range(24)}  # 24 x 2 MB = 48 objects
    v1 = _commit(repo, state, "big")
    push = subprocess.Popen(["git", "push", "-q", "origin", "main"], cwd=repo, env={**os.environ, **NO_PROMPT},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(server.objects()) < 5 and time.monotonic() < deadline and push.poll() is None:
        time.sleep(0.02)
    server.kill()
    _, err = push.communicate(timeout=120)
    uploaded = server.objects()
    assert push.returncode != 0, "the push finished before the server was killed; make the model bigger"
    assert 0 < len(uploaded) < 48
    assert git(remote, "for-each-ref").stdout == b""  # git did not move the branch: the hook failed the push
    assert b"Traceback" not in err

    server.start()  # same storage: whatever it kept, complete or not
    git(repo, "push", "-q", "origin", "main", env=NO_PROMPT)
    objects = server.objects()
    assert set(objects) == store_objects(repo)
    for oid, size in objects.items():  # every object on the server is whole and is what its name says
        assert size == (repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid).stat().st_size
    copy = _clone(tmp_path, remote, "copy")
    assert sha(copy / "model.safetensors") == v1
    assert "0 corrupt, 0 missing" in git(copy, "theta", "fsck").stdout.decode()


def test_wrong_credential_gets_a_clear_error_and_moves_nothing(tmp_path: Path) -> None:
    server = LfsServer(tmp_path / "giftless", anonymous=False).start()
    try:
        repo, remote = _origin(tmp_path, server.url(server.token(key="not-the-server-key")), commit_lfsconfig=False)
        _commit(repo, random_state(3), "base")
        proc = git(repo, "push", "origin", "main", check=False, env=NO_PROMPT)
        err = proc.stderr.decode()
        assert proc.returncode != 0 and "Traceback" not in err, err
        assert "error: uploading tensor objects to origin: the LFS server refused the credentials" in err, err
        ours = next(line for line in err.splitlines() if line.startswith("git-theta: error:"))
        assert "_jwt:" not in ours and "lfs.url" in ours  # names where the credential is set, never prints it
        assert server.objects() == {} and git(remote, "for-each-ref").stdout == b""

        git(repo, "config", "lfs.url", server.url(server.token()))  # the operator's real token
        git(repo, "push", "-q", "origin", "main", env=NO_PROMPT)
        assert set(server.objects()) == store_objects(repo)
    finally:
        server.kill()


@pytest.mark.slow  # a thousand objects over HTTP (~17 s)
def test_a_thousand_objects_push_in_batches(tmp_path: Path, server: LfsServer) -> None:
    repo, remote = _origin(tmp_path, server.url())
    g = torch.Generator().manual_seed(1)
    state = {f"t{i:04d}": torch.randn(16, generator=g) for i in range(1000)}
    v1 = _commit(repo, state, "1000 tensors")
    assert len(store_objects(repo)) == 1000
    git(repo, "push", "-q", "origin", "main", env=NO_PROMPT)
    assert set(server.objects()) == store_objects(repo)
    copy = _clone(tmp_path, remote, "copy")
    assert sha(copy / "model.safetensors") == v1
