"""The layer-wise Fisher (one block materialized at a time, re-run for the backward) against the per-example loop on
whole float64 models: every task and label policy, a tied LM head, and a model that accelerate left entirely on
disk. Agreement to 1e-6 relative tests the recomputation, not rounding (Llama's rotary tables are float32, so its
paths differ by ~1e-7 among themselves, vmap included)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_stats_compute import (  # noqa: E402
    SENTENCES,
    WORDS,
    bert_config,
    gpt2,
    make,
    rel_err,
    seqcls_examples,
    tokcls_examples,
)

from gittheta_merge.errors import StatsError  # noqa: E402
from gittheta_merge.stats import Example, compute_statistic  # noqa: E402
from gittheta_merge.stats.layerwise import find_blocks  # noqa: E402


@pytest.fixture(scope="module")
def vocab(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tok") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", "##ing", "##y"]) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tok(vocab: str):
    return transformers.BertTokenizerFast(vocab, do_lower_case=True)


@pytest.fixture(scope="module")
def gtok(vocab: str):  # no token_type_ids: GPT-2 and Llama would embed them
    return transformers.BertTokenizerFast(vocab, do_lower_case=True, model_input_names=["input_ids", "attention_mask"])


needs_accelerate = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="pip install accelerate")


def fisher(model, tokenizer, exs, task: str, per_example: str, policy: str = "empirical"):
    return compute_statistic(model, tokenizer, exs, kind="fisher", task=task, batch_size=4, per_example=per_example,
                             label_policy=policy, progress=False)


def assert_same_fisher(got, ref, tol: float = 1e-6) -> None:
    """Per tensor within `tol` relative; a tensor whose Fisher is 0 (key biases, unused rows) holds rounding noise
    only, held to 1e-12 of the largest tensor's norm."""
    assert sorted(got.tensors) == sorted(ref.tensors)
    assert got.provenance["n_examples"] == ref.provenance["n_examples"]
    assert got.provenance["tokens"] == ref.provenance["tokens"]
    assert got.counts == ref.counts and got.sharing == ref.sharing
    scale = max(float(t.norm()) for t in ref.tensors.values())
    for k, r in ref.tensors.items():
        g = got.tensors[k]
        assert g.dtype == r.dtype and g.shape == r.shape, k
        if float(r.norm()) <= 1e-12 * scale:
            assert float(g.norm()) <= 1e-12 * scale, k
        else:
            assert rel_err(g, r) <= tol, (k, rel_err(g, r))


def llama(tied: bool = True, layers: int = 3):
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    return make(transformers.LlamaForCausalLM, cfg, seed=3)


@pytest.mark.parametrize("policy", ["empirical", "exact"])
def test_sequence_classification_equals_the_loop(tok, policy: str) -> None:
    model = make(transformers.BertForSequenceClassification, bert_config(num_labels=3))
    exs = seqcls_examples()
    got = fisher(model, tok, exs, "sequence-classification", "layerwise", policy)
    assert got.provenance["per_example"] == "layerwise"
    assert_same_fisher(got, fisher(model, tok, exs, "sequence-classification", "loop", policy))


@pytest.mark.parametrize("policy", ["empirical", "exact"])
def test_token_classification_equals_the_loop(tok, policy: str) -> None:
    model = make(transformers.BertForTokenClassification, bert_config(num_labels=4))
    exs = tokcls_examples()
    assert_same_fisher(fisher(model, tok, exs, "token-classification", "layerwise", policy),
                       fisher(model, tok, exs, "token-classification", "loop", policy))


def test_causal_lm_with_a_tied_head_squares_the_sum_of_both_sides(gtok) -> None:
    """GPT-2's lm_head is the token embedding: its gradient has a head side (step 2) and an embedding side
    (step 4); the Fisher is the square of their sum, which a sum of two squares would miss."""
    exs = [Example(text=s) for s in SENTENCES[:6]]
    model = gpt2()
    got = fisher(model, gtok, exs, "causal-lm", "layerwise")
    assert got.sharing["lm_head.weight"] == "transformer.wte.weight"
    assert_same_fisher(got, fisher(model, gtok, exs, "causal-lm", "loop"))
    model = llama(tied=True)
    got = fisher(model, gtok, exs, "causal-lm", "layerwise")
    assert_same_fisher(got, fisher(model, gtok, exs, "causal-lm", "loop"))


def test_a_block_whose_arguments_cannot_be_cut_per_example_is_re_run_whole(gtok, monkeypatch) -> None:
    """If an example re-run alone does not reproduce its row of the batched output (here: every example is handed
    example 0's arguments), the block is re-run on the whole batch instead; the Fisher is the same and the
    provenance says which blocks."""
    from gittheta_merge.stats import layerwise

    cut = layerwise._row
    monkeypatch.setattr(layerwise, "_row", lambda value, i, batch: cut(value, 0, batch))
    exs = [Example(text=s) for s in SENTENCES[:6]]
    model = gpt2()
    got = fisher(model, gtok, exs, "causal-lm", "layerwise")
    assert got.provenance["layerwise_whole_batch_blocks"] == [0, 1]
    assert_same_fisher(got, fisher(model, gtok, exs, "causal-lm", "loop"))


def test_the_blocks_found_and_what_is_refused(gtok) -> None:
    assert find_blocks(llama())[0] == "model.layers"
    assert find_blocks(gpt2())[0] == "transformer.h"
    with pytest.raises(StatsError, match="no list of repeated blocks"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(StatsError, match="layerwise recomputation is for the Fisher and K-FAC"):
        compute_statistic(gpt2(), gtok, [Example(text="a dog")], kind="gram", task="causal-lm",
                          per_example="layerwise", progress=False)


@needs_accelerate
def test_a_model_left_on_disk_by_accelerate_gives_the_whole_models_fisher(gtok, tmp_path: Path) -> None:
    """Every weight of the split model is on `meta` (accelerate's disk folder holds them). The Fisher is computed
    layer by layer without being asked, at most one block is ever materialized, and the model is given back
    offloaded and working."""
    whole = llama(tied=True)
    whole.save_pretrained(tmp_path / "m")
    split = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "m", device_map="auto", dtype=torch.float64, max_memory={"cpu": "20KB"},
        offload_folder=str(tmp_path / "o"))
    assert all(p.device.type == "meta" for p in split.parameters())
    _, blocks = find_blocks(split)
    seen: list[int] = []

    def watching(k: int, run):
        def forward(*args, **kwargs):
            live = [j for j, b in enumerate(blocks) if any(p.device.type != "meta" for p in b.parameters())]
            assert live == [k], live  # this block only
            seen.append(k)
            return run(*args, **kwargs)
        return forward

    originals = [b._old_forward for b in blocks]
    for k, b in enumerate(blocks):
        b._old_forward = watching(k, b._old_forward)
    exs = [Example(text=s) for s in SENTENCES[:6]]
    got = compute_statistic(split, gtok, exs, kind="fisher", task="causal-lm", batch_size=4, progress=False)
    for b, run in zip(blocks, originals):
        b._old_forward = run
    assert got.provenance["per_example"] == "layerwise"
    # 6 examples in batches of 4 and 2: the forward, then each block re-run per example from the last block
    assert seen == [0, 1, 2] + [2] * 4 + [1] * 4 + [0] * 4 + [0, 1, 2] + [2] * 2 + [1] * 2 + [0] * 2
    assert_same_fisher(got, fisher(whole, gtok, exs, "causal-lm", "loop"))
    # the model is given back as it was: offloaded, and its forward gives the whole model's logits
    assert all(p.device.type == "meta" for p in split.parameters())
    ids = gtok(SENTENCES[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(split(input_ids=ids).logits, whole(input_ids=ids).logits, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------- K-FAC


def kfac(model, tokenizer, exs, task: str, per_example: str, policy: str = "empirical"):
    return compute_statistic(model, tokenizer, exs, kind="kfac", task=task, batch_size=4, per_example=per_example,
                             label_policy=policy, progress=False)


def assert_same_kfac(got, ref, tol: float = 1e-9) -> None:
    assert sorted(got.tensors) == sorted(ref.tensors) and len(ref.tensors) >= 6
    assert got.counts == ref.counts and got.sharing == ref.sharing
    assert got.provenance.get("skipped_modules") == ref.provenance.get("skipped_modules")
    for k, r in ref.tensors.items():
        assert got.tensors[k].dtype == r.dtype and rel_err(got.tensors[k], r) <= tol, (k, rel_err(got.tensors[k], r))


@pytest.mark.parametrize("policy", ["empirical", "exact"])
def test_kfac_layer_by_layer_equals_the_batched_kfac(tok, policy: str) -> None:
    """The default K-FAC (one batched backward with every Linear's output hooked) and the layer-wise one (the
    backward carried down the blocks one re-run at a time) are the same sums over the same padded batches."""
    model = make(transformers.BertForSequenceClassification, bert_config(num_labels=3))
    exs = seqcls_examples()
    got = kfac(model, tok, exs, "sequence-classification", "layerwise", policy)
    assert "layerwise" in got.provenance
    assert_same_kfac(got, kfac(model, tok, exs, "sequence-classification", "auto", policy))
    model = make(transformers.BertForTokenClassification, bert_config(num_labels=4))
    exs = tokcls_examples()
    assert_same_kfac(kfac(model, tok, exs, "token-classification", "layerwise", policy),
                     kfac(model, tok, exs, "token-classification", "auto", policy))


@needs_accelerate
def test_kfac_of_a_model_left_on_disk_equals_the_whole_models(gtok, tmp_path: Path) -> None:
    whole = llama(tied=True)
    whole.save_pretrained(tmp_path / "m")
    split = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "m", device_map="auto", dtype=torch.float64, max_memory={"cpu": "20KB"},
        offload_folder=str(tmp_path / "o"))
    exs = [Example(text=s) for s in SENTENCES[:6]]
    got = compute_statistic(split, gtok, exs, kind="kfac", task="causal-lm", batch_size=4, progress=False)
    assert "layerwise" in got.provenance
    assert_same_kfac(got, kfac(whole, gtok, exs, "causal-lm", "auto"), tol=1e-6)  # float32 rotary tables


@pytest.mark.parametrize("per_example", ["layerwise", "vmap", "loop"])
def test_a_head_that_reuses_the_embedding_module_squares_the_sum(gtok, per_example: str) -> None:
    """A head computing F.linear(h, wte.weight) (MPT's way: the module reused, no second name for the weight) is
    still a weight on both sides of the blocks: found from the graph, not from parameter names. The vmap and loop
    paths once squared the lookup side only (their own-token shortcuts), so all three are held to the reference."""
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                  tie_word_embeddings=False)
    model = make(transformers.GPT2LMHeadModel, cfg)
    model.lm_head.weight.requires_grad_(False)
    wte = model.transformer.wte
    model.lm_head.forward = lambda h: torch.nn.functional.linear(h, wte.weight)
    exs = [Example(text=s) for s in SENTENCES[:6]]
    got = fisher(model, gtok, exs, "causal-lm", per_example)
    assert got.provenance["per_example"] == per_example
    ref = {k: torch.zeros_like(p) for k, p in model.named_parameters() if p.requires_grad}
    for e in exs:  # alone, unpadded, plain autograd over every weight
        ids = gtok(e.text, return_tensors="pt")["input_ids"]
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).mean()
        for (k, _), g in zip(ref.items(), torch.autograd.grad(lp, [dict(model.named_parameters())[k] for k in ref])):
            ref[k] += g.double() ** 2
    scale = max(float(r.norm()) for r in ref.values())
    for k, r in ref.items():
        if float(r.norm()) > 1e-12 * scale:
            assert rel_err(got.tensors[k], r) <= 1e-6, (k, rel_err(got.tensors[k], r))


@pytest.mark.parametrize("kind", ["fisher", "kfac"])
def test_an_operation_between_blocks_is_refused_not_computed_wrong(gtok, kind: str) -> None:
    """Block 1 fed twice block 0's output (a pre-hook): the re-runs would start from the wrong input, so it is
    an error naming the block, not a silently wrong statistic."""
    model = gpt2()
    model.transformer.h[1].register_forward_pre_hook(lambda mod, args, kwargs: ((2 * args[0], *args[1:]), kwargs),
                                                     with_kwargs=True)
    with pytest.raises(StatsError, match=r"transformer\.h\.1: not called in order on the previous block's output"):
        compute_statistic(model, gtok, [Example(text=s) for s in SENTENCES[:4]], kind=kind, task="causal-lm",
                          per_example="layerwise", progress=False)


@needs_accelerate
@pytest.mark.parametrize("kind", ["fisher", "kfac"])
def test_no_copy_of_a_block_outlives_it(gtok, tmp_path: Path, monkeypatch, kind: str) -> None:
    """When a block is materialized, no weight copy of the block before it is still referenced (a leftover name,
    a gradient view): one block on the device means one."""
    import weakref
    from contextlib import contextmanager

    from gittheta_merge.stats import layerwise

    llama(tied=False).save_pretrained(tmp_path / "m")
    split = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "m", device_map="auto", dtype=torch.float64, max_memory={"cpu": "20KB"},
        offload_folder=str(tmp_path / "o"))
    in_blocks = {id(p) for p in find_blocks(split)[1].parameters()}
    previous: list[weakref.ref] = []
    leftovers: list[int] = []
    placed = layerwise._Weights.placed

    @contextmanager
    def watched(self, modules):  # noqa: ANN001, ANN202
        with placed(self, modules) as live:
            leftovers.append(sum(r() is not None for r in previous))
            previous[:] = [weakref.ref(p) for i, p in live.items() if i in in_blocks]
            yield live

    monkeypatch.setattr(layerwise._Weights, "placed", watched)
    compute_statistic(split, gtok, [Example(text=s) for s in SENTENCES[:6]], kind=kind, task="causal-lm",
                      batch_size=4, progress=False)
    assert len(leftovers) > 6 and max(leftovers) == 0, leftovers
