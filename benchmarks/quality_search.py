"""Does `git theta merge --search` find better parameters than the defaults? The quality benchmark's real merge
(all-MiniLM-L6-v2 fine-tuned on sentiment, TREC and SMS spam; benchmarks/quality.py), searched on validation accuracy,
the chosen point then scored once on the held-out test split.

    python benchmarks/quality.py --seeds 0 --workdir /tmp/q --out /tmp/qout      # (or any earlier run's workdir)
    python benchmarks/quality_search.py --workdir /tmp/q --seed 0 [--strategy ties] \
        [--space "density=0.1:0.9,lambda=0.5:2.0"] [--trials 16] [--sampler tpe] [--out docs/results/search.md]

It works in the quality run's repository (its task branches, heads and statistics as committed) on a new branch from
main: `git theta merge <tasks> --strategy S --search SPACE --eval "python <scratch>/eval.py" --metric val_mean`.
The evaluation script (written by this benchmark) scores the candidate's encoder on each task's validation split with
that task's fine-tuned head (the heads are left out of every merge, as in the quality benchmark) and prints JSON.
Afterwards the configured point (the strategy's defaults: the first trial) and the chosen point are scored on the
test split. A results page with the table and the command goes to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from quality import HEAD, Git, evaluate_encoder, load_task, minilm_dir, raw_dir, tokenize  # noqa: E402

EVAL = '''
"""Validation score (accuracy; entity F1 for a token task) of the candidate encoder in the current directory, per
task with its own head (JSON)."""
import json, sys
sys.path.insert(0, {bench!r})
import torch
from safetensors.torch import load_file
from quality import Task, evaluate_encoder
torch.manual_seed(0)
data = json.load(open({data!r}))
state = load_file("model/model.safetensors")
scores = {{}}
for name, task in data.items():
    head = load_file(task["head"])
    t = Task(name, task["labels"], [], [], [], head, kind=task["kind"])
    scores[name] = evaluate_encoder(state, t, [tuple(r) for r in task["val"]], task["config"])
print(json.dumps({{"val_mean": sum(scores.values()) / len(scores), **scores}}))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True, help="a quality.py run's workdir (its repo/ inside)")
    ap.add_argument("--seed", type=int, default=0, help="the seed that run used (it fixes the data splits)")
    ap.add_argument("--tasks", default="sentiment,trec,spam")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--strategy", default="ties")
    ap.add_argument("--space", default="density=0.1:0.9,lambda=0.5:2.0")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--sampler", default="tpe")
    ap.add_argument("--out", type=Path, default=None, help="results page (markdown); JSON beside it")
    a = ap.parse_args()
    import transformers

    started = time.time()
    g = Git(a.workdir / "repo")
    names = a.tasks.split(",")
    tasks = [load_task(n, a.seed, a.n_train, a.n_val, a.n_test) for n in names]
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    scratch = Path(tempfile.mkdtemp(prefix="theta-search-bench-"))
    data = {}
    g("checkout", "-q", "-f", "main")
    for t in tasks:  # each task's fine-tuned head and head config, from its branch
        g("checkout", "-q", t.name)
        t.head = {k: v for k, v in g.model().items() if k.startswith(HEAD)}
        from safetensors.torch import save_file

        save_file(t.head, str(scratch / f"{t.name}-head.safetensors"))
        (scratch / t.name).mkdir()
        (scratch / t.name / "config.json").write_text((g.root / "heads" / t.name / "config.json").read_text())
        data[t.name] = {"labels": t.labels, "kind": t.kind, "head": str(scratch / f"{t.name}-head.safetensors"),
                        "config": str(scratch / t.name), "val": tokenize(tok, t.val, a.max_length)}
    (scratch / "data.json").write_text(json.dumps(data))
    (scratch / "eval.py").write_text(EVAL.format(bench=str(Path(__file__).resolve().parent),
                                                 data=str(scratch / "data.json")))
    g("checkout", "-q", "-B", f"search-{a.strategy}", "main")
    cmd = ["git", "theta", "merge", *names, "--strategy", a.strategy, "--search", a.space, "--eval",
           f"{sys.executable} {scratch / 'eval.py'}", "--metric", "val_mean", "--trials", str(a.trials),
           "--sampler", a.sampler]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=g.root, env={**g.env, "HF_HUB_OFFLINE": "1"}, text=True, capture_output=True)
    search_s = time.time() - t0
    print(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    report = json.loads((g.root / ".git" / "theta" / "merge-reports" / "model_model.safetensors.json").read_text())
    search = report["search"]
    default = next(r for r in search["trials"] if r["default"])
    best = search["best"]
    test_rows = {t.name: tokenize(tok, t.test, a.max_length) for t in tasks}
    test = {}
    for label, commit in (("configured", default["commit"]), ("searched", best["commit"])):
        if label == "configured":  # its candidate ref is gone: the commit object is still there (until gc)
            g("checkout", "-q", commit)
        else:
            g("checkout", "-q", f"search-{a.strategy}")
        state = g.model()
        torch.manual_seed(0)
        test[label] = {t.name: evaluate_encoder(state, t, test_rows[t.name], Path(data[t.name]["config"]))
                       for t in tasks}
    g("checkout", "-q", f"search-{a.strategy}")
    result = {"command": " ".join(["python benchmarks/quality_search.py", *sys.argv[1:]]), "search_command": cmd,
              "seed": a.seed, "search": search, "test": test, "search_seconds": round(search_s, 1),
              "wall_seconds": round(time.time() - started, 1), "load_average": os.getloadavg()}
    lines = page(result, default, best, names)
    print("\n".join(lines))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text("\n".join(lines) + "\n")
        raw = raw_dir(a.out.parent)  # the raw JSON outside docs/ when the page is under docs/results/
        raw.mkdir(parents=True, exist_ok=True)
        (raw / a.out.with_suffix(".json").name).write_text(json.dumps(result, indent=1))


def page(r: dict, default: dict, best: dict, names: list[str]) -> list[str]:
    s = r["search"]
    mean = {k: sum(v.values()) / len(v) for k, v in r["test"].items()}
    lines = ["# Parameter search through git: `git theta merge --search` on the quality benchmark's merge", "",
             f"Produced by `{r['command']}` (seed {r['seed']}; the search {r['search_seconds'] / 60:.1f} min, "
             f"all {r['wall_seconds'] / 60:.1f} min; load average at the end {r['load_average'][0]:.1f}).", "",
             f"The search: `{' '.join(r['search_command'][:-8])} …` ({s['sampler']} sampler, {len(s['trials'])} "
             f"trials, score = mean validation accuracy over {', '.join(names)}, each task with its own fine-tuned "
             "head). The first trial is the strategy's configured parameters.", "",
             "| | parameters | validation mean | " + " | ".join(f"test {n}" for n in names) + " | test mean |",
             "|---|---|---|" + "---|" * (len(names) + 1)]
    for label, row in (("configured", default), ("searched", best)):
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items())
        lines.append(f"| {label} | {params} | {row['score']:.4f} | "
                     + " | ".join(f"{r['test'][label][n]:.3f}" for n in names) + f" | {mean[label]:.4f} |")
    lines += ["", "All trials (validation mean, best first):", "", "| trial | parameters | validation mean | merge s "
              "| eval s |", "|---|---|---|---|---|"]
    for row in sorted(s["trials"], key=lambda x: -x["score"]):
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items())
        lines.append(f"| {row['trial']}{' (configured)' if row['default'] else ''} | {params} | {row['score']:.4f} | "
                     f"{row['merge_seconds'] or 0:.1f} | {row['eval_seconds'] or 0:.1f} |")
    return lines


if __name__ == "__main__":
    main()
