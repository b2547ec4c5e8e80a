"""The linear family (average, task arithmetic, and any strategy that is a fixed linear combination): a strategy
states its formula once, as a `LinComb` (merge/fused.py: sum_i s_i x_i, then optionally (acc - c b) * lam + b), and
the three backends compute that LinComb: torch (`apply_torch`), numpy (`apply_numpy`, the torch-free path) and the
compiled kernel. All three round every product before adding it (no fused multiply-add) and add left to right, so
they agree bit for bit (tests/unit/test_merge_fused.py, tests/unit/test_merge_numpy_path.py).
"""

from __future__ import annotations

from typing import Any

from gittheta_merge.merge.fused import LinComb
from gittheta_merge.merge.strategies.base import STREAM_CHUNK_BYTES, Chunk, Strategy


class LinearStrategy(Strategy):
    """A strategy that is a LinComb of the models (and base): subclasses declare parameters and `lincomb()`."""

    chunk_bytes = STREAM_CHUNK_BYTES
    numpy_merge = True

    def lincomb(self) -> LinComb:
        raise NotImplementedError

    def merge(self, chunk: Chunk) -> Any:
        return apply_torch(self.lincomb(), chunk.models, chunk.base, self.pool)

    def merge_np(self, chunk: Chunk) -> Any:
        return apply_numpy(self.lincomb(), chunk.models, chunk.base, self.pool)


def apply_torch(comb: LinComb, models: list[Any], base: Any, pool: Any) -> Any:
    """The LinComb on float32 torch chunks, in place in models[0] (the engine's chunks are ours to overwrite)."""
    import torch

    acc = models[0]
    if comb.scales[0] != 1.0:
        acc.mul_(comb.scales[0])
    for scale, model in zip(comb.scales[1:], models[1:]):
        acc.add_(model.mul_(scale) if scale != 1.0 else model)
    if comb.base_scale is None:
        return acc
    acc.sub_(torch.mul(base, comb.base_scale, out=pool.like("scaled_base", base)))
    if comb.lam != 1.0:
        acc.mul_(comb.lam)
    return acc.add_(base)


def apply_numpy(comb: LinComb, models: list[Any], base: Any, pool: Any) -> Any:
    """apply_torch on numpy float32 arrays: the same operations in the same order."""
    import numpy as np

    acc = models[0]
    if comb.scales[0] != 1.0:
        np.multiply(acc, comb.scales[0], out=acc)
    for scale, model in zip(comb.scales[1:], models[1:]):
        if scale != 1.0:
            np.multiply(model, scale, out=model)
        np.add(acc, model, out=acc)
    if comb.base_scale is None:
        return acc
    scaled = pool.get_np("scaled_base", base.shape, np.float32)
    np.subtract(acc, np.multiply(base, comb.base_scale, out=scaled), out=acc)
    if comb.lam != 1.0:
        np.multiply(acc, comb.lam, out=acc)
    return np.add(acc, base, out=acc)
