"""Simple (weighted) averaging: theta* = sum_i w_i theta_i / sum_i w_i (merge-methods.md §1).

Weights default to uniform. With `normalize=false` the weights are used as given (GT's and RM's
"coefficients" convention, sum_i w_i theta_i), so an extrapolation is expressible too. No base needed.
"""

from __future__ import annotations

from gittheta_merge.errors import UsageError
from gittheta_merge.merge.fused import LinComb
from gittheta_merge.merge.strategies.base import Param
from gittheta_merge.merge.strategies.linear import LinearStrategy


class Average(LinearStrategy):
    """Weighted average of the models: sum_i w_i theta_i / sum_i w_i (Wortsman et al. 2022, model soups); needs
    no base. A linear strategy: its one formula is `lincomb()` (strategies/linear.py)."""

    name = "average"
    params_spec = {
        "weights": Param(None, "floats", "one weight per model (default uniform)"),
        "normalize": Param(True, "bool", "divide by the sum of the weights"),
    }

    def validate(self) -> None:
        super().validate()
        if self.params["normalize"] and abs(sum(self.model_weights())) < 1e-12:
            raise UsageError("strategy average: the weights sum to 0; set normalize=false or change them")

    def _scales(self) -> list[float]:
        weights = self.model_weights()
        total = sum(weights) if self.params["normalize"] else 1.0
        return [w / total for w in weights]

    def lincomb(self) -> LinComb:
        return LinComb(tuple(self._scales()))
