"""The alignment's core on small random BERTs: permuting one model leaves its outputs unchanged for every option
that claims so, and the alignment recovers a planted permutation exactly, site by site."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gittheta_align.bert import Shape
from gittheta_align.features import joint_statistics
from gittheta_align.matching import Options, permutations
from gittheta_align.permute import inverse, permute_state, random_perms

transformers = pytest.importorskip("transformers")


def _bert(seed: int, mlm: bool = False) -> torch.nn.Module:
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=40, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    cls = transformers.BertForMaskedLM if mlm else transformers.BertModel
    model = cls(config).eval()
    with torch.no_grad():  # LayerNorms away from their init, so a wrong permutation of them shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _shape(model: torch.nn.Module) -> Shape:
    return Shape.from_config(model.config.to_dict())


def _batches(seed: int, n: int = 6) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 97, (4, 24), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 18:] = 0  # padding, which the statistics must skip
        ids[1, 18:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    return out


def _outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor], res: np.ndarray | None = None) -> torch.Tensor:
    """MLM logits; or an encoder's pooled output and its last hidden states, read back in the original feature
    order when the model's residual stream was permuted by `res` (the hidden states are in that basis)."""
    with torch.no_grad():
        out = model(**batch)
    if hasattr(out, "logits"):
        return out.logits
    hidden = out.last_hidden_state
    if res is not None:
        hidden = hidden[..., torch.as_tensor(inverse(res))]
    return torch.cat([hidden.flatten(), out.pooler_output.flatten()])


def _permuted_copy(model: torch.nn.Module, perms: dict[str, np.ndarray]) -> torch.nn.Module:
    copy = type(model)(model.config).eval()
    state = permute_state(model.state_dict(), _shape(model), perms)
    copy.load_state_dict(state)
    return copy


@pytest.mark.parametrize("mlm", [False, True])
def test_a_planted_permutation_leaves_the_outputs_unchanged(mlm: bool) -> None:
    model = _bert(0, mlm)
    if mlm:
        model.tie_weights()
    perms = random_perms(_shape(model), seed=1)
    permuted = _permuted_copy(model, perms)
    batch = _batches(5)[0]
    ref, got = _outputs(model, batch), _outputs(permuted, batch, perms["res@emb"])
    assert torch.allclose(ref, got, atol=1e-5), (ref - got).abs().max()
    assert not torch.equal(model.state_dict()["encoder.layer.0.intermediate.dense.weight" if not mlm else
                                              "bert.encoder.layer.0.intermediate.dense.weight"],
                           permuted.state_dict()["encoder.layer.0.intermediate.dense.weight" if not mlm else
                                                 "bert.encoder.layer.0.intermediate.dense.weight"])


@pytest.mark.parametrize("heads,residual,components", [
    ("permute", "first", "ff+attn+res"), ("permute", "last", "ff+attn+res"), ("permute", "all", "ff+attn+res"),
    ("monotonic", "first", "ff+attn+res"), ("permute", "first", "ff+attn"), ("permute", "first", "res"),
])
def test_found_permutations_preserve_the_function_where_claimed(heads: str, residual: str, components: str) -> None:
    a, b = _bert(0), _bert(1)
    shape = _shape(a)
    options = Options.parse(components, heads, residual)
    assert options.function_preserving()
    perms = permutations(joint_statistics(a, b, _batches(2), shape, options.sites(shape)), shape, options)
    aligned = _permuted_copy(b, perms)
    batch = _batches(9)[0]
    assert torch.allclose(_outputs(b, batch), _outputs(aligned, batch, perms.get("res@emb")), atol=1e-5)


@pytest.mark.parametrize("heads,residual", [("ignore", "first"), ("permute", "sep")])
def test_options_that_are_not_function_preserving_say_so(heads: str, residual: str) -> None:
    assert not Options.parse("ff+attn+res", heads, residual).function_preserving()
    a, b = _bert(0), _bert(1)
    shape = _shape(a)
    options = Options.parse("ff+attn+res", heads, residual)
    perms = permutations(joint_statistics(a, b, _batches(2), shape, options.sites(shape)), shape, options)
    assert all(sorted(p.tolist()) == list(range(len(p))) for p in perms.values())  # still permutations


@pytest.mark.parametrize("heads", ["permute", "monotonic"])
def test_the_alignment_recovers_a_planted_permutation_exactly(heads: str) -> None:
    a = _bert(3)
    shape = _shape(a)
    planted = random_perms(shape, seed=4, heads=heads == "permute")  # monotonic cannot move heads
    b = _permuted_copy(a, planted)
    options = Options.parse("ff+attn+res", heads, "first")
    found = permutations(joint_statistics(a, b, _batches(7), shape, options.sites(shape)), shape, options)
    for site, perm in found.items():
        assert np.array_equal(perm, inverse(planted[site])), site
    back = _permuted_copy(b, found)
    for name, t in a.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_the_statistics_skip_padding() -> None:
    a = _bert(0)
    shape = _shape(a)
    batches = _batches(2, n=1)
    stats = joint_statistics(a, a, batches, shape, ["ff@0"])
    assert stats["ff@0"].n == int(batches[0]["attention_mask"].sum())
    cov, var_a, var_b = stats["ff@0"].covariances()
    assert np.allclose(np.diag(cov), var_a) and np.allclose(var_a, var_b)  # a model against itself


# -- Llama family: pre-RMSNorm, rotary embeddings, grouped-query attention --------------------------------------------
def _llama(seed: int, kv_heads: int = 2, tie: bool = False) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=kv_heads, intermediate_size=48, max_position_embeddings=64,
                                      tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _llama_batches(seed: int, n: int = 6) -> list[dict[str, torch.Tensor]]:
    return [{k: v for k, v in b.items() if k != "token_type_ids"} for b in _batches(seed, n)]


@pytest.mark.parametrize("kv_heads,tie", [(2, False), (4, False), (1, True)])
def test_llama_planted_permutation_leaves_the_logits_unchanged(kv_heads: int, tie: bool) -> None:
    model = _llama(0, kv_heads, tie)
    perms = random_perms(_shape(model), seed=1)
    permuted = _permuted_copy(model, perms)
    batch = _llama_batches(5)[0]
    ref, got = _outputs(model, batch), _outputs(permuted, batch)
    assert torch.allclose(ref, got, atol=1e-5), (ref - got).abs().max()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[name], permuted.state_dict()[name])


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_llama_alignment_recovers_a_planted_permutation_and_preserves_function(kv_heads: int) -> None:
    a = _llama(3, kv_heads)
    shape = _shape(a)
    planted = random_perms(shape, seed=4)
    b = _permuted_copy(a, planted)
    options = Options.parse("ff+attn+res", "permute", "first")
    found = permutations(joint_statistics(a, b, _llama_batches(7), shape, options.sites(shape)), shape, options)
    for site, perm in found.items():
        assert np.array_equal(perm, inverse(planted[site])), site
    back = _permuted_copy(b, found)
    for name, t in a.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    other = _llama(5, kv_heads)  # trained apart: whatever is found keeps the function
    found = permutations(joint_statistics(a, other, _llama_batches(2), shape, options.sites(shape)), shape, options)
    batch = _llama_batches(9)[0]
    assert torch.allclose(_outputs(other, batch), _outputs(_permuted_copy(other, found), batch), atol=1e-5)


@pytest.mark.parametrize("cls_name,config_cls", [
    ("BertForSequenceClassification", "BertConfig"), ("BertForTokenClassification", "BertConfig"),
    ("BertForQuestionAnswering", "BertConfig"), ("RobertaForSequenceClassification", "RobertaConfig"),
    ("ElectraForSequenceClassification", "ElectraConfig"),
])
def test_task_heads_keep_their_outputs_under_a_planted_permutation(cls_name: str, config_cls: str) -> None:
    """Heads on the pooler (BERT sequence classification) are left alone; heads on hidden states (token
    classification, QA, RoBERTa/ELECTRA classification) take the residual permutation on their inputs."""
    config = getattr(transformers, config_cls)(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, intermediate_size=48,
                                               max_position_embeddings=40,
                                               num_labels=2 if "Question" in cls_name else 3)
    if config_cls == "ElectraConfig":
        config.embedding_size = 32  # a projected embedding (embedding_size != hidden_size) is refused
    config.architectures = [cls_name]  # what save_pretrained writes into config.json
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config).eval()
    permuted = _permuted_copy(model, random_perms(_shape(model), seed=2))
    batch = {k: v for k, v in _batches(5)[0].items() if k != "token_type_ids" or config_cls == "BertConfig"}
    batch["input_ids"] = batch["input_ids"].clamp(min=3)  # RoBERTa's padding id is 1: keep positions regular
    with torch.no_grad():
        ref, got = model(**batch), permuted(**batch)
    for key in ("logits", "start_logits", "end_logits"):
        if getattr(ref, key, None) is not None:
            assert torch.allclose(getattr(ref, key), getattr(got, key), atol=1e-5), key


def test_a_classifier_whose_input_is_unknown_is_refused() -> None:
    from gittheta_merge.errors import InputError

    model = _bert(0)
    shape = _shape(model)  # no architectures in a config built in memory
    with pytest.raises(InputError, match="architectures"):
        shape.roles("classifier.weight")


def test_a_projected_electra_embedding_is_refused() -> None:
    from gittheta_align.arch import Shape

    from gittheta_merge.errors import InputError

    config = transformers.ElectraConfig(hidden_size=32, embedding_size=16, num_attention_heads=4).to_dict()
    with pytest.raises(InputError, match="embedding_size"):
        Shape.from_config(config)


def test_qk_permutation_of_its_own_preserves_the_function() -> None:
    """Q and K may take a within-head permutation other than V's (heads moved alike): q.k per head is a sum over
    the head's dimensions, unchanged when both sides are reordered the same way."""
    model = _bert(0)
    with torch.no_grad():  # peaked attention (at init q.k is ~0 and every head attends uniformly: nothing to see)
        for name, p in model.named_parameters():
            if ".query." in name or ".key." in name:
                p.mul_(20)
    shape = _shape(model)
    perms = random_perms(shape, seed=5, qk=True)
    assert not np.array_equal(perms["qk@0"], perms["attn@0"])  # the test plants a real difference
    batch = _batches(5)[0]
    permuted = _permuted_copy(model, perms)
    assert torch.allclose(_outputs(model, batch), _outputs(permuted, batch, perms["res@emb"]), atol=1e-5)
    wrong = {**perms, "qk@0": perms["attn@0"][::-1].copy()}  # Q/K heads out of step with V's: must show
    assert not torch.allclose(_outputs(model, batch), _outputs(_permuted_copy(model, wrong), batch,
                                                                 perms["res@emb"]), atol=1e-3)


@pytest.mark.parametrize("heads", ["permute", "monotonic"])
def test_qk_statistics_recover_a_planted_qk_permutation(heads: str) -> None:
    a = _bert(3)
    shape = _shape(a)
    planted = random_perms(shape, seed=6, heads=heads == "permute", qk=True)
    b = _permuted_copy(a, planted)
    options = Options.parse("ff+attn+res", heads, "first", qk=True)
    assert f"qk@{shape.n_layers - 1}" in options.sites(shape)
    found = permutations(joint_statistics(a, b, _batches(7), shape, options.sites(shape)), shape, options)
    for site in planted:
        assert np.array_equal(found[site], inverse(planted[site])), site
    without = permutations(joint_statistics(a, b, _batches(7), shape, Options().sites(shape)), shape, Options())
    assert not np.array_equal(without["qk@0"], inverse(planted["qk@0"]))  # following V misses it
    back = _permuted_copy(b, found)
    for name, t in a.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_qk_is_refused_where_it_cannot_apply() -> None:
    from gittheta_merge.errors import UsageError

    with pytest.raises(UsageError, match="--qk"):
        Options.parse("ff+attn+res", "ignore", "first", qk=True)
    with pytest.raises(UsageError, match="--qk"):
        Options.parse("ff+res", "permute", "first", qk=True)
    llama = _llama(0)
    shape = _shape(llama)
    with pytest.raises(UsageError, match="rotary"):
        permutations({}, shape, Options(qk=True))
