"""End to end in real temp repos: the merge=theta driver under `git merge`, and `git theta merge`."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import git
from merge_helpers import family
from safetensors.torch import load_file, save_file


def commit_model(repo: Path, sd: dict, msg: str) -> None:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(repo / "model.safetensors"))
    git(repo, "add", "model.safetensors", ".gitattributes")
    git(repo, "commit", "-q", "-m", msg)


def setup(repo: Path, n_branches: int = 2):
    base, models = family(n_branches, seed=21)
    git(repo, "theta", "track", "*.safetensors")
    commit_model(repo, base, "base")
    for i, m in enumerate(models):
        git(repo, "checkout", "-q", "-b", f"t{i}", "main")
        changed = dict(base, **{k: m[k] for k in ("l0.weight", "l1.weight")})
        if i == 0:
            changed["l0.bias"] = m["l0.bias"]
        commit_model(repo, changed, f"task {i}")
    git(repo, "checkout", "-q", "main")
    return base, models


def test_git_merge_uses_the_driver(repo: Path) -> None:
    base, models = setup(repo)
    git(repo, "config", "theta.merge.strategy", "task_arithmetic")
    git(repo, "config", "theta.merge.lambda", "0.5")
    git(repo, "merge", "-q", "t0")  # fast-forward: no driver
    git(repo, "merge", "-q", "--no-edit", "t1")
    got = load_file(str(repo / "model.safetensors"))
    for k in ("l0.weight", "l1.weight"):
        want = base[k] + 0.5 * ((models[0][k] - base[k]) + (models[1][k] - base[k]))
        assert torch.allclose(got[k], want, atol=1e-6), k
    assert torch.equal(got["l0.bias"], models[0]["l0.bias"])  # one-sided change taken as is
    assert torch.equal(got["emb.weight"], base["emb.weight"])
    assert git(repo, "status", "--porcelain").stdout == b""
    assert (repo / ".git" / "theta" / "merge-reports" / "model.safetensors.json").exists()


def test_driver_failure_leaves_a_conflict_and_ours_intact(repo: Path) -> None:
    base, models = setup(repo)
    git(repo, "checkout", "-q", "t1")
    broken = dict(load_file(str(repo / "model.safetensors")), **{"l0.weight": torch.randn(3, 16)})
    commit_model(repo, broken, "reshape head")
    git(repo, "checkout", "-q", "t0")
    ours_bytes = (repo / "model.safetensors").read_bytes()
    proc = git(repo, "merge", "--no-edit", "t1", check=False)
    assert proc.returncode != 0
    assert b"'l0.weight'" in proc.stderr and b"shapes differ" in proc.stderr
    assert (repo / "model.safetensors").read_bytes() == ours_bytes
    assert b"UU model.safetensors" in git(repo, "status", "--porcelain").stdout
    git(repo, "merge", "--abort")


def test_git_theta_merge_three_branches_one_commit(repo: Path) -> None:
    base, models = setup(repo, 3)
    (repo / "notes.txt").write_text("hello\n")
    git(repo, "add", "notes.txt")
    git(repo, "commit", "-q", "-m", "notes")
    git(repo, "checkout", "-q", "t2")
    (repo / "other.txt").write_text("from t2\n")
    git(repo, "add", "other.txt")
    git(repo, "commit", "-q", "-m", "plain file on t2")
    git(repo, "checkout", "-q", "main")
    head = git(repo, "rev-parse", "HEAD").stdout.strip()
    dry = git(repo, "theta", "merge", "t0", "t1", "t2", "--strategy", "ties", "--dry-run")
    assert b"peak" in dry.stdout
    assert git(repo, "rev-parse", "HEAD").stdout.strip() == head
    git(repo, "theta", "merge", "t0", "t1", "t2", "--strategy", "task_arithmetic", "--set", "lambda=0.3")
    parents = git(repo, "rev-list", "--parents", "-n", "1", "HEAD").stdout.split()[1:]
    want_parents = [head] + [git(repo, "rev-parse", b).stdout.strip() for b in ("t0", "t1", "t2")]
    assert parents == want_parents
    got = load_file(str(repo / "model.safetensors"))
    for k in ("l0.weight", "l1.weight"):
        want = base[k] + 0.3 * sum(m[k] - base[k] for m in models)
        assert torch.allclose(got[k], want, atol=1e-6), k
    assert torch.equal(got["l0.bias"], models[0]["l0.bias"])
    assert (repo / "other.txt").read_text() == "from t2\n" and (repo / "notes.txt").exists()
    assert git(repo, "status", "--porcelain").stdout == b""


def test_git_theta_merge_from_the_base_averages_only_the_branches(repo: Path) -> None:
    """HEAD = the base model (main) has no opinion, as in git: average(t0, t1), not average(base, t0, t1)."""
    base, models = setup(repo, 2)
    out = git(repo, "theta", "merge", "t0", "t1", "--strategy", "average")
    assert b"unchanged from the merge base in HEAD" in out.stdout
    got = load_file(str(repo / "model.safetensors"))
    for k in ("l0.weight", "l1.weight"):
        want = (models[0][k] + models[1][k]) / 2
        assert torch.allclose(got[k], want, atol=1e-6), k
    assert torch.equal(got["l0.bias"], models[0]["l0.bias"])
    assert len(git(repo, "rev-list", "--parents", "-n", "1", "HEAD").stdout.split()) == 4
