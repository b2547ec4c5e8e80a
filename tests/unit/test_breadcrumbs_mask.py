"""Breadcrumbs' keep mask, found by selection (gta.keep_middle), against a straight-from-the-definition stable sort:
the same entries on random tensors, on tensors full of equal magnitudes (where only a rank order by index decides),
at the edges of density and gamma, and through the torch.kthvalue path that CUDA and half precision take."""

from __future__ import annotations

import pytest
import torch

from gittheta_merge.merge.strategies.gta import keep_middle


def sorted_reference(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Ranks [n_bot, n_bot + target) of |tau| ascending, equal magnitudes in index order (a stable sort)."""
    n = tau.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = torch.sort(tau.abs().reshape(-1), stable=True).indices
    mask = torch.zeros(n, dtype=tau.dtype)
    mask[order[n_bot:n_bot + target]] = 1
    return mask.reshape(tau.shape)


@pytest.mark.parametrize("values", ["normal", "few-levels", "zeros"])
def test_keep_middle_matches_a_stable_sort(values: str) -> None:
    g = torch.Generator().manual_seed(7)
    for trial in range(400):
        shape = [int(torch.randint(1, 50, (1,), generator=g))] + ([3] if trial % 2 else [])
        if values == "normal":
            tau = torch.randn(shape, generator=g)
        elif values == "few-levels":  # many equal magnitudes at the band's edges
            tau = torch.randint(-3, 4, shape, generator=g).float()
        else:
            tau = torch.zeros(shape)
        density = [0.0, 1.0, float(torch.rand(1, generator=g))][trial % 3]
        gamma = float(torch.rand(1, generator=g)) * 0.4
        mask = keep_middle(tau, density, gamma)
        assert torch.equal(mask, sorted_reference(tau, density, gamma)), (tau, density, gamma)
        assert int(mask.sum()) == int(density * tau.numel())


def test_keep_middle_half_precision_path_agrees() -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        tau = torch.randint(-4, 5, (int(torch.randint(1, 80, (1,), generator=g)),), generator=g).float()
        density, gamma = float(torch.rand(1, generator=g)), float(torch.rand(1, generator=g)) * 0.3
        assert torch.equal(keep_middle(tau.to(torch.bfloat16), density, gamma).float(),
                           keep_middle(tau, density, gamma))
