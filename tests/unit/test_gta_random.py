"""The random members of the task-vector family (dare_ties, dare_linear, della, della_linear): reproducible from
their seed, keep rates as declared, L1 rescale exact, DELLA's keep probability rising with magnitude rank."""

from __future__ import annotations

import torch

from gittheta_merge.merge.strategies.gta import DareTies, Della


def test_dare_mask_is_reproducible_keeps_density_and_rescales_l1() -> None:
    tau = torch.randn(400, 300, generator=torch.Generator().manual_seed(0))
    dare = DareTies({"density": 0.3, "rescale": False, "seed": 4}, 2)
    a, b = dare.sparsify(tau, "w", 0), dare.sparsify(tau, "w", 0)
    assert torch.equal(a, b)
    assert not torch.equal(a, dare.sparsify(tau, "w", 1))  # another model: another mask
    assert not torch.equal(a, DareTies({"density": 0.3, "rescale": False, "seed": 5}, 2).sparsify(tau, "w", 0))
    rate = float((a != 0).float().mean())
    assert abs(rate - 0.3) < 5 * (0.3 * 0.7 / tau.numel()) ** 0.5
    scaled = DareTies({"density": 0.3, "seed": 4}, 2).sparsify(tau, "w", 0)
    torch.testing.assert_close(scaled.abs().sum(), tau.abs().sum(), rtol=1e-5, atol=0)
    assert torch.equal(scaled != 0, a != 0)


def test_della_keep_probability_rises_linearly_with_rank() -> None:
    rows, cols = 2000, 50
    tau = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))
    kept = Della({"density": 0.5, "epsilon": 0.2, "rescale": False, "seed": 3}, 2).sparsify(tau, "w", 0) != 0
    ranks = torch.argsort(torch.argsort(tau.abs(), dim=1), dim=1)  # 0 smallest .. cols-1 largest
    for r in (0, cols // 2, cols - 1):
        expected = 0.3 + 0.4 * r / (cols - 1)
        rate = float(kept[ranks == r].float().mean())
        assert abs(rate - expected) < 5 * (expected * (1 - expected) / rows) ** 0.5, (r, rate, expected)
