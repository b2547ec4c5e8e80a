"""Hostile input that used to end in a traceback: JSON nested 1,000 levels deep in a safetensors header (git add)
and in a committed metadata file (checkout, fsck, both merge paths). Each gets one line naming the file, stores
nothing, and leaves the repository as it was."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

from conftest import git, random_state, store_objects
from safetensors.torch import save_file

DEPTH = 1000


def nested(depth: int = DEPTH) -> bytes:
    return b"[" * depth + b"]" * depth


def assert_one_line(proc: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    err = proc.stderr.decode() + proc.stdout.decode()
    assert proc.returncode != 0, err
    assert "Traceback" not in err and "internal error" not in err and "RecursionError" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_deeply_nested_safetensors_header_is_refused_on_add(repo: Path) -> None:
    git(repo, "theta", "track", "model.safetensors")
    header = b'{"x":' + nested() + b"}"
    header += b" " * (-len(header) % 8)
    (repo / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    proc = git(repo, "add", "model.safetensors", check=False)
    assert_one_line(proc, "model.safetensors", "nested too deeply")
    assert store_objects(repo) == set()
    assert b"model.safetensors" not in git(repo, "ls-files").stdout


def _commit_raw_metadata(repo: Path, path: str, data: bytes, message: str) -> None:
    """Commit bytes as the metadata of a tracked file, as a hostile commit would (no filter involved)."""
    blob = git(repo, "hash-object", "-w", "--no-filters", "--stdin", input=data).stdout.decode().strip()
    git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}")
    git(repo, "commit", "-qm", message)


def test_deeply_nested_metadata_file_fails_checkout_fsck_and_merges_in_one_line(repo: Path) -> None:
    git(repo, "theta", "track", "model.safetensors")
    save_file(random_state(2), repo / "model.safetensors")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "good")
    good = (repo / "model.safetensors").read_bytes()
    git(repo, "checkout", "-q", "-b", "hostile")
    _commit_raw_metadata(repo, "model.safetensors",
                         b'{"gittheta": 1, "format": "safetensors", "x": ' + nested() + b', "tensors": []}\n',
                         "hostile metadata")
    git(repo, "checkout", "-q", "-f", "main")
    assert (repo / "model.safetensors").read_bytes() == good

    proc = git(repo, "checkout", "hostile", check=False)
    assert_one_line(proc, "model.safetensors", "nested too deeply")
    git(repo, "checkout", "-q", "-f", "main")
    assert (repo / "model.safetensors").read_bytes() == good

    assert_one_line(git(repo, "theta", "fsck", check=False), "model.safetensors", "nested too deeply")

    git(repo, "checkout", "-q", "-b", "other", "main")
    save_file(random_state(2, seed=3), repo / "model.safetensors")
    git(repo, "commit", "-qam", "other")
    proc = git(repo, "merge", "--no-edit", "hostile", check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr.decode() + proc.stdout.decode()
    git(repo, "merge", "--abort")
    proc = subprocess.run([sys.executable, "-m", "gittheta_merge", "merge", "hostile"], cwd=repo, capture_output=True)
    assert_one_line(proc, "nested too deeply")
    assert git(repo, "status", "--porcelain", "--untracked-files=no").stdout == b""
