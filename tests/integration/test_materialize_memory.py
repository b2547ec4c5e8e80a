"""A checkout under an address-space limit smaller than the model (prlimit --as, inherited by git, the filter
process and the hook): through git it fails, because git holds the whole smudged file in memory (and the old file is
already gone); materialized, it succeeds and the file is exact. Slow: it writes a 1.1 GB model twice."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import git, sha
from safetensors.torch import save_file

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) not installed")]
LIMIT = 800_000_000  # bytes of address space for every process of the checkout


@pytest.mark.parametrize("materialize", [False, True], ids=["through-git", "materialized"])
def test_checkout_under_a_memory_limit_smaller_than_the_model(repo: Path, materialize: bool) -> None:
    git(repo, "config", "theta.materializeBytes", str(1 << 20 if materialize else 1 << 50))
    git(repo, "theta", "track", "model.safetensors")
    base = torch.arange(4096 * 4096, dtype=torch.float32).reshape(4096, 4096)
    for version in (0, 1):  # 16 tensors of 64 MiB: 1.07 GB, every tensor different between the versions
        save_file({f"t{i}": base + (i + 100 * version) for i in range(16)}, repo / "model.safetensors")
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", f"v{version}")
        if version == 0:
            v0 = sha(repo / "model.safetensors")
    time.sleep(1.1)
    proc = subprocess.run(["prlimit", f"--as={LIMIT}", "git", "checkout", "-q", "HEAD~1"], cwd=repo,
                          capture_output=True, text=True)
    if not materialize:
        assert proc.returncode != 0 and "memory" in proc.stderr.lower(), proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    assert sha(repo / "model.safetensors") == v0
    assert git(repo, "status", "--porcelain").stdout == b""


def test_git_theta_add_under_a_memory_limit_smaller_than_the_model(repo: Path) -> None:
    """`git theta add` maps the file to hash it in the page cache; where the address space cannot hold the mapping
    it reads the file in blocks instead, and stages what `git add` stages."""
    git(repo, "theta", "track", "model.safetensors")
    base = torch.arange(4096 * 4096, dtype=torch.float32).reshape(4096, 4096)
    save_file({f"t{i}": base + i for i in range(16)}, repo / "model.safetensors")  # 1.07 GB
    proc = subprocess.run(["prlimit", f"--as={LIMIT}", "git", "theta", "add", "model.safetensors"], cwd=repo,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    staged = git(repo, "ls-files", "-s", "model.safetensors").stdout.split()[1]
    git(repo, "rm", "-q", "--cached", "model.safetensors")
    git(repo, "add", "model.safetensors")  # the reference: piped through git's filter
    assert git(repo, "ls-files", "-s", "model.safetensors").stdout.split()[1] == staged
