"""Task arithmetic: theta* = theta_0 + lambda * sum_i w_i tau_i, tau_i = theta_i - theta_0 (§2).

Our lambda convention, for any number of models including two: ONE scalar lambda multiplies the SUM
of the task vectors (the TIES/MaTS papers' convention). We deliberately do not copy git-theta's
two-model quirk that turns a scalar lambda into weights [lambda, 1 - lambda]; to interpolate two task
vectors pass weights explicitly (weights=0.7,0.3). Default lambda = 1.0: plain task addition.
"""

from __future__ import annotations

from typing import Any

from gittheta_merge.merge.strategies.base import Chunk, Param, Strategy


class TaskArithmetic(Strategy):
    name = "task_arithmetic"
    needs_base = True
    params_spec = {
        "lambda": Param(1.0, "float", "scale applied to the sum of the task vectors"),
        "weights": Param(None, "floats", "per-model task-vector weights (default 1 each)"),
    }

    def merge(self, chunk: Chunk) -> Any:
        lam = self.params["lambda"]
        total = None
        for w, model in zip(self.model_weights(), chunk.models):
            tau = (model - chunk.base) * w
            total = tau if total is None else total.add_(tau)
        return chunk.base + lam * total
