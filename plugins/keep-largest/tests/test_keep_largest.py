"""The plugin end to end: installed as its own distribution, found through its entry point by `git theta merge`
in a real repository and by `git theta strategies`; results equal the rule computed independently with torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("gittheta_keep_largest", reason="plugin not installed: pip install -e plugins/keep-largest")

GIT_THETA = [sys.executable, "-m", "gittheta_merge"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def expected(base: dict, models: list[dict], lam: float = 1.0, relative: bool = True) -> dict:
    out = {}
    for name, b in base.items():
        b64 = b.double()
        sizes = [float((m[name].double() - b64).norm()) / (float(b64.norm()) if relative else 1.0) for m in models]
        best = max(range(len(models)), key=lambda i: (sizes[i], -i))
        out[name] = (b64 + lam * (models[best][name].double() - b64)).float()
    return out


@pytest.fixture
def family() -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(0)
    base = {f"t{i}": torch.randn(300, 64, generator=g) for i in range(4)}  # 4 tensors of 75 KB: several chunks
    a = {k: v.clone() for k, v in base.items()}
    b = {k: v.clone() for k, v in base.items()}
    a["t0"] += 0.5 * torch.randn(300, 64, generator=g)   # a moves t0 and t1 a lot, t2 a little
    a["t1"] += 0.3 * torch.randn(300, 64, generator=g)
    a["t2"] += 0.01 * torch.randn(300, 64, generator=g)
    b["t1"] += 0.05 * torch.randn(300, 64, generator=g)  # b moves t2 a lot, t1 a little; t3 stays the base
    b["t2"] += 0.4 * torch.randn(300, 64, generator=g)
    return base, [a, b]


def test_git_theta_merge_with_the_plugin_strategy(tmp_path: Path, family) -> None:
    base, (a, b) = family
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "T")
    subprocess.run(GIT_THETA + ["install"], cwd=repo, check=True, capture_output=True)
    subprocess.run(GIT_THETA + ["track", "model.safetensors"], cwd=repo, check=True, capture_output=True)
    save_file(base, repo / "model.safetensors")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "base")
    for name, state in (("a", a), ("b", b)):
        git(repo, "checkout", "-q", "-b", name, "main")
        save_file(state, repo / "model.safetensors")
        git(repo, "commit", "-qam", name)
    git(repo, "checkout", "-q", "main")
    proc = subprocess.run(GIT_THETA + ["merge", "a", "b", "--strategy", "keep_largest"], cwd=repo,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = load_file(str(repo / "model.safetensors"))
    want = expected(base, [a, b])
    for name in base:
        assert torch.equal(got[name], want[name]), name
    assert torch.equal(got["t0"], a["t0"]) and torch.equal(got["t2"], b["t2"]) and torch.equal(got["t3"], base["t3"])
    assert len(git(repo, "log", "-1", "--format=%P").split()) == 3  # one merge commit: HEAD, a, b


@pytest.mark.parametrize("lam,relative", [(0.5, True), (1.0, False)])
def test_merge_files_parameters(tmp_path: Path, family, lam: float, relative: bool) -> None:
    base, models = family
    paths = []
    for i, state in enumerate([base, *models]):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(state, paths[-1])
    out = tmp_path / "out.safetensors"
    subprocess.run(GIT_THETA + ["merge-files", str(paths[1]), str(paths[2]), "--base", str(paths[0]), "-o", str(out),
                                "--strategy", "keep_largest", "--set", f"lambda={lam}",
                                "--set", f"relative={str(relative).lower()}"], check=True, capture_output=True)
    got = load_file(str(out))
    want = expected(base, models, lam, relative)
    for name in base:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)


def test_listed_by_git_theta_strategies() -> None:
    out = subprocess.run(GIT_THETA + ["strategies", "keep_largest"], capture_output=True, text=True, check=True,
                         env={**os.environ}).stdout
    assert out.startswith("keep_largest  [needs a base") and "--set relative=<bool>" in out
