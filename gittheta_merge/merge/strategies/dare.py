"""DARE: drop each task-vector entry with probability p, rescale survivors by 1/(1-p), then combine.

Combination: `elect=false` -> task arithmetic, theta_0 + lambda * sum_i w_i tau~_i; `elect=true` -> TIES
sign election on the sparsified vectors (mass; zero elected signs stay zero) and the disjoint mean.

Reproducibility regardless of chunking: the drop mask is generated in fixed "RNG tiles" of
max(1, 2**20 // row_elements) rows of a tensor, each from its own torch.Generator seeded with
sha256(seed, tensor name, model index, tile index). A chunk of any size regenerates exactly the tiles it
overlaps, so the same seed gives the same merge for any --max-block-bytes, any tensor order, and any
subset of tensors. `dare_keep_mask` is the public definition of that stream.
"""

from __future__ import annotations

import hashlib
from typing import Any

from gittheta_merge.errors import UsageError
from gittheta_merge.merge.strategies.base import Chunk, Param, Strategy
from gittheta_merge.merge.strategies.ties import elect_and_merge

TILE_ELEMENTS = 1 << 20


def _tile_seed(seed: int, name: str, model: int, tile: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{name}\0{model}\0{tile}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare_keep_mask(seed: int, name: str, model: int, shape: list[int] | tuple[int, ...], drop: float,
                   row_start: int = 0, row_end: int | None = None) -> Any:
    """Boolean keep-mask for rows [row_start, row_end) of a tensor (True = entry survives)."""
    return uniforms(seed, name, model, shape, row_start, row_end) >= drop


def uniforms(seed: int, name: str, model: int, shape: list[int] | tuple[int, ...], row_start: int = 0,
             row_end: int | None = None) -> Any:
    """The reproducible uniform [0, 1) stream behind DARE's masks (and DELLA's), for rows [row_start, row_end)."""
    import torch

    rows = shape[0] if len(shape) else 1
    row_elems = 1
    for d in shape[1:]:
        row_elems *= d
    end = rows if row_end is None else row_end
    tile_rows = max(1, TILE_ELEMENTS // max(row_elems, 1))
    parts = []
    for tile in range(row_start // tile_rows, (end - 1) // tile_rows + 1 if end > row_start else 0):
        first = tile * tile_rows
        n = min(tile_rows, rows - first)
        gen = torch.Generator().manual_seed(_tile_seed(seed, name, model, tile))
        uniform = torch.rand(n * row_elems, generator=gen)
        lo = max(row_start, first) - first
        hi = min(end, first + n) - first
        parts.append(uniform[lo * row_elems: hi * row_elems])
    flat = torch.cat(parts) if parts else torch.empty(0)
    out_shape = [end - row_start, *shape[1:]] if len(shape) else []
    return flat.reshape(out_shape)


class Dare(Strategy):
    """DARE (Yu et al. 2024): drop each task-vector entry with probability p, rescale survivors by 1/(1-p),
    then add (or, with elect=true, TIES-elect and average); seeded per tensor and model."""

    name = "dare"
    needs_base = True
    params_spec = {
        "drop": Param(0.9, "float", "probability p of dropping a task-vector entry (DARE paper: 0.9)"),
        "rescale": Param(True, "bool", "divide survivors by 1 - p (keeps the expected task vector)"),
        "seed": Param(0, "int", "RNG seed (the mask also depends on tensor name and model index)"),
        "lambda": Param(1.0, "float", "scale of the combined task vector"),
        "weights": Param(None, "floats", "per-model task-vector weights (without election)"),
        "elect": Param(False, "bool", "TIES sign election + disjoint mean instead of a weighted sum"),
    }

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.params["drop"] < 1.0:
            raise UsageError(f"strategy dare: drop must be in [0, 1), got {self.params['drop']}")

    def merge(self, chunk: Chunk) -> Any:
        import torch

        p = self.params
        scale = 1.0 / (1.0 - p["drop"]) if p["rescale"] else 1.0
        sparse = []
        for i, model in enumerate(chunk.models):
            keep = dare_keep_mask(p["seed"], chunk.name, i, chunk.shape, p["drop"], chunk.row_start,
                                  chunk.row_end)
            sparse.append((model - chunk.base) * keep * scale)
            chunk.add("kept", float(keep.sum()) / self.n_models)
        chunk.add("elements", float(chunk.numel))
        if p["elect"]:
            merged, _, _ = elect_and_merge(torch.stack(sparse), 0.0)
        else:
            merged = sum(w * s for w, s in zip(self.model_weights(), sparse))
        return chunk.base + p["lambda"] * merged
