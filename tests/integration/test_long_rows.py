"""Tensors whose single row is larger than the block limit (a [1, 2**34] F32 tensor is 64 GB in one row): they are
stored as byte-range parts of at most theta.blockBytes, so add, checkout, fsck and merge hold one block, not one row;
a header that claims such a tensor in a small file is refused in one line with bounded memory."""

from __future__ import annotations

import resource
import struct
import subprocess
import sys
from pathlib import Path

import torch
from conftest import git, sha, store_objects
from safetensors.torch import load_file, save_file

from gittheta_merge.storage.metadata import Metadata

BLOCK = 4096  # theta.blockBytes for these tests: a row of 3,000 F32 values (12 KB) spans 3 parts


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"long": torch.randn(1, 3000, generator=g), "two_rows": torch.randn(2, 1500, generator=g),
            "flat": torch.randn(5000, generator=g), "small": torch.randn(4, 4, generator=g)}


def _committed_meta(repo: Path, rev: str = "HEAD") -> Metadata:
    return Metadata.from_bytes(git(repo, "show", f"{rev}:model.safetensors").stdout)


def test_long_rows_are_stored_in_parts_and_check_out_byte_exact(repo: Path) -> None:
    git(repo, "config", "theta.blockBytes", str(BLOCK))
    git(repo, "theta", "track", "model.safetensors")
    save_file(_model(0), repo / "model.safetensors")
    original = sha(repo / "model.safetensors")
    git(repo, "add", "model.safetensors")
    git(repo, "commit", "-qm", "long rows")
    meta = _committed_meta(repo)
    by_name = meta.by_name()
    assert by_name["long"].split == "bytes" and by_name["long"].block_sizes() == [4096, 4096, 3808]
    assert by_name["two_rows"].split == "bytes" and len(by_name["two_rows"].blocks) == 3
    assert by_name["flat"].split == "rows" and sum(r for _, r in by_name["flat"].blocks) == 5000
    assert max(size for _, size, _ in meta.iter_objects()) <= BLOCK
    assert git(repo, "show", "HEAD:model.safetensors").stdout.startswith(b'{"gittheta": 2,')

    (repo / "model.safetensors").unlink()
    git(repo, "checkout", "--", "model.safetensors")
    assert sha(repo / "model.safetensors") == original
    fsck = git(repo, "theta", "fsck")
    assert b"0 corrupt, 0 missing" in fsck.stdout, fsck.stdout


def test_merge_of_long_rows_reads_and_writes_parts(repo: Path) -> None:
    git(repo, "config", "theta.blockBytes", str(BLOCK))
    git(repo, "theta", "track", "model.safetensors")
    base = _model(0)
    save_file(base, repo / "model.safetensors")
    git(repo, "add", "model.safetensors")
    git(repo, "commit", "-qm", "base")
    sides = {}
    for branch, seed in (("a", 1), ("b", 2)):
        git(repo, "checkout", "-qb", branch, "main")
        sides[branch] = {k: v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(seed))
                         for k, v in base.items()}
        save_file(sides[branch], repo / "model.safetensors")
        git(repo, "commit", "-qam", branch)
    git(repo, "checkout", "-q", "a")
    git(repo, "theta", "merge", "b", "--strategy", "task_arithmetic")
    merged = load_file(repo / "model.safetensors")
    for name, b in base.items():  # task arithmetic, lambda 1: base + sum of the task vectors, straight from the formula
        want = (b.double() + (sides["a"][name].double() - b.double()) + (sides["b"][name].double() - b.double()))
        assert torch.allclose(merged[name].double(), want, atol=1e-5), name
    meta = _committed_meta(repo)
    assert meta.by_name()["long"].split == "bytes"
    assert max(size for _, size, _ in meta.iter_objects()) <= BLOCK


def test_header_claiming_a_64_gb_row_is_refused_in_bounded_memory(repo: Path) -> None:
    git(repo, "theta", "track", "model.safetensors")
    header = b'{"w": {"dtype": "F32", "shape": [1, 17179869184], "data_offsets": [0, 68719476736]}}'
    header += b" " * (-len(header) % 8)
    (repo / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4096)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = git(repo, "add", "model.safetensors", check=False)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "Traceback" not in err and "MemoryError" not in err, err
    assert "model.safetensors" in err and "truncated" in err, err
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < max(before, 1) + 600_000  # KB: < 0.6 GB
    assert store_objects(repo) == set()
    assert b"model.safetensors" not in git(repo, "ls-files").stdout


def test_merge_refuses_a_row_it_cannot_hold_and_names_the_rule(repo: Path) -> None:
    from gittheta_merge.merge import plan as plan_mod

    git(repo, "theta", "track", "model.safetensors")
    base = {"w": torch.zeros(1, 300)}
    save_file(base, repo / "model.safetensors")
    git(repo, "add", "model.safetensors")
    git(repo, "commit", "-qm", "base")
    for branch, value in (("a", 1.0), ("b", 2.0)):
        git(repo, "checkout", "-qb", branch, "main")
        save_file({"w": torch.full((1, 300), value)}, repo / "model.safetensors")
        git(repo, "commit", "-qam", branch)
    git(repo, "checkout", "-q", "a")
    # the real limit is 1 GiB of float32 per row; a child process with it lowered to 1 KB shows the refusal
    code = ("import sys; from gittheta_merge.merge import plan; plan.MAX_MERGE_ROW_BYTES = 1024; "
            "from gittheta_merge.cli import main; sys.argv = ['git-theta', 'merge', 'b']; main()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "tensor 'w': one row of shape [1, 300] is 1.2 KB in float32" in proc.stderr, proc.stderr
    assert "--rule '^w$=ours'" in proc.stderr
    assert plan_mod.MAX_MERGE_ROW_BYTES == 1 << 30
    assert git(repo, "rev-parse", "HEAD").stdout == git(repo, "rev-parse", "a").stdout  # nothing committed
