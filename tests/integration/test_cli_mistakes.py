"""User mistakes through the real CLI: each ends with exit code 1 or 2 (click's usage errors), a message that
says what is wrong, and no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import git, random_state
from safetensors.torch import save_file

GIT_THETA = [sys.executable, "-m", "gittheta_merge"]


@pytest.fixture
def setup(repo: Path) -> Path:
    git(repo, "theta", "track", "model.safetensors")
    save_file(random_state(2), repo / "model.safetensors")
    save_file(random_state(2, seed=1), repo / "a.safetensors")
    save_file(random_state(2, seed=2), repo / "b.safetensors")
    save_file(random_state(2, seed=3, shape=(8, 8)), repo / "other-shape.safetensors")
    (repo / "notes.txt").write_text("not a checkpoint\n")
    (repo / "data.xml").write_text("<x/>\n")
    (repo / "frankenmerge.yml").write_text("merge_method: passthrough\nslices:\n  - sources: []\n")
    git(repo, "add", "model.safetensors", ".gitattributes")
    git(repo, "commit", "-qm", "model")
    git(repo, "checkout", "-q", "-b", "side")
    save_file(random_state(2, seed=5), repo / "model.safetensors")
    git(repo, "commit", "-qam", "side")
    git(repo, "checkout", "-q", "main")
    save_file(random_state(2, seed=6), repo / "model.safetensors")
    git(repo, "commit", "-qam", "main moves on")
    return repo


MERGE = ["merge-files", "a.safetensors", "b.safetensors", "-o", "out.safetensors"]

MISTAKES = [
    (MERGE + ["--strategy", "nosuch"], "nosuch"),
    (["merge-files", "--config", "nosuch.yml", "-o", "out.safetensors"], "nosuch.yml"),
    (["merge-files", "--config", "frankenmerge.yml", "-o", "out.safetensors"], "`slices` is not supported"),
    (["merge-files", "a.safetensors", "--config", "frankenmerge.yml", "-o", "out.safetensors"], "drop MODELS"),
    (["merge", "--config", "frankenmerge.yml"], "`slices` is not supported"),
    (["merge", "side", "--config", "frankenmerge.yml"], "drop BRANCH"),
    (MERGE + ["--strategy", "average", "--set", "weights=x,y"], "weights"),
    (MERGE + ["--strategy", "average", "--set", "nosuch=1"], "nosuch"),
    (MERGE + ["--strategy", "ties", "--set", "density=2"], "density"),
    (MERGE + ["--strategy", "ties"], "base"),
    (MERGE + ["--rule", "((=keep"], "(("),
    (MERGE + ["--rule", "x=explode"], "explode"),
    (MERGE + ["--device", "cuda"], "cuda"),
    (["merge-files", "a.safetensors", "notes.txt", "-o", "out.safetensors"], "notes.txt"),
    (["merge-files", "a.safetensors", "other-shape.safetensors", "-o", "out.safetensors"], "shape"),
    (["merge-files", "a.safetensors", "missing.safetensors", "-o", "out.safetensors"], "missing.safetensors"),
    (["gc", "--prune", "soon"], "soon"),
    (["diff", "nosuchrev"], "nosuchrev"),
    (["ls", "--rev", "nosuchrev"], "nosuchrev"),
    (["merge", "nosuchbranch"], "nosuchbranch"),
    (["merge", "HEAD", "--strategy", "nosuch"], "nosuch"),
    (["merge", "side", "--strategy", "nosuch"], "nosuch"),
    (["merge", "side", "--strategy", "fisher"], "statistic"),
    (["stats", "compute", "model.safetensors", "--kind", "fisher", "--data", "data.xml"], "--config"),
    (["stats", "compute", "model.safetensors", "--kind", "fisher", "--data", "nofile.jsonl"], "nofile.jsonl"),
    (["stats", "add", "notes.txt", "model.safetensors", "--kind", "fisher"], "notes.txt"),
    (["stats", "ls", "nosuchdir"], "nosuchdir"),
    (["install", "--scope", "planet"], "planet"),
]


@pytest.mark.parametrize("args,needle", MISTAKES, ids=[" ".join(a)[:60] for a, _ in MISTAKES])
def test_mistake_gets_a_clear_message_without_traceback(setup: Path, args: list[str], needle: str) -> None:
    proc = subprocess.run(GIT_THETA + args, cwd=setup, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode in (1, 2), out
    assert "Traceback" not in out and "internal error" not in out, out
    assert needle in out, out
    assert not (setup / "out.safetensors").exists()


def test_outside_a_repository(tmp_path: Path) -> None:
    for args in (["track", "x.safetensors"], ["fsck"], ["gc"], ["ls"]):
        proc = subprocess.run(GIT_THETA + args, cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "not inside a git work tree" in proc.stderr, proc.stderr


def test_help_outside_a_repository_prints_only_the_help(tmp_path: Path) -> None:
    """Every command first writes placeholder models into the work tree; outside one there is nothing to write and
    nothing to warn about (it printed 'could not write the placeholders … not inside a git work tree')."""
    for command in (["merge", "--help"], ["stats", "compute", "--help"], ["ls", "--help"]):
        proc = subprocess.run([*GIT_THETA, *command], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout.startswith("Usage:") and proc.stderr == "", (command, proc.stderr)
