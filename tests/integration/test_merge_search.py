"""`git theta merge … --search … --eval …`: candidate merges scored by the user's command in their own work trees, the
best committed as the merge commit, and an interrupted search resumed where it stopped."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import git
from safetensors.torch import load_file, save_file

pytest.importorskip("optuna")

# the score: minus the squared distance of the merged weights from base + 0.5 * (sum of task vectors), so task
# arithmetic's best lambda is exactly 0.5; every call is logged (trial number, lambda) to count evaluations
EVAL = '''
import json, os, sys
from pathlib import Path
from safetensors.torch import load_file
merged = load_file("model.safetensors")
target = load_file(os.environ["TARGET"])
log = Path(os.environ["EVAL_LOG"])
trial = int(os.environ["THETA_SEARCH_TRIAL"])
with log.open("a") as fh:
    fh.write(json.dumps([trial, json.loads(os.environ["THETA_SEARCH_PARAMS"])]) + "\\n")
fail_at = Path(os.environ["EVAL_LOG"] + ".fail-at")
if fail_at.exists() and trial == int(fail_at.read_text()):
    sys.exit("evaluation crashed")
loss = sum(float((merged[k] - target[k]).pow(2).sum()) for k in target)
print("loading the model... done")
print(json.dumps({"loss": loss, "score": -loss}))
'''


def _setup(repo: Path, tmp_path: Path) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(5)
    base = {f"w{i}": torch.randn(32, 16, generator=gen) for i in range(3)}
    tasks = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(2)]
    target = {k: base[k] + 0.5 * sum(t[k] - base[k] for t in tasks) for k in base}
    save_file(target, str(tmp_path / "target.safetensors"))
    git(repo, "theta", "track", "*.safetensors")
    (repo / "eval.py").write_text(EVAL)
    save_file(base, str(repo / "model.safetensors"))
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "base")
    for i, t in enumerate(tasks):
        git(repo, "checkout", "-q", "-b", f"t{i}", "main")
        save_file(t, str(repo / "model.safetensors"))
        git(repo, "commit", "-q", "-am", f"task {i}")
    git(repo, "checkout", "-q", "main")
    return base, target


def _env(tmp_path: Path) -> dict[str, str]:
    return {"TARGET": str(tmp_path / "target.safetensors"), "EVAL_LOG": str(tmp_path / "eval.log")}


def _evals(tmp_path: Path) -> list:
    path = tmp_path / "eval.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow  # a grid of candidates merged, checked out and scored (~28 s)
def test_grid_search_commits_the_best_candidate(repo: Path, tmp_path: Path) -> None:
    _, target = _setup(repo, tmp_path)
    head = git(repo, "rev-parse", "HEAD").stdout.strip()
    out = git(repo, "theta", "merge", "t0", "t1", "--strategy", "task_arithmetic", "--search", "lambda=0:2",
              "--sampler", "grid", "--eval", f"{sys.executable} eval.py", "--metric", "score",
              env=_env(tmp_path)).stdout.decode()
    assert sorted(p["lambda"] for _, p in _evals(tmp_path)) == [0.0, 0.5, 1.0, 1.5, 2.0]
    parents = git(repo, "rev-list", "--parents", "-n", "1", "HEAD").stdout.split()[1:]
    assert parents == [head, *(git(repo, "rev-parse", b).stdout.strip() for b in ("t0", "t1"))]
    got = load_file(str(repo / "model.safetensors"))
    for k in target:
        assert torch.allclose(got[k], target[k], atol=1e-6), k
    assert "lambda=0.5" in out and "committed trial" in out
    report = json.loads((repo / ".git" / "theta" / "merge-reports" / "model.safetensors.json").read_text())
    table = report["search"]["trials"]
    assert len(table) == 5 and report["search"]["best"]["params"] == {"lambda": 0.5}
    assert max(table, key=lambda r: r["score"])["commit"] == git(repo, "rev-parse", "HEAD").stdout.decode().strip()
    assert git(repo, "for-each-ref", "refs/theta/").stdout == b""  # the other candidates are released for gc
    assert git(repo, "worktree", "list").stdout.decode().count("\n") == 1  # no worktree left behind
    assert git(repo, "status", "--porcelain").stdout == b""


@pytest.mark.slow  # two searches, seven candidates merged, checked out and scored (~30 s)
def test_an_interrupted_search_resumes_and_starts_from_the_configured_parameters(repo: Path, tmp_path: Path) -> None:
    _setup(repo, tmp_path)
    head = git(repo, "rev-parse", "HEAD").stdout
    args = ["theta", "merge", "t0", "t1", "--strategy", "task_arithmetic", "--set", "lambda=1.0", "--search",
            "lambda=0:2", "--sampler", "random", "--trials", "4", "--eval", f"{sys.executable} eval.py",
            "--metric", "score"]
    (tmp_path / "eval.log.fail-at").write_text("2")
    failed = git(repo, *args, env=_env(tmp_path), check=False)
    assert failed.returncode != 0 and b"evaluation crashed" in failed.stderr
    assert git(repo, "rev-parse", "HEAD").stdout == head and git(repo, "status", "--porcelain").stdout == b""
    first = _evals(tmp_path)
    assert [t for t, _ in first] == [0, 1, 2] and first[0][1] == {"lambda": 1.0}  # the configured point first
    (tmp_path / "eval.log.fail-at").unlink()
    out = git(repo, *args, env=_env(tmp_path)).stdout.decode()
    assert "resuming search" in out and "2 of 4 trials already scored" in out
    again = _evals(tmp_path)[len(first):]
    assert [t for t, _ in again] == [3, 4]  # trials 0 and 1 were not merged or scored again
    report = json.loads((repo / ".git" / "theta" / "merge-reports" / "model.safetensors.json").read_text())
    rows = report["search"]["trials"]
    assert len(rows) == 4 and [r for r in rows if r["default"]][0]["params"] == {"lambda": 1.0}
    assert report["search"]["best"]["score"] >= [r for r in rows if r["default"]][0]["score"]


def test_search_mistakes_are_clear_and_change_nothing(repo: Path, tmp_path: Path) -> None:
    _setup(repo, tmp_path)
    head = git(repo, "rev-parse", "HEAD").stdout
    cases = [(["--search", "density=0.1:0.9", "--eval", "true"], b"has no parameter 'density'"),
             (["--search", "lambda=2:1", "--eval", "true"], b"LOW < HIGH"),
             (["--search", "lambda=0:1"], b"--search and --eval go together"),
             (["--search", "lambda=0:1", "--eval", "echo not-a-number"], b"neither a number nor JSON")]
    for extra, message in cases:
        proc = git(repo, "theta", "merge", "t0", "t1", "--strategy", "task_arithmetic", *extra, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (extra, proc.stderr)
        assert git(repo, "rev-parse", "HEAD").stdout == head
