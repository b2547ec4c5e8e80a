"""SCE (Wan et al. 2024, FuseChat: select, calculate, erase) as mergekit 0.1.5 defines it, per tensor.

With task vectors tau_i = theta_i - theta_0 of N models:
  select: if select_topk < 1, keep only the k = int(nnz(v) select_topk) entries with the largest variance v across
    the models (population variance; nnz counts entries whose variance is not 0), in every tau_i;
  calculate: model weights w_i = mean(tau_i^2) / sum_j mean(tau_j^2) (equal weights if that sum is below 1e-6);
  erase: per entry keep the tau_i whose sign equals the elected sign (+ where sum_i tau_i >= 0, else -);
  theta* = theta_0 + sum_i w_i m_i tau_i / max(sum_i w_i m_i, 1e-6), m_i the erase mask.
Whole tensors (variance ranks and weights are per tensor): peak memory is the models' largest tensor, times N + 3.
"""

from __future__ import annotations

from typing import Any

from gittheta_merge.errors import UsageError
from gittheta_merge.merge.strategies.base import Chunk, Param, Strategy


class Sce(Strategy):
    """SCE (mergekit's sce): keep the entries whose task vectors vary most across models, weigh each model by its
    task vector's mean square, and average only the entries agreeing with the elected sign."""

    name = "sce"
    needs_base = True
    row_separable = False
    params_spec = {
        "select_topk": Param(1.0, "float", "fraction of the highest-variance entries kept (1: all)"),
    }

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.params["select_topk"] <= 1.0:
            raise UsageError(f"strategy sce: select_topk must be in [0, 1], got {self.params['select_topk']}")

    def whole_tensor_copies(self) -> int:
        return 3 * self.n_models + 4  # inputs, task vectors, masks and weights

    def merge(self, chunk: Chunk) -> Any:
        import torch

        base = chunk.base
        taus = torch.stack([m - base for m in chunk.models])
        density = self.params["select_topk"]
        if density < 1:
            taus = taus * _high_variance(taus, density).unsqueeze(0)
        elected = (taus.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
        agree = (taus.sign() == elected).to(base.dtype)
        sq = taus.square().reshape(taus.shape[0], -1).mean(dim=1)
        total = float(sq.sum())
        weights = torch.full_like(sq, 1 / sq.shape[0]) if abs(total) < 1e-6 else sq / total
        weights = weights.reshape(-1, *([1] * base.dim())) * agree
        return base + (taus * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-6)


def _high_variance(taus: Any, density: float) -> Any:
    """1 at the k entries of largest variance across models (k = int(nonzero variances * density)), else 0."""
    import torch

    var = torch.var(taus, dim=0, unbiased=False)
    mask = torch.zeros_like(var)
    if density <= 0:
        return mask
    k = int(torch.count_nonzero(var) * density)
    if k:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask
