"""Task arithmetic: theta* = theta_0 + lambda * sum_i w_i tau_i, tau_i = theta_i - theta_0 (§2).

Our lambda convention, for any number of models including two: ONE scalar lambda multiplies the SUM
of the task vectors (the TIES/MaTS papers' convention). We deliberately do not copy git-theta's
two-model quirk that turns a scalar lambda into weights [lambda, 1 - lambda]; to interpolate two task
vectors pass weights explicitly (weights=0.7,0.3). Default lambda = 1.0: plain task addition.
"""

from __future__ import annotations

from typing import Any

from gittheta_merge.merge.fused import LinComb
from gittheta_merge.merge.strategies.average import weighted_sum_, weighted_sum_np
from gittheta_merge.merge.strategies.base import STREAM_CHUNK_BYTES, Chunk, Param, Strategy


class TaskArithmetic(Strategy):
    """Task arithmetic (Ilharco et al. 2023): theta_0 + lambda * sum_i w_i (theta_i - theta_0)."""

    name = "task_arithmetic"
    needs_base = True
    chunk_bytes = STREAM_CHUNK_BYTES
    numpy_merge = True
    params_spec = {
        "lambda": Param(1.0, "float", "scale applied to the sum of the task vectors"),
        "weights": Param(None, "floats", "per-model task-vector weights (default 1 each)"),
    }

    def merge(self, chunk: Chunk) -> Any:
        # in place, one output buffer: base + lam * (sum_i w_i m_i - (sum_i w_i) base); the chunks are ours
        # to overwrite. Same float32 operations in the same order as merge_np (no fused multiply-add).
        import torch

        lam = self.params["lambda"]
        weights = self.model_weights()
        total = weighted_sum_(chunk.models, weights)
        total.sub_(torch.mul(chunk.base, sum(weights), out=self.pool.like("scaled_base", chunk.base)))
        if lam != 1.0:
            total.mul_(lam)
        return total.add_(chunk.base)

    def merge_np(self, chunk: Chunk) -> Any:
        import numpy as np

        lam = self.params["lambda"]
        weights = self.model_weights()
        total = weighted_sum_np(chunk.models, weights)
        scaled = self.pool.get_np("scaled_base", chunk.base.shape, np.float32)
        np.subtract(total, np.multiply(chunk.base, sum(weights), out=scaled), out=total)
        if lam != 1.0:
            np.multiply(total, lam, out=total)
        return np.add(total, chunk.base, out=total)

    def lincomb(self) -> LinComb:
        weights = self.model_weights()
        return LinComb(tuple(weights), base_scale=sum(weights), lam=self.params["lambda"])
