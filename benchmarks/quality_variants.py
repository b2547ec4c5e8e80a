"""RegMean variants on a seed of the seven-task benchmark: why RegMean sits below task arithmetic there.

    python benchmarks/quality_variants.py --seed N --workdir /tmp/q7sN \
        --state benchmarks/results/quality/multitask/seed-N/state

Runs on the task branches of a quality.py run (its --workdir, finished or still running: the repository is copied
first, objects hard-linked, so the run is not disturbed), with that run's settings, data splits and evaluation.
Each variant's grid is chosen on validation and the chosen point scored on test, exactly as quality.py does:

  regmean-normalize  `--set normalize=true` (mean Grams: each task weighs the same whatever its token count), over
                     regmean's own alpha grid
  regmean-ta-rest    RegMean (alpha 1) for the linear layers, and the tensors that have no Gram (embeddings,
                     LayerNorms, biases), which RegMean averages, merged by task arithmetic instead, through a
                     per-tensor rule (`--rule RE=task_arithmetic:lambda=L`), L in 0.3 .. 2.0

Writes benchmarks/results/quality/multitask/seed-N/variants.json and prints one line per variant beside the
seed's own regmean and task_arithmetic rows (from --state).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality as q  # noqa: E402

NO_GRAM = r"^bert\.embeddings\.|^bert\.encoder\..*(LayerNorm|\.bias$)"  # the pooler and heads keep their rule
BENCHMARK_GRID = q.grid  # quality.py's own grids (the variants replace q.grid while they run)
VARIANTS = {
    "regmean-normalize": lambda size: [{**p, "normalize": "true"} for p in BENCHMARK_GRID("regmean", size)],
    "regmean-ta-rest": lambda size: [{"alpha": 1.0, "rest_lambda": x} for x in (0.3, 0.5, 0.7, 1.0, 1.5, 2.0)],
}


def merge_args(params: dict[str, Any]) -> list[str]:
    """`--set` for regmean's own parameters, a `--rule` for the tensors without a Gram."""
    own = {k: v for k, v in params.items() if k != "rest_lambda"}
    args = [arg for k, v in own.items() for arg in ("--set", f"{k}={v}")]
    if "rest_lambda" in params:
        args += ["--rule", f"{NO_GRAM}=task_arithmetic:lambda={params['rest_lambda']}"]
    return args


def copy_repo(src: Path, dst: Path) -> None:
    """The run's repository without disturbing it: everything copied but the object store, which is hard-linked
    (objects are written once, by rename, and never changed)."""
    shutil.rmtree(dst, ignore_errors=True)
    objects = Path(".git") / "lfs" / "objects"

    def ignore(folder: str, names: list[str]) -> list[str]:
        return ["objects"] if Path(folder) == src / objects.parent else []

    shutil.copytree(src, dst, symlinks=True, ignore=ignore)
    if (src / objects).exists():
        shutil.copytree(src / objects, dst / objects, copy_function=os.link)
    for lock in (dst / ".git").glob("*.lock"):
        lock.unlink()


def main() -> None:
    import torch
    import transformers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--workdir", type=Path, required=True, help="the quality.py run's --workdir")
    ap.add_argument("--state", type=Path, required=True, help="the quality.py run's --state")
    ap.add_argument("--scratch", type=Path, default=None, help="where the copy goes (default WORKDIR-variants)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args()
    transformers.logging.set_verbosity_error()
    torch.use_deterministic_algorithms(True)
    s = q.Settings(**json.loads((a.state / "settings.json").read_text()))
    if s.seed != a.seed:
        raise SystemExit(f"{a.state} holds seed {s.seed}, not {a.seed}")
    work = a.scratch or Path(f"{a.workdir}-variants")
    copy_repo(a.workdir / "repo", work / "repo")
    g = q.Git(work / "repo")
    g("checkout", "-q", "-f", "main")
    tasks = [q.load_task(n, s.seed, s.n_train, s.n_val, s.n_test) for n in s.tasks]
    tok = transformers.AutoTokenizer.from_pretrained(q.minilm_dir())
    rows = {t.name: {sp: q.tokenize(tok, getattr(t, sp), s.max_length) for sp in ("train", "val", "test")}
            for t in tasks}
    facts: dict[str, Any] = {"tasks": {}}
    for t in tasks:  # every task finished in that run: facts from its state, heads from its branches
        if not (a.state / f"task-{t.name}.json").exists():
            raise SystemExit(f"{t.name} has not finished in that run yet")
        q.train_branch(g, t, rows[t.name], s, work / "data", a.state, facts)
    heads = {t.name: work / "heads" / t.name for t in tasks}
    for t in tasks:
        heads[t.name].mkdir(parents=True, exist_ok=True)
        (heads[t.name] / "config.json").write_text(g("show", f"{t.name}:heads/{t.name}/config.json"))
    out_path = q.RAW_RESULTS / "multitask" / f"seed-{s.seed}" / "variants.json"
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    own_set_args = q.set_args
    for name in a.variants.split(","):
        q.grid, q.set_args = (lambda strategy, size, name=name: VARIANTS[name](size)), merge_args
        try:
            shutil.rmtree(work / "done", ignore_errors=True)
            (work / "done").mkdir(parents=True)
            entry, (merge_s, eval_s) = q.choose_and_test(g, tasks, "regmean", s, rows, heads, work, work / "done",
                                                         facts["tasks"])
        finally:
            q.grid, q.set_args = BENCHMARK_GRID, own_set_args
        entry.pop("grid_best_report", None)
        for point in entry["grid"]:
            point.pop("report", None)
        results[name] = {**entry, "merge_seconds": round(merge_s, 1), "eval_seconds": round(eval_s, 1)}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1))
    for name in ("task_arithmetic", "regmean"):
        own = a.state / f"{len(tasks)}-{name}.json"
        if own.exists():
            results = {name: json.loads(own.read_text()), **results}
    for name, r in results.items():
        print(f"seed {s.seed} {name:18s} chose {r['chosen']}: normalised {r['normalized_mean']:.4f}, test mean "
              f"{r['test_mean']:.4f}, " + " ".join(f"{k} {v:.3f}" for k, v in r["test"].items()))


if __name__ == "__main__":
    main()
