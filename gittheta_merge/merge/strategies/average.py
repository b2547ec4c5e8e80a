"""Simple (weighted) averaging: theta* = sum_i w_i theta_i / sum_i w_i (merge-methods.md §1).

Weights default to uniform. With `normalize=false` the weights are used as given (GT's and RM's
"coefficients" convention, sum_i w_i theta_i), so an extrapolation is expressible too. No base needed.
"""

from __future__ import annotations

from typing import Any

from gittheta_merge.errors import ThetaError
from gittheta_merge.merge.fused import LinComb
from gittheta_merge.merge.strategies.base import STREAM_CHUNK_BYTES, Chunk, Param, Strategy


class Average(Strategy):
    """Weighted average of the models: sum_i w_i theta_i / sum_i w_i (Wortsman et al. 2022, model soups); needs
    no base. The linear family: the compiled kernel and numpy compute the same formula."""

    name = "average"
    chunk_bytes = STREAM_CHUNK_BYTES
    numpy_merge = True
    params_spec = {
        "weights": Param(None, "floats", "one weight per model (default uniform)"),
        "normalize": Param(True, "bool", "divide by the sum of the weights"),
    }

    def validate(self) -> None:
        super().validate()
        if self.params["normalize"] and abs(sum(self.model_weights())) < 1e-12:
            raise ThetaError("strategy average: the weights sum to 0; set normalize=false or change them")

    def _scales(self) -> list[float]:
        weights = self.model_weights()
        total = sum(weights) if self.params["normalize"] else 1.0
        return [w / total for w in weights]

    def merge(self, chunk: Chunk) -> Any:
        return weighted_sum_(chunk.models, self._scales())

    def merge_np(self, chunk: Chunk) -> Any:
        return weighted_sum_np(chunk.models, self._scales())

    def lincomb(self) -> LinComb:
        return LinComb(tuple(self._scales()))


def weighted_sum_(models: list[Any], scales: list[float]) -> Any:
    """sum_i s_i m_i into models[0], in place (the engine hands over chunks we may overwrite; models[1:] are
    scaled in place too). Each product is rounded, then added (no fused multiply-add), in the same order as
    weighted_sum_np, so the torch and numpy paths agree bit for bit. Shared with task arithmetic."""
    out = models[0]
    if scales[0] != 1.0:
        out.mul_(scales[0])
    for scale, model in zip(scales[1:], models[1:]):
        out.add_(model.mul_(scale) if scale != 1.0 else model)
    return out


def weighted_sum_np(models: list[Any], scales: list[float]) -> Any:
    """The numpy twin of weighted_sum_ (the torch-free path): same operations, same order."""
    import numpy as np

    out = models[0]
    if scales[0] != 1.0:
        np.multiply(out, scales[0], out=out)
    for scale, model in zip(scales[1:], models[1:]):
        if scale != 1.0:
            np.multiply(model, scale, out=model)
        np.add(out, model, out=out)
    return out
