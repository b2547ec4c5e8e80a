"""Statistics computation checked against independent per-example references on tiny random BERT / GPT-2 models.

The references run every example alone (no padding), take plain autograd gradients / capture module inputs with
a separate mechanism, and accumulate in float64; the models are float64 so that agreement to 1e-6 relative tests
the definitions, not rounding.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gittheta_merge.stats import (  # noqa: E402
    DataSpec,
    Example,
    compute_statistic,
    file_digest,
    iter_examples,
    load_statistic,
    read_provenance,
    save_statistic,
    statistic_from_bytes,
    statistic_to_bytes,
)
from gittheta_merge.stats.batches import _Encoder  # noqa: E402

WORDS = ("the a an cat dog bird runs sits flies over under big small red blue green house tree car road fast slow "
         "happy sad one two three four five six seven eight nine ten good bad movie book song play read sing "
         "very not is was are were be to of and or but with without on in at by for from up down").split()

SENTENCES = [
    "the cat sits on the red house",
    "a dog runs",
    "big birds fly over the green tree and the blue car very fast",
    "one two three",
    "the movie was not good",
    "happy songs are sung by the small bird in the tree at ten",
    "slow",
    "read a book",
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("tok")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", "##ing", "##y"]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(str(d / "vocab.txt"), do_lower_case=True)
    tokenizer.test_vocab_path = str(d / "vocab.txt")
    return tokenizer


@pytest.fixture(scope="module")
def gtok(tok):
    """The same vocabulary without token_type_ids, as GPT-2's own tokenizer (GPT-2 would embed the type ids)."""
    return transformers.BertTokenizerFast(tok.test_vocab_path, do_lower_case=True,
                                          model_input_names=["input_ids", "attention_mask"])


def bert_config(**kw) -> transformers.BertConfig:
    return transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=48, max_position_embeddings=64, **kw)


def make(cls, cfg, seed: int = 0):
    torch.manual_seed(seed)
    return cls(cfg).double().eval()


def seqcls_examples() -> list[Example]:
    return [Example(text=s, label=i % 3) for i, s in enumerate(SENTENCES)]


def tokcls_examples() -> list[Example]:
    return [Example(text=s.split(), label=[(i + j) % 4 for j in range(len(s.split()))])
            for i, s in enumerate(SENTENCES)]


def grads_sq(value: torch.Tensor, model, weight: float = 1.0) -> dict[str, torch.Tensor]:
    names = [k for k, _ in model.named_parameters()]
    gs = torch.autograd.grad(value, [p for _, p in model.named_parameters()], retain_graph=True, allow_unused=True)
    return {k: (g.double() ** 2) * weight if g is not None else None for k, g in zip(names, gs)}


def add_into(acc: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> None:
    for k, v in new.items():
        if v is not None:
            acc[k] = acc[k] + v if k in acc else v


def assert_fisher_close(stat, ref: dict[str, torch.Tensor], model, n: int) -> None:
    """1e-6 relative per tensor; tensors whose true Fisher is 0 (key biases: softmax ignores them; unused
    embedding rows) hold rounding noise only, so they are held to 1e-12 of the largest tensor's norm instead."""
    assert stat.provenance["n_examples"] == n
    scale = max(float(r.norm()) for r in ref.values() if r is not None)
    for k, _ in model.named_parameters():
        r = ref.get(k)
        got = stat.tensors[k]
        assert not got.requires_grad
        if r is None or float(r.norm()) <= 1e-12 * scale:
            assert float(got.norm()) <= 1e-12 * scale, k
            continue
        assert rel_err(got, r) <= 1e-6, (k, rel_err(got, r))
        assert stat.counts[k] == n


# ---------------------------------------------------------------------------------------------------- Fisher


@pytest.mark.parametrize("per_example", ["vmap", "loop"])
def test_fisher_seqcls_empirical_matches_per_example_autograd(tok, per_example: str) -> None:
    model = make(transformers.BertForSequenceClassification, bert_config(num_labels=3))
    attention = model.config._attn_implementation
    exs = seqcls_examples()
    stat = compute_statistic(model, tok, exs, kind="fisher", task="sequence-classification", batch_size=4,
                             per_example=per_example, progress=False)
    assert stat.provenance["per_example"] == per_example
    # the per-example pass ran on eager attention (vmap has no SDPA batching rule); the model is given back as it was
    assert stat.provenance.get("attention") == ("eager" if attention == "sdpa" else None)
    assert model.config._attn_implementation == attention
    ref: dict[str, torch.Tensor] = {}
    for e in exs:  # alone, unpadded, plain autograd
        enc = tok(e.text, return_tensors="pt")
        lp = torch.log_softmax(model(**enc).logits[0], -1)[e.label]
        add_into(ref, grads_sq(lp, model))
    assert_fisher_close(stat, ref, model, len(exs))


def test_fisher_exact_equals_enumerated_expectation(tok) -> None:
    model = make(transformers.BertForSequenceClassification, bert_config(num_labels=3), seed=1)
    exs = seqcls_examples()[:5]
    stat = compute_statistic(model, tok, exs, kind="fisher", task="sequence-classification", label_policy="exact",
                             batch_size=3, progress=False)
    ref: dict[str, torch.Tensor] = {}
    for e in exs:
        enc = tok(e.text, return_tensors="pt")
        logp = torch.log_softmax(model(**enc).logits[0], -1)
        for y in range(3):
            add_into(ref, grads_sq(logp[y], model, weight=float(logp[y].detach().exp())))
    assert_fisher_close(stat, ref, model, len(exs))


def test_label_policies_differ_and_sampled_is_reproducible(tok) -> None:
    model = make(transformers.BertForSequenceClassification, bert_config(num_labels=3), seed=2)
    exs = seqcls_examples()
    kw = dict(kind="fisher", task="sequence-classification", batch_size=4, progress=False)
    emp = compute_statistic(model, tok, exs, label_policy="empirical", **kw)
    smp = compute_statistic(model, tok, exs, label_policy="sampled", seed=3, **kw)
    smp_loop = compute_statistic(model, tok, exs, label_policy="sampled", seed=3, per_example="loop", **kw)
    ext = compute_statistic(model, tok, exs, label_policy="exact", **kw)
    w = "classifier.weight"
    assert rel_err(emp.tensors[w], smp.tensors[w]) > 1e-3
    assert rel_err(emp.tensors[w], ext.tensors[w]) > 1e-3
    assert rel_err(smp.tensors[w], ext.tensors[w]) > 1e-3
    assert_fisher_close(smp_loop, smp.tensors, model, len(exs))  # the same seeded labels on both paths
    assert smp.provenance["label_policy"] == "sampled" and ext.provenance["label_policy"] == "exact"


def _tokcls_ref(model, tok, e: Example, policy: str) -> dict[str, torch.Tensor]:
    enc = tok(e.text, is_split_into_words=True, return_tensors="pt")
    wid = enc.word_ids(0)
    firsts = [t for t, w in enumerate(wid) if w is not None and (t == 0 or wid[t - 1] != w)]
    logp = torch.log_softmax(model(**enc).logits[0], -1)
    M = len(firsts)
    if policy == "empirical":
        lp = sum(logp[t, e.label[wid[t]]] for t in firsts) / M
        return grads_sq(lp, model)
    out: dict[str, torch.Tensor] = {}
    for t in firsts:  # exact: independent per-token labels → sum_t sum_c p_tc (d log p_tc / M)^2
        for c in range(logp.shape[-1]):
            add_into(out, grads_sq(logp[t, c] / M, model, weight=float(logp[t, c].exp())))
    return out


@pytest.mark.parametrize("policy", ["empirical", "exact"])
def test_fisher_token_classification(tok, policy: str) -> None:
    model = make(transformers.BertForTokenClassification, bert_config(num_labels=4), seed=4)
    exs = tokcls_examples()[:5] if policy == "empirical" else [tokcls_examples()[i] for i in (1, 3, 6)]
    stat = compute_statistic(model, tok, exs, kind="fisher", task="token-classification", label_policy=policy,
                             batch_size=3, progress=False)
    ref: dict[str, torch.Tensor] = {}
    for e in exs:
        add_into(ref, _tokcls_ref(model, tok, e, policy))
    assert_fisher_close(stat, ref, model, len(exs))


def gpt2(seed: int = 0):
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    return make(transformers.GPT2LMHeadModel, cfg, seed)


@pytest.mark.parametrize("per_example", ["vmap", "loop"])
def test_fisher_causal_lm_gpt2_tied_head(gtok, per_example: str) -> None:
    model = gpt2()
    exs = [Example(text=s) for s in SENTENCES[:6]]
    stat = compute_statistic(model, gtok, exs, kind="fisher", task="causal-lm", batch_size=4, per_example=per_example,
                             progress=False)
    assert stat.provenance["per_example"] == per_example
    ref: dict[str, torch.Tensor] = {}
    for e in exs:
        ids = gtok(e.text, return_tensors="pt")["input_ids"]
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        lp = logp.gather(-1, ids[0, 1:, None]).mean()
        add_into(ref, grads_sq(lp, model))
    assert_fisher_close(stat, ref, model, len(exs))
    # lm_head.weight is tied to the token embedding: one Fisher, reachable under both names
    assert stat.sharing["lm_head.weight"] == "transformer.wte.weight"


def test_fisher_masked_lm_and_sampled_lm(tok) -> None:
    model = make(transformers.BertForMaskedLM, bert_config(), seed=5)
    exs = [Example(text=s) for s in SENTENCES]
    stat = compute_statistic(model, tok, exs, kind="fisher", task="masked-lm", batch_size=4, seed=7,
                             mlm_probability=0.3, progress=False)
    # the masked positions come from the seeded generator: replay it, then compute alone and unpadded
    enc = _Encoder(tok, "masked-lm", 128, None, True, 7, 0.3)
    ref: dict[str, torch.Tensor] = {}
    for start in range(0, len(exs), 4):
        b = enc.encode(exs[start:start + 4])
        for i in range(b.n):
            L = int(b.attention_mask[i].sum())
            ids = b.inputs["input_ids"][i:i + 1, :L]
            m = b.target_mask[i, :L]
            assert m.any()
            logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
            lp = logp[m].gather(-1, b.targets[i, :L][m][:, None]).mean()
            add_into(ref, grads_sq(lp, model))
    assert_fisher_close(stat, ref, model, len(exs))
    smp = compute_statistic(model, tok, exs, kind="fisher", task="masked-lm", label_policy="sampled", batch_size=4,
                            seed=7, mlm_probability=0.3, progress=False)
    k = "bert.encoder.layer.0.attention.self.query.weight"
    assert rel_err(smp.tensors[k], stat.tensors[k]) > 1e-3
    with pytest.raises(ValueError, match="exact"):
        compute_statistic(model, tok, exs, kind="fisher", task="masked-lm", label_policy="exact", progress=False)


# ---------------------------------------------------------------------------------------------------- Gram


def capture_linear_inputs(model, tok, exs: list[Example]) -> dict[str, torch.Tensor]:
    """X^T X per Linear/Conv1D weight from each example run alone (no padding at all), inputs captured by
    temporarily wrapping forward (not the hooks the implementation uses)."""
    grams: dict[str, torch.Tensor] = {}
    mods = {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}
    originals = {}
    current: list[tuple[str, torch.Tensor]] = []
    for n, m in mods.items():
        originals[n] = m.forward

        def wrapped(x, _n=n, _f=m.forward):
            current.append((_n, x.detach()))
            return _f(x)
        m.forward = wrapped
    try:
        for e in exs:
            current.clear()
            with torch.no_grad():
                model(**tok(e.text, return_tensors="pt"))
            for n, x in current:
                X = x.reshape(-1, x.shape[-1]).double()
                grams[f"{n}.weight"] = grams.get(f"{n}.weight", 0) + X.T @ X
    finally:
        for n, m in mods.items():
            m.forward = originals[n]
    return grams


def test_gram_bert_matches_hand_collected_and_qkv_share(tok) -> None:
    model = make(transformers.BertForSequenceClassification, bert_config(num_labels=3), seed=6)
    exs = seqcls_examples()
    stat = compute_statistic(model, tok, exs, kind="gram", task="sequence-classification", batch_size=3,
                             progress=False)
    ref = capture_linear_inputs(model, tok, exs)
    n_tokens = sum(len(tok(e.text)["input_ids"]) for e in exs)
    assert stat.provenance["tokens"] == n_tokens
    for w, r in ref.items():
        assert rel_err(stat.sum_for(w), r) <= 1e-6, w
    # q/k/v read one hidden state: one Gram, three names
    for layer in range(2):
        p = f"bert.encoder.layer.{layer}.attention.self."
        keys = {stat.key_for(p + x + ".weight") for x in ("query", "key", "value")}
        assert keys == {p + "query.weight"}
        assert p + "key.weight" not in stat.tensors and p + "value.weight" not in stat.tensors
        assert stat.counts[p + "query.weight"] == n_tokens
    # also against the model's own hidden states (a third, fully independent path) for layer 0's input
    h0 = torch.cat([model(**tok(e.text, return_tensors="pt"), output_hidden_states=True).hidden_states[0][0]
                    for e in exs]).detach()
    assert rel_err(stat.sum_for("bert.encoder.layer.0.attention.self.key.weight"), h0.T @ h0) <= 1e-6
    # pooled inputs (pooler, classifier) have one row per example
    assert stat.counts["classifier.weight"] == len(exs)
    assert stat.provenance["masking_by_key"]["classifier.weight"] == ["per-example"]


def test_gram_padding_invariant_and_fp32_and_diagonal(tok) -> None:
    model = make(transformers.BertForMaskedLM, bert_config(), seed=7)
    exs = [Example(text=s) for s in SENTENCES]
    kw = dict(kind="gram", task="masked-lm", progress=False)
    alone = compute_statistic(model, tok, exs, batch_size=1, **kw)
    padded = compute_statistic(model, tok, exs, batch_size=8, **kw)
    assert alone.tensors.keys() == padded.tensors.keys()
    for k in alone.tensors:
        assert rel_err(padded.tensors[k], alone.tensors[k]) <= 1e-10, k
        assert padded.counts[k] == alone.counts[k]
    f32 = compute_statistic(model, tok, exs, batch_size=8, accumulate_dtype="fp32", **kw)
    diag = compute_statistic(model, tok, exs, batch_size=8, diagonal_only=True, **kw)
    for k, v in padded.tensors.items():
        assert f32.tensors[k].dtype == torch.float32 and v.dtype == torch.float64
        assert rel_err(f32.tensors[k], v) <= 1e-5
        assert diag.tensors[k].shape == (v.shape[0],)
        assert rel_err(diag.tensors[k], torch.diagonal(v)) <= 1e-12
    assert diag.provenance["diagonal_only"] is True


def test_gram_gpt2_conv1d(gtok) -> None:
    model = gpt2(seed=8)
    exs = [Example(text=s) for s in SENTENCES]
    stat = compute_statistic(model, gtok, exs, kind="gram", task="causal-lm", batch_size=3, progress=False)
    ref = capture_linear_inputs(model, gtok, exs)
    assert set(stat.sharing) == set(ref)
    for w, r in ref.items():
        assert rel_err(stat.sum_for(w), r) <= 1e-6, w
    assert "transformer.h.0.attn.c_attn.weight" in stat.provenance["conv1d_weights"]
    assert stat.tensors["transformer.h.0.mlp.c_proj.weight"].shape == (128, 128)  # d_in of c_proj = 4 * n_embd


# ---------------------------------------------------------------------------------------------------- K-FAC


def kfac_reference(model, tok, exs: list[Example], task: str) -> dict[str, torch.Tensor]:
    mods = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    out: dict[str, torch.Tensor] = {}
    for e in exs:
        captured: dict[str, torch.Tensor] = {}
        hs = [m.register_forward_hook(lambda mod, a, o, _n=n, _c=captured: _c.__setitem__(_n, o))
              for n, m in mods.items()]
        try:
            enc = tok(e.text, return_tensors="pt")
            logp = torch.log_softmax(model(**enc).logits[0], -1)
        finally:
            for h in hs:
                h.remove()
        lp = logp[e.label] if task == "sequence-classification" else None
        names = list(captured)
        gs = torch.autograd.grad(lp, [captured[n] for n in names], allow_unused=True)
        for n, g in zip(names, gs):
            if g is not None:
                G = g.reshape(-1, g.shape[-1]).double()
                out[f"{n}.weight"] = out.get(f"{n}.weight", 0) + G.T @ G
    return out


def test_kfac_matches_per_example_output_gradients(tok) -> None:
    model = make(transformers.BertForSequenceClassification, bert_config(num_labels=3), seed=9)
    exs = seqcls_examples()
    stat = compute_statistic(model, tok, exs, kind="kfac", task="sequence-classification", batch_size=4,
                             progress=False)
    ref = kfac_reference(model, tok, exs, "sequence-classification")
    for w, r in ref.items():
        if float(r.norm()) == 0:
            continue
        assert rel_err(stat.sum_for(w), r) <= 1e-6, w
    n_tokens = sum(len(tok(e.text)["input_ids"]) for e in exs)
    assert stat.counts["bert.encoder.layer.0.attention.self.key.weight"] == n_tokens
    ext = compute_statistic(model, tok, exs, kind="kfac", task="sequence-classification", batch_size=4,
                            label_policy="exact", progress=False)
    assert ext.counts == stat.counts
    k = "bert.encoder.layer.1.output.dense.weight"
    assert rel_err(ext.tensors[k], stat.tensors[k]) > 1e-3


def test_kfac_skips_vocabulary_sized_outputs(gtok) -> None:
    model = gpt2(seed=10)
    exs = [Example(text=s) for s in SENTENCES[:4]]
    stat = compute_statistic(model, gtok, exs, kind="kfac", task="causal-lm", max_dim=99, progress=False)
    assert "lm_head.weight" in stat.provenance["skipped_modules"]
    assert "lm_head.weight" not in stat.tensors
    assert stat.tensors["transformer.h.0.attn.c_attn.weight"].shape == (96, 96)  # d_out of the fused qkv


# ---------------------------------------------------------------------------------------------------- blobs, data


def test_blob_roundtrip_and_provenance(tok, tmp_path: Path) -> None:
    model = make(transformers.BertForSequenceClassification, bert_config(num_labels=3))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"sentence": e.text, "y": e.label}) + "\n" for e in seqcls_examples()))
    digest = file_digest(data)
    spec = DataSpec(data, text_field="sentence", label_field="y")
    stat = compute_statistic(model, tok, iter_examples(spec), kind="gram", task="sequence-classification",
                             data_digest=digest, progress=False)
    p = tmp_path / "gram.safetensors"
    save_statistic(stat, p)
    back = load_statistic(p)
    assert back.kind == "gram" and back.provenance == json.loads(json.dumps(stat.provenance))
    for k, v in stat.tensors.items():
        assert torch.equal(back.tensors[k], v)
    assert statistic_from_bytes(statistic_to_bytes(stat)).provenance == back.provenance
    kind, prov = read_provenance(p)
    assert kind == "gram" and prov["data_digest"] == digest and prov["n_examples"] == len(SENTENCES)
    for field in ("task", "tokens", "masking", "accumulate_dtype", "accumulation", "product_dtype", "tool",
                  "model_weight_names", "sharing", "counts", "weights"):
        assert field in prov, field
    assert prov["accumulation"] == "fp64" and prov["accumulate_dtype"] == "float64"
    assert prov["product_dtype"] == "float64"  # a float64 model's products are float64 under the default
    w = "bert.encoder.layer.0.attention.self.query.weight"
    assert len(prov["weights"][w]["sha256"]) == 64


def test_data_streaming_csv_jsonl_pairs(tmp_path: Path) -> None:
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('premise,hypothesis,gold\n"a, b",c,1\nd,e,0\n')
    exs = list(iter_examples(DataSpec(csv_path, text_field="premise", text_pair_field="hypothesis",
                                      label_field="gold")))
    assert exs == [Example("a, b", "c", "1"), Example("d", "e", "0")]
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "x", "label": 2}\n\n{"text": "y", "label": null}\n{"text": "z", "label": 1}\n')
    assert [e.label for e in iter_examples(DataSpec(jl), limit=2)] == [2, None]
    with pytest.raises(KeyError, match="label"):
        list(iter_examples(DataSpec(jl, label_field="missing")))
    assert file_digest(jl).startswith("sha256:") and len(file_digest(jl)) == 71
    gen = iter_examples(DataSpec(jl))
    assert next(gen).text == "x"  # a generator: rows are read on demand


def test_text_pairs_and_string_labels(tok) -> None:
    model = make(transformers.BertForSequenceClassification, bert_config(num_labels=2))
    exs = [Example("the cat", "a dog", "pos"), Example("one two", "three", "neg")]
    with pytest.raises(ValueError, match="label map"):
        compute_statistic(model, tok, exs, kind="fisher", task="sequence-classification", progress=False)
    stat = compute_statistic(model, tok, exs, kind="fisher", task="sequence-classification",
                             label_map={"neg": 0, "pos": 1}, progress=False)
    ref: dict[str, torch.Tensor] = {}
    for e, y in zip(exs, (1, 0)):
        enc = tok(e.text, e.text_pair, return_tensors="pt")
        add_into(ref, grads_sq(torch.log_softmax(model(**enc).logits[0], -1)[y], model))
    assert_fisher_close(stat, ref, model, 2)


def test_vmap_failure_falls_back_to_loop(tok, monkeypatch: pytest.MonkeyPatch) -> None:
    import gittheta_merge.stats.compute as compute

    model = make(transformers.BertForSequenceClassification, bert_config(num_labels=3))
    exs = seqcls_examples()[:4]
    good = compute_statistic(model, tok, exs, kind="fisher", task="sequence-classification", progress=False)

    def broken(*a, **k):
        raise RuntimeError("no batching rule")
    monkeypatch.setattr("torch.func.vmap", broken)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        fb = compute.compute_statistic(model, tok, exs, kind="fisher", task="sequence-classification",
                                       progress=False)
    assert fb.provenance["per_example"] == "loop" and "no batching rule" in fb.provenance["per_example_fallback"]
    for k in good.tensors:
        assert torch.allclose(fb.tensors[k], good.tensors[k], rtol=1e-9, atol=1e-30)


def test_gram_symmetric_panels_equal_full_product(tok, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large Grams accumulate only upper-triangle blocks and mirror at the end; force that path on the tiny
    model."""
    import gittheta_merge.stats.accumulate as accumulate

    model = make(transformers.BertForSequenceClassification, bert_config(num_labels=3), seed=11)
    exs = seqcls_examples()
    kw = dict(kind="gram", task="sequence-classification", batch_size=3, progress=False)
    full = compute_statistic(model, tok, exs, **kw)
    monkeypatch.setattr(accumulate, "_LEAF", 7)
    panels = compute_statistic(model, tok, exs, **kw)
    for k, v in full.tensors.items():
        assert torch.equal(panels.tensors[k], panels.tensors[k].T)
        assert rel_err(panels.tensors[k], v) <= 1e-12, k


def test_gram_buffered_blocks_equal_per_batch(tok, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are held in a buffer and multiplied per block; blocks smaller than a batch (the batch goes straight to
    a product) and blocks spanning several batches give the same sums (float64 model: float64 products)."""
    import gittheta_merge.stats.accumulate as accumulate

    model = make(transformers.BertForMaskedLM, bert_config(), seed=13)
    exs = [Example(text=s) for s in SENTENCES]
    kw = dict(kind="gram", task="masked-lm", batch_size=3, progress=False)
    ref = compute_statistic(model, tok, exs, **kw)
    for rows in (5, 40):
        monkeypatch.setattr(accumulate, "_BUFFER_ROWS", rows)
        got = compute_statistic(model, tok, exs, **kw)
        assert got.counts == ref.counts
        for k, v in ref.tensors.items():
            assert torch.equal(got.tensors[k], got.tensors[k].T), k  # mirrored exactly
            assert rel_err(got.tensors[k], v) <= 1e-12, (rows, k)


def test_gram_float32_model_float32_products_within_bound(tok, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default for a float32 model: float32 products per block of rows, float64 running sums. Every entry is
    within the float32 dot-product bound K·2⁻²⁴·sqrt(G_ii G_jj) of the all-float64 sum of the same activations
    (K = rows in one product block; docs/statistics.md, "Accumulation precision"), and fp64-exact is selectable."""
    import gittheta_merge.stats.accumulate as accumulate

    model = make(transformers.BertForSequenceClassification, bert_config(num_labels=3), seed=12).float()
    exs = seqcls_examples() * 3
    kw = dict(kind="gram", task="sequence-classification", batch_size=4, progress=False)
    exact = compute_statistic(model, tok, exs, accumulate_dtype="float64-exact", **kw)
    monkeypatch.setattr(accumulate, "_BUFFER_ROWS", 16)  # several blocks, and batches taller than the buffer
    monkeypatch.setattr(accumulate, "_LEAF", 7)  # triangle blocks too
    mixed = compute_statistic(model, tok, exs, **kw)
    assert (mixed.provenance["accumulation"], mixed.provenance["product_dtype"]) == ("fp64", "float32")
    assert (exact.provenance["accumulation"], exact.provenance["product_dtype"]) == ("fp64-exact", "float64")
    assert mixed.provenance["accumulate_dtype"] == exact.provenance["accumulate_dtype"] == "float64"
    K = mixed.provenance["tokens"]  # no block holds more rows than the whole data set
    for k, v in exact.tensors.items():
        got = mixed.tensors[k]
        assert got.dtype == torch.float64 and torch.equal(got, got.T), k
        s = torch.diagonal(v).sqrt()
        assert ((got - v).abs() <= K * 2.0 ** -24 * s[:, None] * s[None, :]).all(), k
        assert 0 < rel_err(got, v) <= 1e-6, k  # float32 rounding is there, and small
    with pytest.raises(ValueError, match="accumulate_dtype"):
        compute_statistic(model, tok, exs, accumulate_dtype="fp16", **kw)


def test_language_modelling_data_needs_no_label_column(gtok, tmp_path) -> None:
    """A causal LM's targets come from the text: a jsonl of texts alone is enough (a label column is not asked for),
    and it gives what the same examples give in memory."""
    import json

    from gittheta_merge.stats.workdir import compute_statistic_from_file

    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES[:4]))
    model = gpt2()
    from_file = compute_statistic_from_file(model, gtok, str(data), text_field="text", text_pair_field=None,
                                            label_field="label", n_examples=4, kind="gram", task="causal-lm",
                                            batch_size=2, progress=False)
    direct = compute_statistic(model, gtok, [Example(text=s) for s in SENTENCES[:4]], kind="gram", task="causal-lm",
                               batch_size=2, progress=False)
    assert from_file.tensors.keys() == direct.tensors.keys() and direct.tensors
    for name in direct.tensors:
        torch.testing.assert_close(from_file.tensors[name], direct.tensors[name], rtol=0, atol=0)
    with pytest.raises(KeyError, match="no field 'label'"):  # a classification task still needs its labels
        compute_statistic_from_file(model, gtok, str(data), text_field="text", text_pair_field=None,
                                    label_field="label", n_examples=4, kind="gram", task="sequence-classification",
                                    batch_size=2, progress=False)
