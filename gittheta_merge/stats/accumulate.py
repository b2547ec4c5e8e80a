"""Where statistics are accumulated: which modules feed a Gram (linear layers), which rows are real tokens,
and the block-wise fp64 sums of outer products (`_OuterAcc`) with their precision settings."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from gittheta_merge.errors import StatsError

# --------------------------------------------------------------------------------------------------------------
# module selection


def _linear_modules(model: nn.Module, include: str | None, exclude: str | None) -> dict[str, nn.Module]:
    """Every nn.Linear and HF Conv1D (by class name, so transformers stays optional), filtered by regexes on the
    module name."""
    out: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
            if include is not None and not re.search(include, name):
                continue
            if exclude is not None and re.search(exclude, name):
                continue
            out[name] = mod
    return out


def _dims(mod: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a Linear or Conv1D (Conv1D stores W as [d_in, d_out])."""
    w = mod.weight
    return (w.shape[0], w.shape[1]) if type(mod).__name__ == "Conv1D" else (w.shape[1], w.shape[0])


def _weight_name(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"


class _RowIndex:
    """Which rows of a module input/output are real tokens (attention mask 1). The flat index is computed once
    per batch and shared by every hook (a boolean-mask index per module redoes the nonzero scan and is several
    times slower)."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask
        self._idx: torch.Tensor | None = None
        self.all_real = bool(mask.all())

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, str]:
        """(2D rows, index of the real rows or None for all of them, how they were chosen)."""
        mask = self.mask
        if x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            flat = x.reshape(-1, x.shape[-1])
            if self.all_real:
                return flat, None, "attention_mask"
            if self._idx is None:
                self._idx = mask.reshape(-1).nonzero().squeeze(1)
            return flat, self._idx, "attention_mask"
        if x.dim() == 2 and x.shape[0] == mask.shape[0]:
            return x, None, "per-example"  # pooled inputs (BERT pooler / classifier): one row per example
        return x.reshape(-1, x.shape[-1]), None, "none"


_LEAF = 96
_BUFFER_ROWS = 2048


@dataclass(frozen=True)
class _Precision:
    """How sums are accumulated: `sum` is the dtype of the running sum (what is stored); products (X^T X over a
    block of rows, squared gradients) are formed in `product`, or, when `product` is None, in the dtype of the data
    itself (at least float32, at most `sum`): float32 for a float32 model. A float32 product over K rows rounds
    with relative error ≈ sqrt(K)·2⁻²⁴ (at most K·2⁻²⁴ of sqrt(G_ii G_jj)); the float64 running sum adds no
    error that grows with the number of rows (docs/statistics.md, "Accumulation precision")."""

    sum: torch.dtype
    product: torch.dtype | None

    def product_dtype(self, data: torch.dtype) -> torch.dtype:
        if self.product is not None:
            return self.product
        p = torch.promote_types(data, torch.float32)
        return p if p.itemsize <= self.sum.itemsize else self.sum

    @property
    def name(self) -> str:
        return "fp32" if self.sum == torch.float32 else ("fp64-exact" if self.product == torch.float64 else "fp64")


def _blocks(d: int) -> list[tuple[int, int, int, int, int]]:
    """The blocks of the upper triangle of a symmetric d x d matrix that are multiplied, as (row start, row end,
    column start, column end, offset in the packed layout): split the range in halves, keep the off-diagonal
    rectangle, recurse into the two halves down to diagonal blocks of at most _LEAF (multiplied whole). At
    d = 1536 that is 53 % of the full product's work in 31 well-shaped products (row-panel strips doing the same
    work are thin products and run slower)."""
    out: list[tuple[int, int, int, int, int]] = []
    off = 0

    def split(lo: int, hi: int) -> None:
        nonlocal off
        if hi - lo <= _LEAF:
            out.append((lo, hi, lo, hi, off))
            off += (hi - lo) ** 2
            return
        mid = (lo + hi) // 2
        split(lo, mid)
        out.append((lo, mid, mid, hi, off))
        off += (mid - lo) * (hi - mid)
        split(mid, hi)

    split(0, d)
    return out


class _OuterAcc:
    """Running sum of r r^T (or of r*r with diagonal_only) over rows, in the accumulation dtype, on the device.

    Rows are gathered (padding dropped) into a row buffer in the product dtype; when it is full (or at the end)
    one product over the buffered block is added to the sum: fewer, taller products run faster than one per batch,
    and a product formed in a narrower dtype is widened into the sum once per block, in one operation. The matrix
    is symmetric, so only the blocks of its upper triangle are multiplied and kept, packed one after another
    (`_blocks`); `result()` unpacks and mirrors them."""

    def __init__(self, dim: int, precision: _Precision, device: torch.device, diagonal_only: bool) -> None:
        self.dim = dim
        self.diagonal_only = diagonal_only
        self.precision = precision
        self.dtype = precision.sum
        self.device = device
        self.blocks = _blocks(dim) if not diagonal_only else []
        packed = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1, _ in self.blocks) if not diagonal_only else dim
        self.sum = torch.zeros(packed, dtype=self.dtype, device=device)
        self.count = 0
        self.masking: set[str] = set()
        self.product_dtypes: set[torch.dtype] = set()
        self._buf: torch.Tensor | None = None  # up to _BUFFER_ROWS rows held back, in the product dtype
        self._held = 0
        self._scratch: torch.Tensor | None = None  # a block's product when narrower than the sum (packed)

    def result(self) -> torch.Tensor:
        """The full sum: diagonal vector, or the symmetric matrix built from the packed upper blocks."""
        self.flush()
        if self.diagonal_only:
            return self.sum
        d = self.dim
        full = torch.empty(d, d, dtype=self.dtype, device=self.device)
        for r0, r1, c0, c1, off in self.blocks:
            block = self.sum[off:off + (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            if r0 == c0:  # a diagonal block: its upper triangle is mirrored (the result is exactly symmetric)
                full[r0:r1, c0:c1] = torch.triu(block)
                full[r0:r1, c0:c1] += torch.triu(block, 1).T
            else:  # above the diagonal, and its mirror image below
                full[r0:r1, c0:c1] = block
                full[c0:c1, r0:r1] = block.T
        return full

    def add(self, x: torch.Tensor, how: str, index: torch.Tensor | None = None, count: bool = True) -> None:
        """Add the rows `x[index]` (all rows of the 2D `x` when index is None)."""
        x = x.detach()
        k = x.shape[0] if index is None else index.shape[0]
        pd = self.precision.product_dtype(x.dtype)
        self.product_dtypes.add(pd)
        if count:  # the exact policy adds several weighted terms per token row; the row counts once
            self.count += k
        self.masking.add(how)
        if k == 0:
            return
        if self.diagonal_only:
            r = (x if index is None else x.index_select(0, index)).to(pd)
            self.sum.add_(torch.sum(r * r, 0, dtype=self.dtype))
            return
        if self._buf is not None and (self._buf.dtype != pd or self._held + k > _BUFFER_ROWS):
            self.flush()
        if k > _BUFFER_ROWS:  # a block taller than the buffer goes straight to a product
            self._product((x if index is None else x.index_select(0, index)).to(pd))
            return
        if self._buf is None or self._buf.dtype != pd:
            self._buf = torch.empty(_BUFFER_ROWS, self.dim, dtype=pd, device=self.device)
        dst = self._buf[self._held:self._held + k]
        if index is None:
            dst.copy_(x)
        elif x.dtype == pd:
            torch.index_select(x, 0, index, out=dst)
        else:
            dst.copy_(x.index_select(0, index))
        self._held += k

    def flush(self) -> None:
        if self._buf is not None and self._held:
            self._product(self._buf[:self._held])
        self._held = 0

    def _product(self, r: torch.Tensor) -> None:
        """sum += the upper blocks of r^T r, formed in r's dtype."""
        if r.dtype == self.dtype:
            for r0, r1, c0, c1, off in self.blocks:
                self.sum[off:off + (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0).addmm_(r[:, r0:r1].T, r[:, c0:c1])
            return
        if self._scratch is None or self._scratch.dtype != r.dtype:
            self._scratch = torch.empty(self.sum.shape[0], dtype=r.dtype, device=self.device)
        for r0, r1, c0, c1, off in self.blocks:
            torch.mm(r[:, r0:r1].T, r[:, c0:c1], out=self._scratch[off:off + (r1 - r0) * (c1 - c0)].view(
                r1 - r0, c1 - c0))
        self.sum.add_(self._scratch)  # widened while adding: one operation for the whole block




ACCUMULATIONS = {
    "fp64": "running sums in float64; products (X^T X over blocks of at most 2048 rows or one batch, squared "
            "gradients) in the data's dtype (at least float32)",
    "fp64-exact": "running sums and every product in float64",
    "fp32": "running sums and products in float32",
}


def _precision(d: torch.dtype | str) -> _Precision:
    """`accumulate_dtype`: fp64 (default; float64 sums of products formed in the data's dtype, i.e.
    float32 for a float32 model), fp64-exact (every product in float64 too) or fp32; float64 / float32 /
    float64-exact and torch dtypes are accepted as spellings."""
    if isinstance(d, torch.dtype):
        if d not in (torch.float32, torch.float64):
            raise StatsError("statistics accumulate in float32 or float64 (half precision underflows, §10)")
        return _Precision(d, None)
    name = {"float32": "fp32", "float64": "fp64", "float64-exact": "fp64-exact"}.get(d, d)
    if name not in ACCUMULATIONS:
        raise StatsError(f"unknown accumulate_dtype {d!r} (one of {', '.join(ACCUMULATIONS)}; half precision "
                         f"underflows, §10)")
    return _Precision(torch.float32, None) if name == "fp32" else \
        _Precision(torch.float64, torch.float64 if name == "fp64-exact" else None)

