"""The from-scratch alignment benchmark's measuring pieces (benchmarks/align_scratch.py): the loss barrier, BERT's
masking, and the held-out loss against a straight cross-entropy. Its barrier table rests on these."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

scratch = pytest.importorskip("align_scratch")


class Tok:
    """The few tokenizer facts the masking reads."""

    cls_token_id, sep_token_id, mask_token_id = 101, 102, 103
    all_special_ids = [0, 101, 102, 103]

    def __len__(self) -> int:
        return 200


def test_barrier_is_the_largest_rise_above_the_straight_line() -> None:
    # lam runs 0 .. 1; losses[0] is B (lam 0), losses[-1] is A (lam 1)
    line = [3.0 + lam for lam in scratch.LAMBDAS]  # B 3.0 -> A 4.0, no bump
    assert scratch.barrier(line) == pytest.approx(0.0, abs=1e-12)
    bumped = list(line)
    bumped[3] += 0.7  # lam 0.3
    bumped[6] += 0.2
    assert scratch.barrier(bumped) == pytest.approx(0.7)


def test_masking_targets_only_real_tokens_and_every_sentence_gets_one() -> None:
    tok = Tok()
    rows = [[101, 5, 6, 7, 8, 9, 10, 11, 12, 102], [101, 20, 102]]  # the second has one real token
    ids, att = scratch.pad(rows)
    special = scratch.special_mask(ids, att, tok)
    gen = torch.Generator().manual_seed(0)
    for train in (True, False):
        for _ in range(20):
            inputs, targets = scratch.mask_batch(ids, special, tok, gen, train=train)
            picked = targets != -100
            assert not (picked & special).any()
            assert picked.any(1).all()
            assert torch.equal(targets[picked], ids[picked])
            assert torch.equal(inputs[~picked], ids[~picked])  # only targets change
            if not train:
                assert (inputs[picked] == tok.mask_token_id).all()


def test_held_out_loss_is_the_mean_cross_entropy_over_all_targets() -> None:
    torch.manual_seed(0)
    vocab, hidden = 200, 8

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, hidden)
            self.cls = torch.nn.Linear(hidden, vocab)

        def bert(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
            return type("Out", (), {"last_hidden_state": self.emb(input_ids)})()

    model = Tiny()
    rows = [[101, *range(5, 5 + n), 102] for n in (3, 9, 14, 6)]
    held = scratch.HeldOut(rows, Tok(), batch_size=3)  # two batches of unequal size
    total, count, unigram = 0.0, 0, 0.0
    real = [t for r in rows for t in r if t not in Tok.all_special_ids]
    for inputs, _, targets in held.batches:  # straight from the formula, one target at a time
        for b, t in zip(*torch.nonzero(targets != -100, as_tuple=True)):
            with torch.no_grad():
                logits = model.cls(model.emb(inputs[b, t]))
            total += float(-torch.log_softmax(logits, -1)[targets[b, t]])
            unigram += -math.log((real.count(int(targets[b, t])) + 1) / (len(real) + vocab))  # add-one
            count += 1
    assert count == held.targets
    assert held.loss(model) == pytest.approx(total / count, rel=1e-5)
    assert held.unigram(rows, vocab, Tok()) == pytest.approx(unigram / count, rel=1e-9)
