"""Model Breadcrumbs (Davari & Belilovsky 2024) as mergekit 0.1.5 defines it, with and without TIES' sign consensus.

Per tensor, for each model's task vector tau_i = theta_i - theta_0 (n entries):
  sparsify: sort |tau_i| ascending; drop the n_top = int(gamma n) largest (outliers) and enough of the smallest to
    keep target = int(density n) entries: keep ranks [n_bot, n_bot + target) with n_bot = max(0, n - target - n_top)
    (density >= 1 keeps everything); with rescale, scale the kept entries so their L1 norm equals tau_i's (unless
    either norm is below 1e-7);
  weight: tau_i *= w_i;
  breadcrumbs: mixed = sum_i tau_i, divisor = sum_i w_i (1 where |divisor| < 1e-8);
  breadcrumbs_ties: elected sign + where sum_i tau_i >= 0, else -; mask_i = (sign(tau_i) == elected);
    mixed = sum_i tau_i mask_i, divisor = sum_i w_i mask_i (1 where 0);
  normalize (default off): mixed /= divisor; then theta_0 + lambda mixed.
Whole tensors (the ranks are per tensor): peak memory is the models' largest tensor in float32, times M + 2.
"""

from __future__ import annotations

from typing import Any

from gittheta_merge.errors import ThetaError
from gittheta_merge.merge.strategies.base import Chunk, Param, Strategy


def keep_middle(tau: Any, density: float, gamma: float, rescale: bool) -> Any:
    """tau with all but the ranks [n_bot, n_bot + target) of |tau| (ascending) zeroed; L1-rescaled if asked."""
    import torch

    if density >= 1:
        return tau
    n = tau.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = torch.sort(tau.abs().reshape(-1), descending=False).indices
    mask = torch.zeros(n, dtype=tau.dtype)
    mask[order[n_bot: n_bot + target]] = 1
    kept = tau * mask.reshape(tau.shape)
    if rescale:
        before, after = tau.abs().sum(), kept.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            kept = kept * (before / after)
    return kept


class Breadcrumbs(Strategy):
    """Model Breadcrumbs (mergekit's breadcrumbs): per tensor, each task vector loses its gamma largest-magnitude
    entries (outliers) and its smallest ones down to density, then the weighted task vectors are added."""

    name = "breadcrumbs"
    needs_base = True
    row_separable = False
    consensus = False
    params_spec = {
        "density": Param(1.0, "float", "fraction of each task vector kept (mergekit's default 1: nothing dropped)"),
        "gamma": Param(0.01, "float", "fraction of largest-magnitude entries dropped as outliers"),
        "weights": Param(None, "floats", "per-model task-vector weights (default 1 each)"),
        "normalize": Param(False, "bool", "divide by the sum of the weights (of the agreeing models, with ties)"),
        "rescale": Param(False, "bool", "rescale kept entries to the task vector's L1 norm"),
        "lambda": Param(1.0, "float", "scale of the merged task vector"),
    }

    def validate(self) -> None:
        super().validate()
        for key in ("density", "gamma"):
            if not 0.0 <= self.params[key] <= 1.0:
                raise ThetaError(f"strategy {self.name}: {key} must be in [0, 1], got {self.params[key]}")

    def merge(self, chunk: Chunk) -> Any:
        import torch

        p = self.params
        base = chunk.base
        weights = torch.tensor(self.model_weights(), dtype=base.dtype).reshape(-1, *([1] * base.dim()))
        taus = torch.stack([keep_middle(m - base, p["density"], p["gamma"], p["rescale"]) for m in chunk.models])
        taus.mul_(weights)
        if self.consensus:
            elected = (taus.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
            agree = (taus.sign() == elected).to(base.dtype)
            mixed = (taus * agree).sum(dim=0)
            divisor = (weights * agree).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = taus.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if p["normalize"]:
            mixed /= divisor
        if p["lambda"] != 1:
            mixed *= p["lambda"]
        return base + mixed


class BreadcrumbsTies(Breadcrumbs):
    """Model Breadcrumbs with TIES' sign consensus (mergekit's breadcrumbs_ties): breadcrumbs' sparsification, then
    only entries agreeing with the elected sign (+ where the sum is >= 0) are added."""

    name = "breadcrumbs_ties"
    consensus = True
