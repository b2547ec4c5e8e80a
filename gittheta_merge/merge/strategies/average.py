"""Simple (weighted) averaging: theta* = sum_i w_i theta_i / sum_i w_i (merge-methods.md §1).

Weights default to uniform. With `normalize=false` the weights are used as given (GT's and RM's
"coefficients" convention, sum_i w_i theta_i), so an extrapolation is expressible too. No base needed.
"""

from __future__ import annotations

from typing import Any

from gittheta_merge.errors import ThetaError
from gittheta_merge.merge.strategies.base import STREAM_CHUNK_BYTES, Chunk, Param, Strategy


class Average(Strategy):
    name = "average"
    chunk_bytes = STREAM_CHUNK_BYTES
    params_spec = {
        "weights": Param(None, "floats", "one weight per model (default uniform)"),
        "normalize": Param(True, "bool", "divide by the sum of the weights"),
    }

    def validate(self) -> None:
        super().validate()
        if self.params["normalize"] and abs(sum(self.model_weights())) < 1e-12:
            raise ThetaError("strategy average: the weights sum to 0; set normalize=false or change them")

    def merge(self, chunk: Chunk) -> Any:
        weights = self.model_weights()
        total = sum(weights) if self.params["normalize"] else 1.0
        out = chunk.models[0].mul_(weights[0] / total)  # in place: the engine hands over fresh chunks
        for w, model in zip(weights[1:], chunk.models[1:]):
            out.add_(model, alpha=w / total)
        return out
