"""Task arithmetic: theta* = theta_0 + lambda * sum_i w_i tau_i, tau_i = theta_i - theta_0 (§2).

Our lambda convention, for any number of models including two: ONE scalar lambda multiplies the SUM
of the task vectors (the TIES/MaTS papers' convention). We deliberately do not copy git-theta's
two-model quirk that turns a scalar lambda into weights [lambda, 1 - lambda]; to interpolate two task
vectors pass weights explicitly (weights=0.7,0.3). Default lambda = 1.0: plain task addition.
"""

from __future__ import annotations

from gittheta_merge.merge.fused import LinComb
from gittheta_merge.merge.strategies.base import Param
from gittheta_merge.merge.strategies.linear import LinearStrategy


class TaskArithmetic(LinearStrategy):
    """Task arithmetic (Ilharco et al. 2023): theta_0 + lambda * sum_i w_i (theta_i - theta_0)."""

    name = "task_arithmetic"
    needs_base = True
    params_spec = {
        "lambda": Param(1.0, "float", "scale applied to the sum of the task vectors"),
        "weights": Param(None, "floats", "per-model task-vector weights (default 1 each)"),
        "normalize": Param(False, "bool", "divide the weights by their sum (mergekit's task_arithmetic normalize)"),
    }

    def lincomb(self) -> LinComb:
        weights = self.model_weights()
        total = sum(weights)
        if self.params["normalize"] and abs(total) >= 1e-8:  # mergekit leaves a near-zero sum undivided
            weights = [w / total for w in weights]
        return LinComb(tuple(weights), base_scale=sum(weights), lam=self.params["lambda"])
