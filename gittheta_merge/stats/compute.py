"""Compute Fisher / Gram / K-FAC statistics of a transformers model over a stream of examples (the batches come
from batches.py, the sums are accumulated by accumulate.py; this module holds log p, the three collectors and
`compute_statistic`). Over 400 lines because the Fisher and the Gram/K-FAC collectors share the per-example
runner and the log p definitions; splitting them further would scatter one algorithm.

Definitions (merge-methods.md §4, §5, §6, §8; docs/statistics.md has the long form):

* log p(y|x): sequence classification: log softmax of the logits at the label. Token classification, causal LM,
  masked LM: the MEAN over the example's target tokens of log p(y_t|x) (= -mean token NLL, as REAL/MaTS define it).
  Targets: token classification, the first sub-token of each labelled word; causal LM, every next token inside the
  unpadded sequence; masked LM, the positions masked with the seeded generator (`mlm_probability`).
* fisher: F = sum_n (d log p(y_n|x_n) / d theta)^2 over examples n, stored with n (the mean is F/n). Gradients are
  per EXAMPLE (torch.func vmap(grad) within a batch, or a per-example loop), never the square of a batch mean
  (the RM bug, §12.7). Label policy: empirical (gold y_n), sampled (y_n ~ p(.|x_n), per target token for token
  tasks), exact (sum_y p(y|x) (d log p(y|x))^2; classification only; for token classification the expectation is
  over independent per-token labels, so the cross terms vanish and it is sum_t sum_c p_tc (d log p_tc / M)^2).
* gram: for every nn.Linear / HF Conv1D input x: G = sum_t x_t x_t^T over unpadded tokens (attention mask), with the
  token count. One tensor per distinct input tensor of a forward pass (q/k/v reading one hidden state share it).
* kfac: B = sum_t g_t g_t^T, g_t = d log p(y_n|x_n) / d (module output at token t of example n), same label
  policies. One batched backward of sum_n log p_n gives every example's own g exactly: examples do not interact in
  an eval-mode transformer, so no per-example machinery is needed.

The model is put in eval mode (dropout off) for every kind, as the reference implementations do.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from gittheta_merge.errors import StatsError
from gittheta_merge.progress import Ticker
from gittheta_merge.stats.placement import stored_value

from .. import __version__
from .data import Example
from .statistic import KINDS, Statistic

__all__ = ["compute_fisher", "compute_gram", "compute_kfac", "compute_statistic"]

from .accumulate import (
    ACCUMULATIONS,
    _dims,
    _linear_modules,
    _OuterAcc,
    _Precision,
    _precision,
    _RowIndex,
    _weight_name,
)
from .batches import (
    _CAUSAL_MODEL_TYPES,
    LABEL_POLICIES,
    LOG_P_DEFINITION,
    _Batch,
    _batches,
    _check_task,
    _default_label_map,
    _Encoder,
)

# --------------------------------------------------------------------------------------------------------------
# log p


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _chosen(logp: torch.Tensor, targets: torch.Tensor, uniform: torch.Tensor, policy: str) -> torch.Tensor:
    """The label index per position: gold, or sampled by inverse CDF (vmap-friendly, no data-dependent control)."""
    if policy == "empirical":
        return targets
    cdf = logp.detach().exp().cumsum(-1)
    y = (cdf < uniform.to(cdf.dtype).unsqueeze(-1) * cdf[..., -1:]).sum(-1)
    return y.clamp(max=logp.shape[-1] - 1)


def _log_p(logits: torch.Tensor, b_targets: torch.Tensor, b_mask: torch.Tensor | None, uniform: torch.Tensor,
           task: str, policy: str, cls: int | None = None, pos: int | None = None) -> torch.Tensor:
    """Per-example objective [B] whose gradient is the score (empirical/sampled), or, for the exact policy with a
    given class `cls` (and position `pos` for token tasks), sqrt(p_c) * log p_c (scaled by 1/M for token tasks),
    whose squared gradient summed over classes (and positions) is the exact Fisher contribution."""
    logp = _log_softmax(logits)
    if task == "sequence-classification":
        if cls is not None:
            lp = logp[:, cls]
            return lp.detach().exp().sqrt() * lp
        y = _chosen(logp, b_targets, uniform, policy)
        return logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    assert b_mask is not None
    m = b_mask.to(logp.dtype)
    count = m.sum(-1).clamp(min=1)
    if cls is not None:
        assert pos is not None
        lp = logp[:, pos, cls]
        return lp.detach().exp().sqrt() * lp * m[:, pos] / count
    y = _chosen(logp, b_targets, uniform, policy)
    tok = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return (tok * m).sum(-1) / count


# --------------------------------------------------------------------------------------------------------------
# progress


class _Progress(Ticker):
    """Examples and tokens (statistics runs take minutes): `update(n, tokens)` adds one batch."""

    redraw_seconds = 0.2
    final_line_always = True

    def __init__(self, label: str, total: int | None, enabled: bool | None,
                 ranks: tuple[int, int] | None = None) -> None:
        super().__init__(label, enabled, ranks)
        self.total = total
        self.examples = self.tokens = 0

    def update(self, n: int, tokens: int) -> None:
        self.examples += n
        self.tokens += tokens
        self.tick()

    def text(self) -> str:
        tot = f"/{self.total}" if self.total else ""
        elapsed = self.elapsed()
        return (f"{self.examples}{tot} examples, {self.tokens:,} tokens "
                f"({self.examples / elapsed:.1f} ex/s, {elapsed:.0f} s)")


# --------------------------------------------------------------------------------------------------------------
# the three kinds


def _model_call(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).logits


def _is_causal(model: nn.Module, task: str) -> bool:
    cfg = getattr(model, "config", None)
    return task == "causal-lm" or bool(getattr(cfg, "is_decoder", False)) or \
        getattr(cfg, "model_type", None) in _CAUSAL_MODEL_TYPES


class _Runner:
    """What every kind's loop shares: the task, the label policy, the device and the progress bar."""

    def __init__(self, task: str, policy: str, device: torch.device, progress: _Progress) -> None:
        self.task, self.policy, self.device, self.progress = task, policy, device, progress

    def terms(self, target_mask: torch.Tensor | None, n_classes: int) -> list[tuple[int | None, int | None]]:
        """The (class, position) terms of one backward each: for the exact policy, the pairs whose weighted
        scores make up the expectation (every class; positions that are a target in some example of the
        batch, none for sequence classification, whose `target_mask` is None); otherwise one plain term."""
        if self.policy != "exact":
            return [(None, None)]
        if target_mask is None:
            return [(c, None) for c in range(n_classes)]
        positions = target_mask.any(0).nonzero().flatten().tolist()
        return [(c, t) for t in positions for c in range(n_classes)]


def _within_max_dim(modules: dict[str, nn.Module], kind: str,
                    max_dim: int | None) -> tuple[dict[str, nn.Module], list[str]]:
    """(the modules whose Gram is at most max_dim² — input dim for gram, output dim for kfac —, the weights of the
    others, skipped)."""
    kept: dict[str, nn.Module] = {}
    skipped: list[str] = []
    for name, mod in modules.items():
        d_in, d_out = _dims(mod)
        if max_dim is not None and (d_out if kind == "kfac" else d_in) > max_dim:
            skipped.append(_weight_name(name))
        else:
            kept[name] = mod
    return kept, skipped


def _gram_or_kfac(model: nn.Module, batches: Iterable[_Batch], kind: str, runner: _Runner,
                  modules: dict[str, nn.Module], precision: _Precision,
                  diagonal_only: bool) -> tuple[dict[str, _OuterAcc], dict[str, str], int, int]:
    """Shared hook machinery. Returns (accumulators by tensor key, weight→key sharing, n, tokens)."""
    device = runner.device
    accs: dict[str, _OuterAcc] = {}
    leader_of: dict[str, str] = {}
    state: dict[str, Any] = {"rows": None, "seen": {}, "outs": []}
    handles = []

    def make_hook(name: str, mod: nn.Module) -> Callable[..., None]:
        d_in, d_out = _dims(mod)
        key = _weight_name(name)

        def fwd_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if kind == "gram":
                x = args[0]
                seen = state["seen"]
                hit = seen.get(id(x))
                leader = hit[1] if hit is not None and hit[0] is x else key
                if leader == key:
                    seen[id(x)] = (x, key)  # holds x so its id cannot be reused within this forward
                if leader_of.setdefault(key, leader) != leader:
                    raise RuntimeError(f"input sharing of {key} changed between batches "
                                       f"({leader_of[key]} before, {leader} now); cannot key its Gram")
                if leader != key:
                    return
                acc = accs.get(key)
                if acc is None:
                    acc = accs[key] = _OuterAcc(d_in, precision, device, diagonal_only)
                # a layer that device_map placed on another device: its input joins the sums' device
                rows, index, how = state["rows"].select(x if x.device == device else x.to(device))
                acc.add(rows, how, index)
            else:
                if not isinstance(output, torch.Tensor) or not output.requires_grad:
                    return
                leader_of[key] = key
                if key not in accs:
                    accs[key] = _OuterAcc(d_out, precision, device, diagonal_only)
                state["outs"].append((key, output))
        return fwd_hook

    for name, mod in modules.items():
        handles.append(mod.register_forward_hook(make_hook(name, mod)))
    n = tokens = 0
    try:
        for cpu_batch in batches:
            batch = cpu_batch.to(device)
            state["rows"] = row_index = _RowIndex(batch.attention_mask)
            state["seen"] = {}
            state["outs"] = []
            if kind == "gram":
                with torch.no_grad():
                    _model_call(model, batch.inputs)
            else:
                with torch.enable_grad():
                    logits = _model_call(model, batch.inputs)
                    outs = state["outs"]
                    tensors = [o for _, o in outs]
                    terms = runner.terms(batch.target_mask, logits.shape[-1])
                    for i, (c, t) in enumerate(terms):
                        obj = _log_p(logits, batch.targets, batch.target_mask, batch.uniform, runner.task,
                                     runner.policy, c, t).sum()
                        grads = torch.autograd.grad(obj, tensors, retain_graph=i < len(terms) - 1,
                                                    allow_unused=True)
                        for (key, _), g in zip(outs, grads):
                            if g is not None:
                                rows, index, how = row_index.select(g)
                                accs[key].add(rows, how, index, count=i == 0)
            state["seen"] = {}
            state["outs"] = []
            n += batch.n
            tokens += batch.tokens
            runner.progress.update(batch.n, batch.tokens)
    finally:
        for h in handles:
            h.remove()
    return accs, leader_of, n, tokens


@contextmanager
def _eager_attention(model: nn.Module) -> Iterator[str | None]:
    """Plain (eager) attention for the per-example pass, restored afterwards.

    torch.func has no batching rule for the fused SDPA kernels, so vmap over an SDPA model runs them one example
    at a time and warns; eager attention batches. Same values (within fp32 rounding; checked against the loop
    in the tests) and ~10% less CPU time on all-MiniLM-L6-v2. Yields the implementation used, or None when the
    model was left as it was."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before != "sdpa" or not hasattr(model, "set_attn_implementation"):
        yield None
        return
    try:
        model.set_attn_implementation("eager")
    except (ValueError, ImportError):  # a model with no eager attention keeps SDPA
        yield None
        return
    try:
        yield "eager"
    finally:
        model.set_attn_implementation(before)


def _fisher(model: nn.Module, batches: Iterable[_Batch], runner: _Runner, names: list[str],
            precision: _Precision, per_example: str, chunk: int | None) -> tuple[dict[str, torch.Tensor], str,
                                                                                str | None, int, int]:
    """Per-example squared gradients summed over examples. Returns (sums, method, fallback reason, n, tokens)."""
    from torch.func import functional_call, grad, vmap

    device = runner.device
    params = dict(model.named_parameters())
    sel = {k: params[k] for k in names}  # the loop path differentiates the live parameters
    sel_detached = {k: v.detach() for k, v in sel.items()}  # torch.func differentiates its own inputs
    # with an input embedding used only for the lookup, differentiate w.r.t. the looked-up token vectors instead
    # of the [V, h] table: vmap would otherwise build a dense [B, V, h] gradient that is almost all zeros. Known
    # at the first batch (a probe through the graph), so both stay unset until then.
    emb_name: str | None = None
    p_vmap: dict[str, torch.Tensor] = sel_detached
    rest = {k: v.detach() for k, v in params.items() if k not in sel}
    buffers = dict(model.named_buffers())
    acc_dtype = precision.sum
    acc = {k: torch.zeros(v.shape, dtype=acc_dtype, device=device) for k, v in sel.items()}
    causal = _is_causal(model, runner.task)
    method = "loop" if per_example == "loop" else "vmap"
    float_dtype = next((v.dtype for v in params.values() if v.dtype.is_floating_point), torch.float32)
    mask_zero = torch.zeros((), dtype=float_dtype, device=device)
    mask_min = torch.tensor(torch.finfo(float_dtype).min, dtype=float_dtype, device=device)
    reason: str | None = None
    n = tokens = 0

    def add_sq(k: str, g: torch.Tensor, batched: bool) -> None:
        g = g.to(precision.product_dtype(g.dtype))  # squares in the product dtype, summed in the sum dtype
        if batched:
            acc[k].add_(torch.sum(g.square(), 0, dtype=acc_dtype))
        else:
            acc[k].add_(g.square())

    def one(p: dict[str, torch.Tensor], ex: dict[str, torch.Tensor], cls: int | None, pos: int | None,
            policy: str) -> torch.Tensor:
        inputs = {k: ex[k].unsqueeze(0) for k in ("input_ids", "inputs_embeds", "token_type_ids") if k in ex}
        am = ex["attention_mask"]
        T = am.shape[0]
        allowed = am.bool().unsqueeze(0).expand(T, T)
        if causal:
            allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=am.device).tril()
        # a 4D additive mask is passed through as-is by transformers' mask helpers, which otherwise branch on
        # the mask's values (impossible under vmap)
        inputs["attention_mask"] = torch.where(allowed, mask_zero, mask_min)[None, None]
        logits = functional_call(model, ({**rest, **p}, buffers), (), inputs).logits
        tm = ex.get("target_mask")
        return _log_p(logits, ex["targets"].unsqueeze(0), None if tm is None else tm.unsqueeze(0),
                      ex["uniform"].unsqueeze(0), runner.task, policy, cls, pos)[0]

    def as_dict(batch: _Batch) -> dict[str, torch.Tensor]:
        d = dict(batch.inputs)
        d["targets"], d["uniform"] = batch.targets, batch.uniform
        if batch.target_mask is not None:
            d["target_mask"] = batch.target_mask
        return d

    state: dict[str, int] = {}

    def n_classes(batch: _Batch) -> int:
        if "classes" not in state:
            with torch.no_grad():
                state["classes"] = int(_model_call(model, batch.inputs).shape[-1])
        return state["classes"]

    def add_embedding_sq(ids: torch.Tensor, am: torch.Tensor, g: torch.Tensor) -> None:
        """Square per-example gradients of the (untied) input embedding without materialising [B, V, h]: only
        the rows of the example's own tokens are nonzero, so sum the token gradients per (example, token id),
        square, and scatter-add into the Fisher."""
        assert emb_name is not None
        V = acc[emb_name].shape[0]
        keep = am.bool()
        key = (torch.arange(ids.shape[0], device=ids.device)[:, None] * V + ids)[keep]
        uniq, inv = torch.unique(key, return_inverse=True)
        rows = torch.zeros(uniq.numel(), g.shape[-1], dtype=acc_dtype, device=g.device)
        rows.index_add_(0, inv, g[keep].to(acc_dtype))
        acc[emb_name].index_add_(0, uniq % V, rows.square())

    def vmap_batch(batch: _Batch, check: bool) -> None:
        ex = as_dict(batch)
        if emb_name is not None:
            ex["inputs_embeds"] = torch.nn.functional.embedding(ex.pop("input_ids"), params[emb_name].detach())
        if check:  # the per-example path must reproduce the batched model; otherwise fall back to the loop
            pol = "empirical" if runner.policy == "exact" else runner.policy
            with torch.no_grad():
                logits = _model_call(model, batch.inputs)
                ref = _log_p(logits, batch.targets, batch.target_mask, batch.uniform, runner.task, pol)
                vals = vmap(lambda e: one(p_vmap, e, None, None, pol))(ex)
            state["classes"] = int(logits.shape[-1])
            tol = 1e-5 if ref.dtype == torch.float32 else 1e-10  # loose tolerances would hide a wrong mask
            if not torch.allclose(vals.to(ref.dtype), ref, rtol=tol, atol=tol):
                raise _Mismatch(f"vmap log p differs from the batched forward by "
                                f"{(vals.to(ref.dtype) - ref).abs().max().item():.3g}")
        # the exact policy needs the class count (one forward, once); the others one plain term
        terms = runner.terms(batch.target_mask, n_classes(batch)) if runner.policy == "exact" else [(None, None)]
        for c, t in terms:
            if emb_name is None:
                g = vmap(grad(lambda p, e, c=c, t=t: one(p, e, c, t, runner.policy)), in_dims=(None, 0),
                         chunk_size=chunk)(p_vmap, ex)
            else:
                def f(p: dict[str, torch.Tensor], x: torch.Tensor, e: dict[str, torch.Tensor], c: int | None = c,
                      t: int | None = t) -> torch.Tensor:
                    return one(p, {**e, "inputs_embeds": x}, c, t, runner.policy)
                rest_ex = {k: v for k, v in ex.items() if k != "inputs_embeds"}
                g, g_emb = vmap(grad(f, argnums=(0, 1)), in_dims=(None, 0, 0), chunk_size=chunk)(
                    p_vmap, ex["inputs_embeds"], rest_ex)
                add_embedding_sq(batch.inputs["input_ids"], batch.attention_mask, g_emb)
            for k, v in g.items():
                add_sq(k, v, True)

    def loop_batch(batch: _Batch) -> None:
        keys = list(sel)
        tensors = [sel[k] for k in keys]
        for i in range(batch.n):
            L = int(batch.attention_mask[i].sum())
            inputs = {k: v[i:i + 1, :L] for k, v in batch.inputs.items()}
            tm = None if batch.target_mask is None else batch.target_mask[i:i + 1, :L]
            tg = batch.targets[i:i + 1] if batch.target_mask is None else batch.targets[i:i + 1, :L]
            un = batch.uniform[i:i + 1] if batch.target_mask is None else batch.uniform[i:i + 1, :L]
            with torch.enable_grad():
                logits = _model_call(model, inputs)
                terms = runner.terms(tm, logits.shape[-1])
                for j, (c, t) in enumerate(terms):
                    obj = _log_p(logits, tg, tm, un, runner.task, runner.policy, c, t)[0]
                    grads = torch.autograd.grad(obj, tensors, retain_graph=j < len(terms) - 1, allow_unused=True)
                    for k, g in zip(keys, grads):
                        if g is None:
                            continue
                        if k == emb_name:  # only the example's own token rows are nonzero
                            rows = torch.unique(inputs["input_ids"])
                            acc[k].index_add_(0, rows, g[rows].to(acc_dtype).square())
                        else:
                            add_sq(k, g, False)

    first = True
    for cpu_batch in batches:
        batch = cpu_batch.to(device)
        if first:
            emb_name = _lookup_only_input_embedding(model, names, batch)
            p_vmap = {k: v for k, v in sel_detached.items() if k != emb_name}
        if method == "vmap":
            try:
                vmap_batch(batch, check=first)
            except Exception as e:  # noqa: BLE001 - any failure of the functional path means: use the loop
                if not first or per_example == "vmap":
                    raise
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                warnings.warn(f"per-example gradients via torch.func failed ({reason}); using a per-example loop",
                              stacklevel=3)
                method = "loop"
                for v in acc.values():
                    v.zero_()
                loop_batch(batch)
        else:
            loop_batch(batch)
        first = False
        n += batch.n
        tokens += batch.tokens
        runner.progress.update(batch.n, batch.tokens)
    return acc, method, reason, n, tokens


def _lookup_only_input_embedding(model: nn.Module, names: list[str], batch: _Batch) -> str | None:
    """Name of the input-embedding weight when it is selected and the model uses it for the token lookup only;
    None otherwise (then it is treated like any other parameter, its gradient dense).

    A second parameter name for the same tensor (GPT-2's tied lm_head) shows a tie, but a head that reuses the
    module without a name (MPT: F.linear(h, wte.weight)) does not: so one example is run from its looked-up
    vectors (inputs_embeds) and the weight must get no gradient. Both squaring shortcuts (vmap through the
    looked-up vectors, the loop's own-token rows) would otherwise drop the head's side."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    w = getattr(emb, "weight", None)
    if (w is None or not w.requires_grad or "input_ids" not in batch.inputs
            or "inputs_embeds" not in inspect.signature(model.forward).parameters):
        return None
    aliases = [k for k, p in model.named_parameters(remove_duplicate=False) if p is w]
    if len(aliases) != 1 or aliases[0] not in names:
        return None
    inputs = {k: v[:1] for k, v in batch.inputs.items() if k != "input_ids"}
    with torch.enable_grad():
        inputs["inputs_embeds"] = torch.nn.functional.embedding(batch.inputs["input_ids"][:1], w.detach())
        out = _model_call(model, inputs)
        (g,) = torch.autograd.grad(out.sum(), [w], allow_unused=True)
    return aliases[0] if g is None else None


class _Mismatch(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------------------------
# entry points


def _tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of the tensor's bytes, hashed straight from its (CPU, contiguous) buffer: no bytes copy."""
    return hashlib.sha256(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()



def compute_statistic(
    model: nn.Module,
    tokenizer: Any,
    examples: Iterable[Example],
    *,
    kind: str,
    task: str,
    label_policy: str = "empirical",
    n_examples: int | None = None,
    batch_size: int = 16,
    max_length: int = 128,
    device: str | torch.device = "cpu",
    accumulate_dtype: torch.dtype | str = torch.float64,
    diagonal_only: bool = False,
    include: str | None = None,
    exclude: str | None = None,
    max_dim: int | None = None,
    label_map: Mapping[str, int] | None = None,
    seed: int = 0,
    mlm_probability: float = 0.15,
    per_example: str = "auto",
    per_example_chunk: int | None = None,
    data_digest: str | None = None,
    data_source: Mapping[str, Any] | None = None,
    hash_weights: bool = True,
    progress: bool | None = None,
) -> Statistic:
    """Compute one statistic (`kind` in fisher / gram / kfac) of `model` over `examples`.

    The model is moved to `device` and set to eval mode (it is left there); accumulators live on the device and
    the result is moved to the CPU. `include`/`exclude` are regexes on parameter names (fisher) or module names
    (gram/kfac). `max_dim` skips modules whose Gram would be larger than max_dim² (default for kfac: 8192, which
    leaves out vocabulary-sized LM heads as MaTS does). `per_example`: "auto" (torch.func, checked on the first
    batch, loop fallback), "vmap" (no fallback), "loop", or "layerwise" (one block materialized at a time,
    stats/layerwise.py; chosen by itself for a model placed by accelerate). `data_digest` / `data_source` are
    copied into the provenance (see `data.file_digest`)."""
    if kind not in KINDS:
        raise StatsError(f"unknown kind {kind!r} (one of {', '.join(KINDS)})")
    _check_task(task)
    if label_policy not in LABEL_POLICIES:
        raise StatsError(f"unknown label policy {label_policy!r} (one of {', '.join(LABEL_POLICIES)})")
    if label_policy == "exact" and task not in ("sequence-classification", "token-classification"):
        raise StatsError("the exact label policy is for classification tasks (an LM vocabulary makes the "
                         "expectation intractable); use sampled")
    if per_example not in ("auto", "vmap", "loop", "layerwise"):
        raise StatsError("per_example is auto, vmap, loop or layerwise")
    if per_example == "layerwise" and kind == "gram":
        raise StatsError("layerwise recomputation is for the Fisher and K-FAC (a Gram needs no backward)")
    if diagonal_only and kind == "fisher":
        raise StatsError("diagonal_only applies to gram and kfac (a Fisher is already diagonal)")
    precision = _precision(accumulate_dtype)
    acc_dtype = precision.sum
    if getattr(model, "hf_device_map", None):  # placed by accelerate (--device-map): inputs go to its first device
        from gittheta_merge.stats import placement

        if kind != "gram" and per_example not in ("auto", "layerwise"):
            raise StatsError(f"per_example={per_example!r} needs the whole model on one device; a model placed by "
                             "device_map computes its gradients layer by layer (per_example='auto' or 'layerwise')")
        dev = torch.device(placement.execution_device(model))
        if kind != "gram":
            per_example = "layerwise"  # gradients: one block on the device at a time
    else:
        dev = torch.device(device)
        model.to(dev)
    model.eval()
    if label_map is None:
        label_map = _default_label_map(model)
    needs_gold = kind != "gram" and label_policy == "empirical"
    accepts = "token_type_ids" in inspect.signature(model.forward).parameters
    encoder = _Encoder(tokenizer, task, max_length, label_map, needs_gold, seed, mlm_probability, accepts)
    ranks = _distributed()
    if ranks is not None:  # torchrun: this rank's deterministic share of the first n_examples, sums reduced below
        rank, world = ranks
        if task == "masked-lm" or (kind != "gram" and label_policy == "sampled"):
            raise StatsError("masked-lm statistics and the sampled label policy draw random numbers in data order: "
                             "run them in one process (a distributed run would not equal it)")
        if n_examples is not None and n_examples < world:
            raise StatsError(f"{n_examples} examples for {world} processes: give each process at least one")
        examples = (e for i, e in enumerate(itertools.islice(examples, n_examples)) if i % world == rank)
        n_examples = None if n_examples is None else len(range(rank, n_examples, world))
    batches = _batches(examples, encoder, batch_size, n_examples)
    bar = _Progress(f"{kind} ({task})", n_examples, progress, ranks)
    runner = _Runner(task, label_policy, dev, bar)
    t0 = time.monotonic()
    prov: dict[str, Any] = {
        "kind": kind, "task": task, "tool": f"gittheta-merge {__version__}", "torch": torch.__version__,
        "accumulate_dtype": str(acc_dtype).removeprefix("torch."), "accumulation": precision.name,
        "accumulation_detail": ACCUMULATIONS[precision.name], "seed": seed, "max_length": max_length,
        "batch_size": batch_size, "dropout": "off (eval mode)", "data_digest": data_digest,
        "data_source": dict(data_source) if data_source else None, "model_class": type(model).__name__,
    }
    try:
        import transformers
        prov["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is how models get here
        pass
    if task == "masked-lm":
        prov["mlm_probability"] = mlm_probability
        prov["mlm_masking"] = "every chosen position replaced by the mask token (no 80/10/10)"
    if kind != "gram":
        prov["label_policy"] = label_policy
        prov["log_p"] = LOG_P_DEFINITION[task]
    params = dict(model.named_parameters())
    all_names = dict(model.named_parameters(remove_duplicate=False))
    tensors: dict[str, torch.Tensor]
    sharing: dict[str, str]
    counts: dict[str, int]
    try:
        if kind == "fisher":
            names = [k for k, v in params.items() if v.requires_grad
                     and (include is None or re.search(include, k)) and not (exclude and re.search(exclude, k))]
            if not names:
                raise StatsError("no parameters selected for the Fisher")
            if per_example == "layerwise":
                from .layerwise import layerwise_fisher

                attention, method, reason = None, "layerwise", None
                sums, n, tokens, whole_batch = layerwise_fisher(
                    model, batches, names, precision, dev, _model_call, _log_p, runner.terms, task, label_policy,
                    lambda b: bar.update(b.n, b.tokens))
                prov["layerwise"] = ("one block materialized at a time: forward keeps each block's inputs, "
                                     "backward re-runs it per example; sums on the CPU")
                if whole_batch:
                    prov["layerwise_whole_batch_blocks"] = whole_batch
            else:
                with _eager_attention(model) as attention:
                    sums, method, reason, n, tokens = _fisher(model, batches, runner, names, precision, per_example,
                                                               per_example_chunk)
            if attention:
                prov["attention"] = attention
            tensors = sums
            sharing = {k: k for k in names}
            for alias, p in all_names.items():  # tied weights (MLM decoder, GPT-2 lm_head) share one Fisher
                for k in names:
                    if params[k] is p:
                        sharing.setdefault(alias, k)
            counts = {k: n for k in tensors}
            prov["per_example"] = method
            if reason:
                prov["per_example_fallback"] = reason
            prov["normalisation"] = "sum of per-example squared gradients; divide by counts[key] = n examples"
            float_dtype = next((p.dtype for p in params.values() if p.dtype.is_floating_point), torch.float32)
            product_dtypes = {precision.product_dtype(float_dtype)}
        else:
            if kind == "kfac" and max_dim is None:
                max_dim = 8192
            modules, skipped = _within_max_dim(_linear_modules(model, include, exclude), kind, max_dim)
            if kind == "kfac" and per_example == "layerwise":
                from .layerwise import layerwise_kfac

                accs, n, tokens = layerwise_kfac(
                    model, batches, modules, lambda d: _OuterAcc(d, precision, torch.device("cpu"), diagonal_only),
                    dev, _model_call, _log_p, runner.terms, task, label_policy, lambda b: bar.update(b.n, b.tokens))
                leader_of = {k: k for k in accs}
                prov["layerwise"] = ("one block materialized at a time: forward keeps each block's inputs, "
                                     "backward re-runs it; sums on the CPU")
            else:
                accs, leader_of, n, tokens = _gram_or_kfac(model, batches, kind, runner, modules, precision,
                                                           diagonal_only)
            tensors = {k: a.result() for k, a in accs.items()}
            sharing = {w: k for w, k in leader_of.items() if k in accs}
            counts = {k: a.count for k, a in accs.items()}
            masking = {k: sorted(a.masking) for k, a in accs.items()}
            product_dtypes = {d for a in accs.values() for d in a.product_dtypes}
            odd = {k: m for k, m in masking.items() if m != ["attention_mask"]}
            prov["masking"] = "padding excluded via the attention mask (sum over unpadded tokens)"
            if odd:
                prov["masking_by_key"] = odd
            prov["diagonal_only"] = diagonal_only
            if skipped:
                prov["skipped_modules"] = skipped
            conv = [_weight_name(nm) for nm, m in modules.items()
                    if type(m).__name__ == "Conv1D" and _weight_name(nm) in sharing]
            if conv:
                prov["conv1d_weights"] = conv  # stored as [d_in, d_out]: no transpose for RegMean
            prov["normalisation"] = ("sum over rows; divide by counts[key] (unpadded tokens) for the mean "
                                     "convention")
            if kind == "kfac" and label_policy == "exact":
                prov["kfac_exact_counts"] = "token rows counted once per (class, position) term"
        if ranks is not None:
            tensors, counts, n, tokens = _all_reduce(tensors, counts, n, tokens)
            prov["distributed"] = {"world_size": ranks[1], "sharding": "example i on rank i % world_size",
                                   "reduction": "all_reduce SUM of every sum and count"}
        if n == 0:
            raise StatsError("no examples were read")
        # the dtype the products (X^T X, squared gradients) were formed in, as actually run
        prov["product_dtype"] = ",".join(sorted(str(d).removeprefix("torch.") for d in product_dtypes))
    finally:
        bar.close()
    prov.update(n_examples=n, tokens=tokens, counts=counts, sharing=sharing, seconds=round(time.monotonic() - t0, 3),
                device=str(dev))
    if hash_weights:
        weights: dict[str, Any] = {}
        digests: dict[int, str] = {}  # tied weights are one tensor: hash it once
        for w in sorted(sharing):
            if w in all_names:
                p = all_names[w]
                if id(p) not in digests:  # an offloaded weight (--device-map) is hashed from its stored copy
                    digests[id(p)] = _tensor_sha256(stored_value(model, w, p))
                weights[w] = {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."),
                              "sha256": digests[id(p)]}
        prov["weights"] = weights
    prov["model_weight_names"] = sorted(model.state_dict().keys())
    return Statistic(kind=kind, tensors={k: v.to("cpu") for k, v in tensors.items()}, provenance=prov)


def _distributed() -> tuple[int, int] | None:
    """(rank, world size) when running under an initialised torch.distributed group of more than one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def _all_reduce(tensors: dict[str, torch.Tensor], counts: dict[str, int], n: int,
                tokens: int) -> tuple[dict[str, torch.Tensor], dict[str, int], int, int]:
    """Every rank's sums and counts added up, in a fixed key order (all ranks hold the same keys: the same model)."""
    import torch.distributed as dist

    keys = sorted(tensors)
    for key in keys:
        dist.all_reduce(tensors[key], op=dist.ReduceOp.SUM)
    scalars = torch.tensor([n, tokens] + [counts[k] for k in keys], dtype=torch.int64,
                           device=tensors[keys[0]].device if keys else "cpu")
    dist.all_reduce(scalars, op=dist.ReduceOp.SUM)
    values = scalars.tolist()
    return tensors, {k: int(v) for k, v in zip(keys, values[2:])}, int(values[0]), int(values[1])


def compute_fisher(model: nn.Module, tokenizer: Any, examples: Iterable[Example], *, task: str,
                   label_policy: str = "empirical", **kwargs: Any) -> Statistic:
    """Diagonal Fisher: sum over examples of squared per-example gradients of log p (see module docstring)."""
    return compute_statistic(model, tokenizer, examples, kind="fisher", task=task, label_policy=label_policy,
                             **kwargs)


def compute_gram(model: nn.Module, tokenizer: Any, examples: Iterable[Example], *, task: str,
                 diagonal_only: bool = False, **kwargs: Any) -> Statistic:
    """Input Gram of every Linear / Conv1D over unpadded tokens (one tensor per distinct input)."""
    return compute_statistic(model, tokenizer, examples, kind="gram", task=task, diagonal_only=diagonal_only,
                             **kwargs)


def compute_kfac(model: nn.Module, tokenizer: Any, examples: Iterable[Example], *, task: str,
                 label_policy: str = "empirical", **kwargs: Any) -> Statistic:
    """MaTS K-FAC output-gradient Gram B of every Linear / Conv1D (vocabulary-sized outputs skipped by default)."""
    return compute_statistic(model, tokenizer, examples, kind="kfac", task=task, label_policy=label_policy,
                             **kwargs)
