"""Task arithmetic: theta* = theta_0 + lambda * sum_i w_i tau_i, tau_i = theta_i - theta_0 (§2).

Our lambda convention, for any number of models including two: ONE scalar lambda multiplies the SUM
of the task vectors (the TIES/MaTS papers' convention). We deliberately do not copy git-theta's
two-model quirk that turns a scalar lambda into weights [lambda, 1 - lambda]; to interpolate two task
vectors pass weights explicitly (weights=0.7,0.3). Default lambda = 1.0: plain task addition.
"""

from __future__ import annotations

from typing import Any

from gittheta_merge.merge.strategies.base import STREAM_CHUNK_BYTES, Chunk, Param, Strategy


class TaskArithmetic(Strategy):
    name = "task_arithmetic"
    needs_base = True
    chunk_bytes = STREAM_CHUNK_BYTES
    params_spec = {
        "lambda": Param(1.0, "float", "scale applied to the sum of the task vectors"),
        "weights": Param(None, "floats", "per-model task-vector weights (default 1 each)"),
    }

    def merge(self, chunk: Chunk) -> Any:
        # in place, one output buffer: base + lam * (sum_i w_i m_i - (sum_i w_i) base); the chunks are ours
        # to overwrite, and temporaries per model cost as much time as the arithmetic at this size
        lam = self.params["lambda"]
        weights = self.model_weights()
        total = chunk.models[0].mul_(weights[0]) if weights[0] != 1.0 else chunk.models[0]
        for w, model in zip(weights[1:], chunk.models[1:]):
            total.add_(model, alpha=w)
        total.sub_(chunk.base, alpha=sum(weights))
        return total.mul_(lam).add_(chunk.base)
