"""`git theta stats compute` under `torchrun --nproc-per-node 2` (gloo, CPU): each rank takes every second example,
the sums and counts are all-reduced, and rank 0 stages one blob equal to a single-process run's (tensors within
1e-6 relative, counts exactly)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import git

from gittheta_merge.stats import statistic_from_bytes
from gittheta_merge.stats.attach import blob_path
from gittheta_merge.storage.gitutil import Repo
from gittheta_merge.storage.revisions import read_metadata
from gittheta_merge.storage.store import ObjectStore

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
pytestmark = pytest.mark.slow  # three torchrun launches, about 20 s each


def _staged(repo: Path, kind: str):  # noqa: ANN202
    r = Repo.discover(repo)
    meta = read_metadata(r, ":", "model/model.safetensors")
    return statistic_from_bytes(blob_path(ObjectStore.for_repo(r), meta, kind, "model").read_bytes())


@pytest.mark.parametrize("kind", ["fisher", "gram"])
def test_two_ranks_stage_what_one_process_stages(hf_repo: Path, tmp_path: Path, kind: str) -> None:
    rows = (hf_repo / "train.jsonl").read_text()
    (hf_repo / "train.jsonl").write_text(rows * 3)  # 15 examples: rank 0 takes 8, rank 1 takes 7
    single = tmp_path / "single"
    shutil.copytree(hf_repo, single, symlinks=True)
    args = ["stats", "compute", "model", "--kind", kind, "--data", "train.jsonl", "--n-examples", "15",
            "--batch-size", "4", "--max-length", "16"]
    git(single, "theta", *args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run([*TORCHRUN, "--nproc-per-node", "2", "--master-port", str(29500 + os.getpid() % 1000),
                           "-m", "gittheta_merge", *args], cwd=hf_repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("staged") == 1 and "rank 1 of 2" in proc.stderr
    for rank in (0, 1):  # every rank reports its own share: examples and tokens
        assert any(ln.startswith(f"[rank {rank}/2] {kind}") and ln.endswith(" done") and " examples, " in ln
                   for ln in proc.stderr.splitlines()), proc.stderr[-2000:]
    one, two = _staged(single, kind), _staged(hf_repo, kind)
    assert set(one.tensors) == set(two.tensors)
    # per-example products are formed in float32 in batches padded differently, so the sums agree to float32
    # rounding, not bit for bit; a key bias's Fisher is zero in exact arithmetic (softmax ignores it), pure rounding
    # noise either way: it is judged against the statistic's scale
    scale = max(float(v.norm()) for v in one.tensors.values())
    for key, value in one.tensors.items():
        diff = float((two.tensors[key] - value).norm())
        assert diff <= 1e-6 * float(value.norm()) + 1e-9 * scale, (key, diff, float(value.norm()))
    for field in ("n_examples", "tokens", "counts", "sharing"):
        assert two.provenance[field] == one.provenance[field], field
    assert two.provenance["distributed"]["world_size"] == 2 and "distributed" not in one.provenance


def test_a_run_that_cannot_be_sharded_the_same_way_is_refused(hf_repo: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run([*TORCHRUN, "--nproc-per-node", "2", "--master-port", str(30500 + os.getpid() % 1000),
                           "-m", "gittheta_merge", "stats", "compute", "model", "--kind", "fisher", "--data",
                           "train.jsonl", "--label-policy", "sampled", "--n-examples", "4"], cwd=hf_repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "sampled label policy" in proc.stderr
    assert git(hf_repo, "status", "--porcelain").stdout.decode().strip() == ""  # nothing staged
