"""`git theta merge` under torchrun (gloo, CPU): two ranks merge their shares of the tensors and the merge commit is
byte-identical to a single process's; in one shared repository, and with two clones that share nothing but a
file:// git-lfs remote (torchrun's two-node launch, one clone per node). A rank killed in the middle leaves the
repository as it was."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import INJECT, git
from safetensors.torch import save_file

pytestmark = [pytest.mark.slow,  # torchrun launches, 10-20 s each
              pytest.mark.skipif(shutil.which("git-lfs") is None, reason="git-lfs not installed")]

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
MERGE = ["merge", "t0", "t1", "t2", "--strategy", "ties", "--set", "density=0.3", "--set", "lambda=1.2"]


def _state(seed: int, base: dict | None = None) -> dict:
    """Tensors of several sizes (so both ranks get work), one bf16, one left unchanged by every branch (it counts
    in TIES' whole-model top-k as zeros) and one changed by a single branch (git's one-sided shortcut)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {f"layer{i}.weight": (64 + 16 * i, 48) for i in range(6)} | {"emb.weight": (300, 32), "ln.bias": (48,)}
    if base is None:
        out = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
        out["head.weight"] = torch.randn(40, 16, generator=gen).to(torch.bfloat16)
        out["frozen.weight"] = torch.randn(32, 32, generator=gen)
        out["one_sided.weight"] = torch.randn(16, 16, generator=gen)
        return out
    out = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=gen)).to(v.dtype) for k, v in base.items()}
    out["frozen.weight"] = base["frozen.weight"]
    if seed != 1:
        out["one_sided.weight"] = base["one_sided.weight"]
    return out


def _commit(repo: Path, state: dict, msg: str) -> None:
    save_file(state, str(repo / "model.safetensors"))
    git(repo, "add", "model.safetensors", ".gitattributes")
    git(repo, "commit", "-q", "-m", msg)


def _three_branches(repo: Path) -> None:
    git(repo, "theta", "track", "*.safetensors")
    base = _state(0)
    _commit(repo, base, "base")
    for i in range(3):
        git(repo, "checkout", "-q", "-b", f"t{i}", "main")
        _commit(repo, _state(i + 1, base), f"task {i}")
    git(repo, "checkout", "-q", "main")


def _env(port_offset: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
            "TORCHRUN_TEST_PORT": str(29000 + (os.getpid() * 7 + port_offset) % 2000)}


def _port(env: dict[str, str]) -> str:
    return env["TORCHRUN_TEST_PORT"]


def _result(repo: Path) -> tuple[bytes, bytes]:
    """The merged metadata git stores and the merge commit's tree."""
    return (git(repo, "show", "HEAD:model.safetensors").stdout,
            git(repo, "rev-parse", "HEAD^{tree}").stdout.strip())


OTHERS = {"dare_ties": ["--set", "density=0.5", "--set", "seed=3"], "task_arithmetic": ["--set", "lambda=0.4"],
          "tsv_merge": []}


@pytest.mark.parametrize("strategy", ["dare_ties", "task_arithmetic", "tsv_merge"])
def test_other_strategies_are_byte_identical_too(repo: Path, tmp_path: Path, strategy: str) -> None:
    """Seeded strategies draw per tensor name (not from one stream), whole-tensor ones get whole tensors. An SVD
    (tsv_merge) depends on the number of threads LAPACK runs on, so the single process gets torchrun's one."""
    _three_branches(repo)
    merge = ["merge", "t0", "t1", "t2", "--strategy", strategy, *OTHERS[strategy]]
    single = tmp_path / "single"
    shutil.copytree(repo, single, symlinks=True)
    git(single, "theta", *merge, env={"OMP_NUM_THREADS": "1"})
    env = _env(5)
    proc = subprocess.run([*TORCHRUN, "--nproc-per-node", "2", "--master-port", _port(env), "-m", "gittheta_merge",
                           *merge], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _result(repo) == _result(single)


def test_two_ranks_in_one_repository_commit_what_one_process_commits(repo: Path, tmp_path: Path) -> None:
    _three_branches(repo)
    single = tmp_path / "single"
    shutil.copytree(repo, single, symlinks=True)
    git(single, "theta", *MERGE)
    env = _env(1)
    proc = subprocess.run([*TORCHRUN, "--nproc-per-node", "2", "--master-port", _port(env), "-m", "gittheta_merge",
                           *MERGE], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _result(repo) == _result(single)  # byte-identical merged metadata: every object equal
    assert (repo / "model.safetensors").read_bytes() == (single / "model.safetensors").read_bytes()
    assert proc.stdout.count("model.safetensors: strategy ties") == 1  # printed once (rank 0)
    assert "2 ranks (shared)" in proc.stdout
    for rank in (0, 1):  # each rank's own progress line (one stderr for all ranks: lines, not redrawn bars)
        line = next(ln for ln in proc.stderr.splitlines() if f"[rank {rank}/2] git-theta merge:" in ln)
        assert line.endswith(" done") and " tensors, " in line, line
    report = json.loads((repo / ".git" / "theta" / "merge-reports" / "model.safetensors.json").read_text())
    ranks = report["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["merged_bytes"] > 0 for r in ranks)
    merged = [t for t in report["tensors"] if t["action"] == "merge"]
    assert {t["rank"] for t in merged} == {0, 1}
    # balanced by bytes: the ranks differ by at most the largest tensor
    assert abs(ranks[0]["merged_bytes"] - ranks[1]["merged_bytes"]) <= 300 * 32 * 4
    one = json.loads((single / ".git" / "theta" / "merge-reports" / "model.safetensors.json").read_text())
    assert report["strategies"]["ties"] == one["strategies"]["ties"]  # the same global thresholds and sign
    assert git(repo, "status", "--porcelain").stdout == b""


def _clone(tmp_path: Path, remote: Path, name: str) -> Path:
    git(tmp_path, "clone", "-q", remote.as_uri(), name)
    path = tmp_path / name
    for key, value in (("user.email", "t@example.com"), ("user.name", "T")):
        git(path, "config", key, value)
    git(path, "theta", "install")
    for i in range(3):
        git(path, "branch", "-q", f"t{i}", f"origin/t{i}")
    return path


def test_two_clones_that_share_only_the_lfs_remote(repo: Path, tmp_path: Path) -> None:
    """torchrun's two-node launch, each node in its own clone: each fetches only its tensors' objects, rank 1
    uploads what it merged, rank 0 commits; the result equals a single-process merge's."""
    _three_branches(repo)
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(remote))
    git(repo, "remote", "add", "origin", remote.as_uri())
    git(repo, "push", "-q", "origin", "main", "t0", "t1", "t2")
    git(repo, "theta", *MERGE)  # the single-process reference, in the original repository
    nodes = [_clone(tmp_path, remote, f"node{r}") for r in range(2)]
    before = [set((n / ".git" / "lfs" / "objects").rglob("*")) for n in nodes]
    env = _env(2)
    procs = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1",
                               "--master-addr", "127.0.0.1", "--master-port", _port(env), "-m", "gittheta_merge",
                               *MERGE], cwd=nodes[r], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert _result(nodes[0]) == _result(repo)
    assert (nodes[0] / "model.safetensors").read_bytes() == (repo / "model.safetensors").read_bytes()
    assert "each rank its own clone" in outs[0][0]
    # rank 1 committed nothing and fetched only part of the branches' objects
    assert git(nodes[1], "rev-parse", "HEAD").stdout == git(repo, "rev-parse", "main^1").stdout
    report = json.loads((nodes[0] / ".git" / "theta" / "merge-reports" / "model.safetensors.json").read_text())
    assert report["ranks"][1]["objects_uploaded"] > 0 and report["ranks"][0]["objects_uploaded"] == 0
    wanted_all = {oid for b in ("t0", "t1", "t2")
                  for oid, _, _ in _meta(repo, b).iter_objects()}
    fetched_1 = {p.name for p in set((nodes[1] / ".git" / "lfs" / "objects").rglob("*")) - before[1] if p.is_file()}
    assert fetched_1 & wanted_all and not wanted_all <= fetched_1
    # the merge commit can be pushed from rank 0's clone and checked out elsewhere
    git(nodes[0], "push", "-q", "origin", "main")
    fresh = _clone(tmp_path, remote, "fresh")
    assert (fresh / "model.safetensors").read_bytes() == (repo / "model.safetensors").read_bytes()


def _meta(repo: Path, rev: str):  # noqa: ANN202
    from gittheta_merge.storage.gitutil import Repo
    from gittheta_merge.storage.revisions import read_metadata

    return read_metadata(Repo.discover(repo), rev, "model.safetensors")


def test_a_killed_rank_leaves_the_repository_as_it_was(repo: Path, tmp_path: Path) -> None:
    _three_branches(repo)
    head = git(repo, "rev-parse", "HEAD").stdout
    work = (repo / "model.safetensors").read_bytes()
    pidfile = tmp_path / "pause.pid"
    env = {**_env(3), "GITTHETA_TEST_PAUSE": f"object-written:1:{pidfile}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(INJECT), os.environ.get("PYTHONPATH", "")]))}
    proc = subprocess.Popen([*TORCHRUN, "--nproc-per-node", "2", "--master-port", _port(env), "-m", "gittheta_merge",
                             *MERGE], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not pidfile.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert pidfile.exists(), proc.communicate()[1][-3000:]
    time.sleep(0.5)  # the other rank reaches its own pause or a collective
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    (tmp_path / "pause.pid.go").touch()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "exitcode  : -9" in err or "Signal 9" in err or "SIGKILL" in err, err[-3000:]
    assert git(repo, "rev-parse", "HEAD").stdout == head
    assert git(repo, "status", "--porcelain").stdout == b""
    assert (repo / "model.safetensors").read_bytes() == work
    # (a killed rank 0 may leave its scratch index .git/theta/merge-index; the next merge overwrites it)
    git(repo, "theta", "fsck")
    # and the same merge then runs to the end
    env = _env(4)
    again = subprocess.run([*TORCHRUN, "--nproc-per-node", "2", "--master-port", _port(env), "-m", "gittheta_merge",
                            *MERGE], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
