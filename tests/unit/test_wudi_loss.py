"""WUDI's loss in its Gram form (used for tall matrices, where (tau - tau_i) tau_i^T would be m x m) equals the
definition, straight from the formula in float64."""

from __future__ import annotations

import torch

from gittheta_merge.merge.strategies.wudi import wudi_loss


def test_gram_form_equals_the_definition() -> None:
    g = torch.Generator().manual_seed(0)
    taus = torch.randn(3, 50, 8, generator=g, dtype=torch.float64)
    tau = torch.randn(50, 8, generator=g, dtype=torch.float64)
    sq = taus.reshape(3, -1).square().sum(dim=1)
    want = sum(float(((tau - t) @ t.T).square().sum() / t.square().sum()) for t in taus)
    assert abs(float(wudi_loss(tau, taus, sq)) - want) <= 1e-12 * want
    grams = taus.transpose(1, 2) @ taus
    assert abs(float(wudi_loss(tau, taus, sq, grams)) - want) <= 1e-12 * want
