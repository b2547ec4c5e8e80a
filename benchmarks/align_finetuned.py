"""Permutation alignment after fine-tuning (issue 16, evidence 1, second half): all-MiniLM-L6-v2 and a copy of it
permuted by a random function-preserving permutation are each fine-tuned on a real task (sentiment: rotten-tomato
snippets, offline) for one epoch, with different data orders; then, through git:

- `git theta align` of the permuted fine-tune to the original fine-tune (sentences from the task's training texts):
  how much of the planted permutation it recovers (sites exactly, and positions), now that the two models differ;
- `git theta merge --strategy average` of the two fine-tunes with and without the alignment: test accuracy, next to
  each fine-tune's own.

    python benchmarks/align_finetuned.py --json benchmarks/results/align/minilm-finetuned.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from align import found_perms, git, new_repo  # noqa: E402
from offline_assets import minilm_dir  # noqa: E402
from quality import Settings, accuracy, fine_tune, load_task, new_classifier, tokenize  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def commit_model(repo: Path, branch: str, start: str, model: torch.nn.Module, tokenizer: object) -> None:
    git(repo, "checkout", "-q", "-b", branch, start)
    model.save_pretrained(repo / "model", safe_serialization=True)
    tokenizer.save_pretrained(repo / "model")  # type: ignore[attr-defined]
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", branch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sentiment")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--sentences", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import transformers
    from gittheta_align.arch import Shape
    from gittheta_align.permute import inverse, permute_state, random_perms

    t_start = time.monotonic()
    task = load_task(args.task, args.seed, 1000, 300, 1000)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
    s = Settings(tasks=[args.task], strategies=[], epochs=args.epochs, seed=args.seed)
    train, test = tokenize(tokenizer, task.train, s.max_length), tokenize(tokenizer, task.test, s.max_length)
    model_a = new_classifier(task, args.seed)
    shape = Shape.from_config(model_a.config.to_dict())
    planted = random_perms(shape, seed=args.seed + 100)
    model_b = copy.deepcopy(model_a)
    model_b.load_state_dict(permute_state(model_a.state_dict(), shape, planted))
    before = accuracy(model_b, test[:200]) == accuracy(model_a, test[:200])  # same function before training
    fine_tune(model_a, train, s)
    fine_tune(model_b, train, Settings(tasks=[args.task], strategies=[], epochs=args.epochs, seed=args.seed + 1))
    acc = {"fine-tuned A (original)": accuracy(model_a, test), "fine-tuned B (permuted copy)": accuracy(model_b, test)}
    print(f"fine-tuned ({args.epochs} epoch, {len(train)} examples): A {acc['fine-tuned A (original)']:.3f}, "
          f"B {acc['fine-tuned B (permuted copy)']:.3f}")

    work = Path(tempfile.mkdtemp(prefix="align-ft-"))
    try:
        repo = new_repo(work / "repo")
        commit_model(repo, "ft-a", "main", model_a, tokenizer)
        commit_model(repo, "ft-b", "main", model_b, tokenizer)
        data = work / "text.txt"
        data.write_text("\n".join(t for t, _ in task.train[: args.sentences]) + "\n")
        t0 = time.monotonic()
        git(repo, "theta", "align", "ft-a", "ft-b", "--data", str(data), "--max-sentences", str(args.sentences))
        align_seconds = time.monotonic() - t0
        found = found_perms(repo, "ft-b-aligned")
        exact = {s: bool(np.array_equal(p, inverse(planted[s]))) for s, p in found.items()}
        positions = {s: float(np.mean(p == inverse(planted[s]))) for s, p in found.items()}
        for label, branch in (("average, aligned", "ft-b-aligned"), ("average, not aligned", "ft-b")):
            git(repo, "checkout", "-q", "-b", f"merge-{branch}", "ft-a")
            git(repo, "theta", "merge", branch, "--strategy", "average")
            merged = transformers.BertForSequenceClassification.from_pretrained(str(repo / "model")).eval()
            acc[label] = accuracy(merged, test)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"task": args.task, "epochs": args.epochs, "train_examples": len(train), "test_examples": len(test),
              "same_function_before_training": before, "align_sentences": args.sentences,
              "align_seconds": round(align_seconds, 1), "sites_exact": sum(exact.values()), "sites": len(exact),
              "positions_recovered": {s: round(v, 4) for s, v in positions.items()},
              "mean_positions_recovered": round(float(np.mean(list(positions.values()))), 4),
              "accuracy": {k: round(v, 4) for k, v in acc.items()},
              "wall_seconds": round(time.monotonic() - t_start)}
    print(f"alignment ({args.sentences} sentences, {align_seconds:.0f} s): {result['sites_exact']}/{len(exact)} sites "
          f"exact, {result['mean_positions_recovered']:.3f} of positions recovered on average")
    for k, v in acc.items():
        print(f"  {k}: {v:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
