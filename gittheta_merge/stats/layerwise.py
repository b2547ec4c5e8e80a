"""Diagonal Fisher of a model that does not fit one device: per-example gradients by layer-wise recomputation.

A per-example gradient normally keeps every layer's weights and activations alive until the backward pass, so the
whole model must sit on the device. Here only one transformer block's weights are ever materialized:

1. Forward, one batch: the model runs with each block swapped for a stand-in that materializes the block, runs it
   without autograd, keeps its inputs (a few [B, T, h] tensors), drops its weights again, and hands its output on
   as a fresh leaf. The parts outside the blocks (embeddings, final norm, head: "resident", materialized once
   for the run) do record autograd, so the logits depend on the last block's output leaf.
2. Head: for every gradient row (an example, or an (example, class, position) term of the exact policy) one
   backward from log p gives the head's gradients and d log p / d (last block's output), row i only.
3. Blocks, last to first: the block is materialized again and re-run from its kept inputs with autograd; each
   row's backward (its output gradient is zero outside example i, and examples do not interact in an eval-mode
   transformer, so this is example i's own gradient) gives the block's weight gradients, squared into the sums,
   and the gradient of the block's input, which becomes the row's output gradient for the block below.
4. Embeddings: each row's input gradient is pushed through the autograd graph of step 1 into the resident
   parameters before the first block. A weight used on both sides (an LM head tied to the token embedding, by
   name or by reuse of the module; found from the graph on the first batch) has its head-side gradient kept
   until then: the square is of the sum, not a sum of squares.

The chain the re-runs rely on is checked, not assumed: block k must run k-th on exactly block k-1's output, the
output may read only the last block, and a whole-batch re-run must reproduce the forward; otherwise the model
is refused with an error rather than given a wrong statistic.

Weights are read once per batch in the forward and once in the backward (the price of recomputation), so the
device holds one block, the resident parts and the activations of one batch; the float sums live on the CPU.

The weights come from accelerate's placement (`--device-map`): a module's offloaded value is read from the hook's
weights map (`placement.stored_value`) and accelerate's own forward wrappers are bypassed for the run (they would
swap in their own copies, whose gradients this could not see) and put back afterwards. A plain model works too
(nothing is offloaded; the tests compare the two paths on one).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from gittheta_merge.errors import StatsError
from gittheta_merge.stats.placement import stored_value

from .accumulate import _OuterAcc, _Precision, _RowIndex, _weight_name
from .batches import _Batch


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated transformer blocks: the ModuleList of one module class holding the most parameters
    (model.layers, encoder.layer, transformer.h)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or len({type(m) for m in mod}) != 1:
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[0]:
            best = (size, name, mod)
    if best is None or best[0] == 0:
        raise StatsError(f"{type(model).__name__}: no list of repeated blocks found, so its statistics cannot be "
                         "computed layer by layer; compute them on a device that holds the whole model")
    return best[1], best[2]


def _hidden(value: Any) -> torch.Tensor:
    """The hidden state a block passes on: its output itself, or the first element of its output tuple."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise StatsError(f"a block returned {type(value).__name__}; a layer-wise pass needs the hidden state first: "
                     "compute on a device that holds the whole model")


def _with_hidden(value: Any, hidden: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return hidden
    return type(value)([hidden, *value[1:]])


class _Weights:
    """Puts real tensors on the execution device into modules whose parameters accelerate left on `meta`, and
    takes them out again. Tied parameters stay one Parameter (keyed by the original object)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        self.names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        self.buffer_names = {id(b): n for n, b in model.named_buffers(remove_duplicate=False)}

    def _value(self, name: str, t: torch.Tensor) -> torch.Tensor:
        v = stored_value(self.model, name, t)
        return v.to(self.device) if v.device != self.device else v

    @contextmanager
    def placed(self, modules: Iterable[nn.Module]) -> Iterator[dict[int, nn.Parameter]]:
        """Within: every parameter of `modules` is a real Parameter on the device that records gradients. Yields
        {id(original parameter): the Parameter in use}."""
        live: dict[int, nn.Parameter] = {}
        restore: list[tuple[dict[str, Any], str, Any]] = []
        try:
            for mod in modules:
                for sub in mod.modules():
                    for leaf, p in list(sub._parameters.items()):
                        if p is None:
                            continue
                        if id(p) not in live:
                            if p.device.type == "meta" or p.device != self.device:
                                live[id(p)] = nn.Parameter(self._value(self.names[id(p)], p).detach(),
                                                           requires_grad=p.requires_grad)
                            else:
                                live[id(p)] = p
                        if live[id(p)] is not p:
                            restore.append((sub._parameters, leaf, p))
                            sub._parameters[leaf] = live[id(p)]
                    for leaf, b in list(sub._buffers.items()):
                        if b is not None and (b.device.type == "meta" or b.device != self.device):
                            name = self.buffer_names.get(id(b))
                            value = self._value(name, b) if name else b.to(self.device)
                            restore.append((sub._buffers, leaf, b))
                            sub._buffers[leaf] = value
            yield live
        finally:
            for table, leaf, original in reversed(restore):
                table[leaf] = original


@contextmanager
def _forwards(swaps: list[tuple[nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """Each module's forward replaced (an instance attribute, as accelerate sets it) and put back after."""
    saved = [(mod, mod.__dict__.get("forward")) for mod, _ in swaps]
    for mod, fwd in swaps:
        mod.forward = fwd
    try:
        yield
    finally:
        for mod, fwd in reversed(saved):
            if fwd is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = fwd


def _plain_forwards(model: nn.Module) -> Any:
    """accelerate's wrapped forwards (which load and drop weights by themselves) swapped for the modules' own."""
    return _forwards([(m, m._old_forward) for m in model.modules() if hasattr(m, "_hf_hook")
                      and hasattr(m, "_old_forward")])


class _LayerPass:
    """What the Fisher and K-FAC share: the blocks and the resident parts, the forward with stand-ins (step 1) and
    the re-run of one block from its kept inputs (step 3)."""

    def __init__(self, model: nn.Module, device: torch.device,
                 model_call: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor], what: str) -> None:
        self.model, self.device, self.model_call = model, device, model_call
        self.prefix, self.blocks = find_blocks(model)
        owners: dict[int, int] = {}
        for k, block in enumerate(self.blocks):
            for p in block.parameters():
                if owners.setdefault(id(p), k) != k:
                    raise StatsError(f"{self.prefix}: blocks share weights (block {owners[id(p)]} and {k}); a layer-"
                                     f"wise {what} needs each block's own")
        self.resident = _outside(model, self.blocks)  # the model minus the blocks: materialized for the whole run
        for m in self.resident:
            for p in m.parameters():
                if id(p) in owners:
                    raise StatsError(f"a block weight is also used outside {self.prefix}; a layer-wise {what} "
                                     "cannot split its gradient")
        self.weights = _Weights(model, device)
        accepts = inspect.signature(model.forward).parameters
        self.no_cache = {"use_cache": False} if "use_cache" in accepts else {}

    @contextmanager
    def session(self) -> Iterator[dict[int, nn.Parameter]]:
        """accelerate's forwards bypassed and the resident parts materialized, for the whole run."""
        with _plain_forwards(self.model), self.weights.placed(self.resident) as live:
            yield live

    def forward(self, batch: _Batch) -> tuple[torch.Tensor, list[Any], torch.Tensor, list[torch.Tensor]]:
        """Step 1. Returns (logits, each block's kept inputs, the first block's input with its autograd graph, each
        block's output as a leaf: the next block's input, and for the last one what the head reads)."""
        kept: list[tuple[tuple[Any, ...], dict[str, Any], int | str]] = []
        outputs: list[torch.Tensor] = []
        first: list[torch.Tensor] = []
        stand_ins = [(block, self._stand_in(k, block, kept, outputs, first)) for k, block in enumerate(self.blocks)]
        # no KV cache: the re-run of a block must not see the first run's keys
        with _forwards(stand_ins), torch.enable_grad():
            logits = self.model_call(self.model, {**batch.inputs, **self.no_cache})
        if len(kept) != len(self.blocks):
            raise StatsError(f"{self.prefix}: {len(kept)} block calls for {len(self.blocks)} blocks in one forward; "
                             "a layer-wise pass needs each block called once")
        return logits, kept, first[0], outputs

    def check_head(self, value: torch.Tensor, outputs: list[torch.Tensor]) -> None:
        """The logits must depend on the blocks through the last block's output only (not a middle one)."""
        inner = outputs[:-1]
        if inner and any(g is not None for g in torch.autograd.grad(value, inner, retain_graph=True,
                                                                   allow_unused=True)):
            raise StatsError(f"the output reads a middle block of {self.prefix}, not only the last one; this model "
                             "cannot be computed layer by layer: compute on a device that holds the whole model")

    def check_rerun(self, k: int, out: torch.Tensor, expected: torch.Tensor) -> None:
        """A whole-batch re-run must give what the forward gave (the next block's input, or the last output)."""
        if out.shape != expected.shape or not _close(out, expected):
            raise StatsError(f"{self.prefix}.{k}: its re-run differs from its forward (state kept between calls?); "
                             "this model cannot be computed layer by layer: compute on a device that holds the "
                             "whole model")

    def _stand_in(self, k: int, block: nn.Module, kept: list[Any], outputs: list[torch.Tensor],
                  first: list[torch.Tensor]) -> Callable[..., Any]:
        run = block.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            where = _hidden_arg(args, kwargs, k)
            h = _arg(args, kwargs, where)
            # the chain the re-runs rely on: block k runs k-th, on exactly block k-1's output
            if len(kept) != k or (k > 0 and h is not outputs[-1]):
                raise StatsError(f"{self.prefix}.{k}: not called in order on the previous block's output (a hook or "
                                 "an operation between blocks); this model cannot be computed layer by layer: "
                                 "compute on a device that holds the whole model")
            if k == 0:
                first.append(h)
            args, kwargs = _replaced(args, kwargs, where, h.detach())
            kept.append((args, kwargs, where))
            with self.weights.placed([block]), torch.no_grad():
                out = run(*args, **kwargs)
            leaf = _hidden(out).detach().requires_grad_(True)
            outputs.append(leaf)
            return _with_hidden(out, leaf)
        return forward

    @contextmanager
    def rerun(self, k: int, kept: list[Any]) -> Iterator[tuple[Callable[[int | None], tuple[torch.Tensor,
                                                                                           torch.Tensor]],
                                                               dict[int, nn.Parameter]]]:
        """Step 3 for block k: materialized for the duration. Yields (run, {id(original parameter): Parameter in
        use}): run(None) re-runs the block on the whole batch from its kept inputs with autograd, run(i) on example
        i alone (every argument whose first dimension is the batch sliced to row i), each returning (input leaf,
        output hidden state). The kept inputs are released after."""
        args, kwargs, where = kept[k]
        h = _arg(*kept[k])
        batch = h.shape[0]

        def run(i: int | None) -> tuple[torch.Tensor, torch.Tensor]:
            a, kw = (args, kwargs) if i is None else (_row(args, i, batch), _row(kwargs, i, batch))
            x = (h if i is None else h[i:i + 1]).detach().requires_grad_(True)
            a, kw = _replaced(a, kw, where, x)
            with torch.enable_grad():
                return x, _hidden(self.blocks[k].forward(*a, **kw))

        with self.weights.placed([self.blocks[k]]) as live:
            yield run, live
        kept[k] = ((), {}, 0)


def _row(value: Any, i: int, batch: int) -> Any:
    """Example i's part of a block argument: tensors whose first dimension is the batch are sliced (kept 3D/4D),
    containers are walked, anything else (shared position tables, None, flags) is passed as it is."""
    if isinstance(value, torch.Tensor):
        return value[i:i + 1] if value.dim() >= 1 and value.shape[0] == batch and batch > 1 else value
    if isinstance(value, tuple):
        return tuple(_row(v, i, batch) for v in value)
    if isinstance(value, list):
        return [_row(v, i, batch) for v in value]
    if isinstance(value, dict):
        return {key: _row(v, i, batch) for key, v in value.items()}
    return value


def layerwise_fisher(model: nn.Module, batches: Iterable[_Batch], names: list[str], precision: _Precision,
                     device: torch.device, model_call: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
                     log_p: Callable[..., torch.Tensor], terms: Callable[[torch.Tensor | None, int], list],
                     task: str, policy: str, on_batch: Callable[[_Batch], None]) -> tuple[dict[str, torch.Tensor],
                                                                                           int, int, list[int]]:
    """Sum over examples of squared per-example gradients of log p for the parameters `names`, one block on the
    device at a time (module docstring). Each example's backward re-runs the block on that example alone, checked
    against its row of the batched output; a block whose arguments cannot be cut per example is re-run on the
    whole batch with the output gradient zero outside the example (same result, a batch-wide backward per example).
    Returns (sums on the CPU by name, examples, tokens, the blocks re-run whole)."""
    lp = _LayerPass(model, device, model_call, "Fisher")
    params = dict(model.named_parameters())
    wanted = {id(params[n]): n for n in names}
    acc = {n: torch.zeros(params[n].shape, dtype=precision.sum) for n in names}
    both_sides: set[int] | None = None  # resident weights before the first block: found on the first batch

    def add_sq(name: str, g: torch.Tensor) -> None:
        sq = g.to(precision.product_dtype(g.dtype)).square()
        if sq.dim() == 2 and sq.numel() > 1 << 20:  # an embedding table: only the example's own rows are nonzero
            rows = sq.any(1).nonzero().squeeze(1)
            acc[name].index_add_(0, rows.cpu(), sq[rows].to("cpu", precision.sum))
        else:
            acc[name].add_(sq.to("cpu", precision.sum))

    batched_blocks: set[int] = set()  # blocks whose arguments could not be cut per example
    n = tokens = 0
    with lp.session() as res_live:
        res_pairs = [(orig, p) for orig, p in res_live.items() if orig in wanted and p.requires_grad]
        for cpu_batch in batches:
            batch = cpu_batch.to(device)
            logits, kept, h0, outputs = lp.forward(batch)
            last = outputs[-1]
            if both_sides is None:  # a weight on both sides of the blocks (a tied head): its square is of the sum
                pre = torch.autograd.grad(h0.sum(), [p for _, p in res_pairs], retain_graph=True,
                                          allow_unused=True) if h0.requires_grad and res_pairs else []
                both_sides = {orig for (orig, _), g in zip(res_pairs, pre) if g is not None}
            # 2. the head: one backward per gradient row (an example, or an exact-policy term of one)
            rows: list[tuple[int, torch.Tensor]] = []  # (example, d log p / d last block output, that row only)
            head_side: list[dict[int, torch.Tensor]] = []  # a both-sides weight's head gradient, on the CPU
            for j, (c, t) in enumerate(terms(batch.target_mask, logits.shape[-1])):
                vals = log_p(logits, batch.targets, batch.target_mask, batch.uniform, task, policy, c, t)
                if j == 0:
                    lp.check_head(vals.sum(), outputs)
                for i in range(batch.n):
                    grads = torch.autograd.grad(vals[i], [last] + [p for _, p in res_pairs], retain_graph=True,
                                                allow_unused=True)
                    g_last = None if grads[0] is None or not grads[0][i].any() else grads[0][i].clone()
                    keep: dict[int, torch.Tensor] = {}
                    for (orig, _), g in zip(res_pairs, grads[1:]):
                        if g is None:
                            continue
                        if orig in both_sides and g_last is not None:
                            keep[orig] = g.to("cpu", precision.product_dtype(g.dtype))
                        else:  # nothing reaches the embeddings from a zero row: the head side is all of it
                            add_sq(wanted[orig], g)
                    if g_last is not None:  # an exact-policy term at a position that is no target here adds 0
                        rows.append((i, g_last))
                        head_side.append(keep)
                    del grads, g_last, keep
                del vals
            del logits, last
            # 3. the blocks, last to first
            final = {i: r for r, (i, _) in enumerate(rows)}  # an example's last row frees its graph
            for k in range(len(lp.blocks) - 1, -1, -1):
                with lp.rerun(k, kept) as (run, live):
                    pairs = [(orig, p) for orig, p in live.items() if orig in wanted and p.requires_grad]
                    alone = None if k in batched_blocks else _alone(run, batch.n, outputs[k])
                    x = out = None
                    if alone is None:  # example i's gradient from the batch, zero output gradient elsewhere
                        batched_blocks.add(k)
                        x, out = run(None)
                        lp.check_rerun(k, out, outputs[k])
                    for r, (i, g) in enumerate(rows):
                        if alone is not None:  # example i re-run alone: the loop's cost, not the batch's
                            x, out = alone[i]
                            full = g.unsqueeze(0)
                            again = final[i] > r
                        else:
                            full = torch.zeros_like(out)
                            full[i] = g
                            again = r < len(rows) - 1
                        grads = torch.autograd.grad(out, [x] + [p for _, p in pairs], grad_outputs=full,
                                                    retain_graph=again, allow_unused=True)
                        g_in = grads[0]
                        rows[r] = (i, torch.zeros_like(g) if g_in is None else g_in[0 if alone else i].clone())
                        for orig, gp in zip([o for o, _ in pairs], grads[1:]):
                            if gp is not None:
                                add_sq(wanted[orig], gp)
                        del grads, g_in, full
                    del alone, x, out, pairs, live, run  # nothing of this block outlives it
            # 4. the embeddings (and anything else before the first block)
            for r, (i, g) in enumerate(rows):
                full = torch.zeros_like(h0)
                full[i] = g
                grads = torch.autograd.grad(h0, [p for _, p in res_pairs], grad_outputs=full,
                                            retain_graph=r < len(rows) - 1, allow_unused=True) \
                    if h0.requires_grad and res_pairs else [None] * len(res_pairs)
                for (orig, _), gp in zip(res_pairs, grads):
                    extra = head_side[r].get(orig)
                    if extra is not None:
                        add_sq(wanted[orig], extra if gp is None else extra + gp.to("cpu", extra.dtype))
                    elif gp is not None:
                        add_sq(wanted[orig], gp)
                del grads, full
            del rows, head_side, h0, kept, outputs
            n += batch.n
            tokens += batch.tokens
            on_batch(batch)
    return acc, n, tokens, sorted(batched_blocks)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding of the dtype (a re-run on one example vs the batch reorders sums)."""
    a, b = a.detach(), b.detach()  # the forward's outputs are leaves that record gradients
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(b.dtype, 3e-2)
    return torch.allclose(a, b, rtol=tol, atol=tol * (float(b.abs().max()) or 1.0))


def _alone(run: Callable[[int | None], tuple[torch.Tensor, torch.Tensor]], n: int,
           expected: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Every example of the batch re-run alone, or None when an example's output differs from its row of the batched
    output (the block's arguments could not be cut per example): then the batch is re-run whole."""
    out = []
    for i in range(n):
        x, o = run(i)
        if o.shape != expected[i:i + 1].shape or not _close(o, expected[i:i + 1]):
            return None
        out.append((x, o))
    return out


def layerwise_kfac(model: nn.Module, batches: Iterable[_Batch], modules: dict[str, nn.Module],
                   make_acc: Callable[[int], _OuterAcc], device: torch.device,
                   model_call: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
                   log_p: Callable[..., torch.Tensor], terms: Callable[[torch.Tensor | None, int], list], task: str,
                   policy: str, on_batch: Callable[[_Batch], None]) -> tuple[dict[str, _OuterAcc], int, int]:
    """K-FAC's output-gradient Gram (sum over tokens of g g^T, g = d log p_n / d module output) of every module in
    `modules`, one block on the device at a time. One batched backward per label term gives every example's own g
    (examples do not interact), so unlike the Fisher no per-example rows are needed: the term's gradient at each
    block's output is carried down the blocks whole. Returns (accumulators by weight name, examples, tokens)."""
    lp = _LayerPass(model, device, model_call, "K-FAC")
    accs: dict[str, _OuterAcc] = {}
    outs: list[tuple[str, torch.Tensor]] = []

    def record(key: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.requires_grad:
                outs.append((key, output))
        return hook

    handles = [m.register_forward_hook(record(_weight_name(name))) for name, m in modules.items()]

    def collect(found: list[tuple[str, torch.Tensor]], grads: Iterable[torch.Tensor | None], index: _RowIndex,
                first: bool) -> None:
        for (key, o), g in zip(found, grads):
            if g is None:
                continue
            if key not in accs:
                accs[key] = make_acc(int(o.shape[-1]))
            r, idx, how = index.select(g)
            accs[key].add(r.to("cpu"), how, None if idx is None else idx.to("cpu"), count=first)

    n = tokens = 0
    try:
        with lp.session():
            for cpu_batch in batches:
                batch = cpu_batch.to(device)
                index = _RowIndex(batch.attention_mask)
                outs.clear()
                logits, kept, h0, outputs = lp.forward(batch)  # blocks ran without autograd: resident outputs only
                last = outputs[-1]
                resident_outs = list(outs)
                todo = terms(batch.target_mask, logits.shape[-1])
                g_terms: list[torch.Tensor] = []
                for j, (c, t) in enumerate(todo):
                    obj = log_p(logits, batch.targets, batch.target_mask, batch.uniform, task, policy, c, t).sum()
                    if j == 0:
                        lp.check_head(obj, outputs)
                    grads = torch.autograd.grad(obj, [last] + [o for _, o in resident_outs], retain_graph=True,
                                                allow_unused=True)
                    g_terms.append(torch.zeros_like(last) if grads[0] is None else grads[0])
                    collect(resident_outs, grads[1:], index, j == 0)
                del logits, last, obj, grads
                for k in range(len(lp.blocks) - 1, -1, -1):
                    outs.clear()
                    with lp.rerun(k, kept) as (run, live):
                        x, out = run(None)
                        lp.check_rerun(k, out, outputs[k])
                        found = list(outs)
                        for j, g in enumerate(g_terms):
                            grads = torch.autograd.grad(out, [x] + [o for _, o in found], grad_outputs=g,
                                                        retain_graph=j < len(g_terms) - 1, allow_unused=True)
                            g_terms[j] = torch.zeros_like(g) if grads[0] is None else grads[0]
                            collect(found, grads[1:], index, j == 0)
                        del x, out, found, grads, live, run  # nothing of this block outlives it
                    outs.clear()
                if h0.requires_grad and resident_outs:  # modules before the first block (an embedding projection)
                    for j, g in enumerate(g_terms):
                        grads = torch.autograd.grad(h0, [o for _, o in resident_outs], grad_outputs=g,
                                                    retain_graph=j < len(g_terms) - 1, allow_unused=True)
                        collect(resident_outs, grads, index, j == 0)
                n += batch.n
                tokens += batch.tokens
                on_batch(batch)
    finally:
        for h in handles:
            h.remove()
    return accs, n, tokens


def _outside(model: nn.Module, blocks: nn.ModuleList) -> list[nn.Module]:
    """The smallest set of modules covering every parameter outside `blocks`: the siblings of each ancestor of
    the block list, and the ancestors' own direct parameters (as a module holding nothing else)."""
    path: list[nn.Module] = []

    def find(mod: nn.Module) -> bool:
        if mod is blocks:
            return True
        for child in mod.children():
            if find(child):
                path.append(mod)
                return True
        return False

    find(model)
    out: list[nn.Module] = []
    for ancestor in path:
        for child in ancestor.children():
            if child is not blocks and child not in path:
                out.append(child)
        if ancestor._parameters or ancestor._buffers:
            out.append(_Direct(ancestor))
    return out


class _Direct(nn.Module):
    """A view of one module's own parameters and buffers (not its children's), so `_Weights.placed` visits them
    without walking into the blocks."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "target", module)

    def modules(self) -> Iterator[nn.Module]:  # type: ignore[override]
        yield self.target

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:  # type: ignore[override]
        yield from (p for p in self.target._parameters.values() if p is not None)


def _hidden_arg(args: tuple[Any, ...], kwargs: dict[str, Any], k: int) -> int | str:
    """Where the hidden state is among a block's arguments (the first positional tensor, or `hidden_states`);
    any other argument that carries gradient (T5's position bias) is refused: only the hidden state flows."""
    if args and isinstance(args[0], torch.Tensor):
        where: int | str = 0
    elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
        where = "hidden_states"
    else:
        raise StatsError(f"block {k}: no hidden-state argument found; a layer-wise pass needs blocks called as "
                         "block(hidden_states, ...): compute on a device that holds the whole model")
    for key, v in [*enumerate(args), *kwargs.items()]:
        if key != where and _carries_grad(v):
            raise StatsError(f"block {k}: argument {key!r} carries gradient besides the hidden state (it is computed "
                             "from weights outside the blocks, as T5's position bias or DeBERTa's relative "
                             "embeddings are); this model cannot be computed layer by layer: compute on a device "
                             "that holds the whole model")
    return where


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], where: int | str) -> Any:
    return args[where] if isinstance(where, int) else kwargs[where]


def _carries_grad(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.requires_grad
    if isinstance(v, (tuple, list)):
        return any(_carries_grad(x) for x in v)
    return False


def _replaced(args: tuple[Any, ...], kwargs: dict[str, Any], where: int | str,
              h: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(where, int):
        return (*args[:where], h, *args[where + 1:]), kwargs
    return args, {**kwargs, where: h}
