"""mergekit's generalized task arithmetic family (0.1.5), per tensor: Model Breadcrumbs (Davari & Belilovsky 2024),
DARE (Yu et al. 2024) and DELLA (Deep et al. 2024), each with and without TIES' sign consensus.

Per tensor, for each model's task vector tau_i = theta_i - theta_0 (n entries):
  sparsify (density >= 1 keeps everything; with rescale, the kept entries are scaled so their L1 norm equals
  tau_i's, unless either norm is below 1e-7 -- mergekit's rescale, not DARE's 1/p):
    breadcrumbs: sort |tau_i| ascending (equal magnitudes in index order); drop the n_top = int(gamma n) largest
      (outliers) and enough of the smallest to keep target = int(density n): keep ranks [n_bot, n_bot + target),
      n_bot = max(0, n - target - n_top);
    dare: keep each entry with probability density;
    della: keep each entry with probability density - epsilon + 2 epsilon r, r its magnitude rank in its row
      (0 smallest .. 1 largest; a 1-D tensor is one row);
  weight: tau_i *= w_i;
  without consensus: mixed = sum_i tau_i, divisor = sum_i w_i (1 where |divisor| < 1e-8);
  with consensus (the _ties variants, della): elected sign + where sum_i tau_i >= 0, else -;
    mask_i = (sign(tau_i) == elected); mixed = sum_i tau_i mask_i, divisor = sum_i w_i mask_i (1 where 0);
  normalize: mixed /= divisor; then theta_0 + lambda mixed.
The random masks come from our own reproducible stream (dare.uniforms: seed, tensor name, model index), not from
mergekit's global torch RNG, so equality with mergekit holds for the deterministic parts; the random parts match in
their keep rates and expectation (tests/e2e/test_vs_mergekit.py, tests/unit/test_gta_random.py). One deterministic
difference: where magnitudes tie at breadcrumbs' band edges, mergekit's unstable sort keeps whichever of the equal
entries it happens to order first, ours the first in index order.
Whole tensors (ranks and norms are per tensor): peak memory is the models' largest tensor in float32, times M + 2.
"""

from __future__ import annotations

from typing import Any

from gittheta_merge.errors import UsageError
from gittheta_merge.merge.strategies.base import Chunk, Param, Strategy


def order_statistics(values: Any, i: int, j: int) -> tuple[float, float]:
    """The values at ascending ranks i and j (0-based) of a 1-D tensor: on the CPU one numpy introselect for both
    (half the time of two torch.kthvalue), elsewhere (CUDA, half precision) torch.kthvalue."""
    import torch

    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        import numpy as np

        parted = np.partition(values.numpy(), [i, j])
        return float(parted[i]), float(parted[j])
    return float(torch.kthvalue(values, i + 1).values), float(torch.kthvalue(values, j + 1).values)


def keep_middle(tau: Any, density: float, gamma: float) -> Any:
    """Breadcrumbs' keep mask: 1 at the ranks [n_bot, n_bot + target) of |tau| in ascending order, else 0; equal
    magnitudes rank in index order (a stable sort's order).

    Found by selection rather than a sort: the magnitudes at the two boundary ranks (one introselect, linear time)
    bound the kept band, and only entries equal to a boundary value need a rank: the count below that value plus
    their place among the equal ones (such ties are common: a bf16 model's task vectors repeat magnitudes). On a
    400M bf16 merge this took 0.6x the time and 0.7x the memory of the sort (docs/benchmarks.md)."""
    import torch

    n = tau.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    if target <= 0:
        return torch.zeros_like(tau)
    if target >= n:
        return torch.ones_like(tau)
    mags = tau.abs().reshape(-1)
    low, high = order_statistics(mags, n_bot, n_bot + target - 1)
    keep = (mags >= low) & (mags <= high)
    if int(torch.count_nonzero(keep)) != target:  # equal magnitudes straddle a boundary rank: index order decides
        for bound in {low, high}:
            equal = (mags == bound).nonzero().reshape(-1)  # ascending indices: their order among the equal ones
            below = int(torch.count_nonzero(mags < bound))
            first, last = max(n_bot - below, 0), min(n_bot + target - below, len(equal))  # kept: [first, last)
            keep[equal[:first]] = False
            keep[equal[last:]] = False
    return keep.to(tau.dtype).reshape(tau.shape)


def l1_rescaled(tau: Any, kept: Any) -> Any:
    before, after = tau.abs().sum(), kept.abs().sum()
    return kept * (before / after) if before >= 1e-7 and after >= 1e-7 else kept


def common_params(normalize: bool, rescale: bool) -> dict[str, Param]:
    return {
        "density": Param(1.0, "float", "fraction of each task vector kept (mergekit's default 1: nothing dropped); "
                                       "one value, or one per model", per_model=True),
        "weights": Param(None, "floats", "per-model task-vector weights (default 1 each)"),
        "normalize": Param(normalize, "bool", "divide by the sum of the weights (of the agreeing models, with "
                                              "consensus)"),
        "rescale": Param(rescale, "bool", "rescale kept entries to the task vector's L1 norm"),
        "lambda": Param(1.0, "float", "scale of the merged task vector"),
    }


class _TaskVectorFamily(Strategy):
    """The shared merge: sparsify each task vector (`sparsify`), weigh, optional sign consensus, normalise, add."""

    needs_base = True
    row_separable = False
    consensus = False

    def validate(self) -> None:
        super().validate()
        for key in ("density", "gamma"):
            for value in self.values_of(key) if key in self.params else []:
                if not 0.0 <= value <= 1.0:
                    raise UsageError(f"strategy {self.name}: {key} must be in [0, 1], got {value}")

    def keep_mask(self, tau: Any, name: str, model: int) -> Any:
        """1 where an entry of model `model`'s task vector for tensor `name` survives, else 0 (tau's dtype)."""
        raise NotImplementedError

    def sparsify(self, tau: Any, name: str, model: int) -> Any:
        """tau masked by `keep_mask` (untouched at density >= 1), L1-rescaled if asked."""
        if self.for_model("density", model) >= 1:
            return tau
        kept = tau * self.keep_mask(tau, name, model)
        return l1_rescaled(tau, kept) if self.params["rescale"] else kept

    def whole_tensor_copies(self) -> int:
        return 2 * self.n_models + 4  # inputs, base, stacked task vectors, masks and sums

    def merge(self, chunk: Chunk) -> Any:
        import torch

        p = self.params
        base = chunk.base
        weights = torch.tensor(self.model_weights(), dtype=base.dtype).reshape(-1, *([1] * base.dim()))
        taus = torch.stack([self.sparsify(m - base, chunk.name, i) for i, m in enumerate(chunk.models)])
        chunk.report["kept_fraction"] = int(torch.count_nonzero(taus)) / max(taus.numel(), 1)
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


class Breadcrumbs(_TaskVectorFamily):
    """Model Breadcrumbs (mergekit's breadcrumbs): per tensor, each task vector loses its gamma largest-magnitude
    entries (outliers) and its smallest ones down to density, then the weighted task vectors are added."""

    name = "breadcrumbs"
    params_spec = {**common_params(normalize=False, rescale=False),
                   "gamma": Param(0.01, "float", "fraction of largest-magnitude entries dropped as outliers",
                                   per_model=True)}

    def keep_mask(self, tau: Any, name: str, model: int) -> Any:
        return keep_middle(tau, self.for_model("density", model), self.for_model("gamma", model))


class BreadcrumbsTies(Breadcrumbs):
    """Model Breadcrumbs with TIES' sign consensus (mergekit's breadcrumbs_ties): breadcrumbs' sparsification, then
    only entries agreeing with the elected sign (+ where the sum is >= 0) are added."""

    name = "breadcrumbs_ties"
    consensus = True


class DareTies(_TaskVectorFamily):
    """DARE with TIES' sign consensus (mergekit's dare_ties): each task-vector entry kept with probability density
    (seeded, reproducible), kept entries L1-rescaled, then only entries agreeing with the elected sign are added."""

    name = "dare_ties"
    consensus = True
    params_spec = {**common_params(normalize=False, rescale=True),
                   "seed": Param(0, "int", "seed of the random masks (with the tensor name and model index)")}

    def keep_mask(self, tau: Any, name: str, model: int) -> Any:
        from gittheta_merge.merge.strategies.dare import uniforms

        keep = self.for_model("density", model)
        return (uniforms(self.params["seed"], name, model, list(tau.shape)) < keep).to(tau.dtype)


class DareLinear(DareTies):
    """DARE as mergekit's dare_linear: the random, L1-rescaled sparsification of dare_ties, then the weighted task
    vectors are added (no sign consensus)."""

    name = "dare_linear"
    consensus = False


class Della(_TaskVectorFamily):
    """DELLA (mergekit's della): each task-vector entry kept with a probability rising with its magnitude rank in
    its row, from density - epsilon to density + epsilon (seeded), L1-rescaled; TIES' sign consensus; normalised."""

    name = "della"
    consensus = True
    params_spec = {**common_params(normalize=True, rescale=True),
                   "epsilon": Param(0.15, "float", "half-width of the keep probabilities around density",
                                     per_model=True),
                   "seed": Param(0, "int", "seed of the random masks (with the tensor name and model index)")}

    def validate(self) -> None:
        super().validate()
        for i in range(self.n_models):
            d, e = self.for_model("density", i), self.for_model("epsilon", i)
            if 0 < d < 1 and (d + e >= 1 or d - e <= 0):
                raise UsageError(f"strategy {self.name}: epsilon {e} must keep density +- epsilon inside (0, 1) "
                                 f"(density {d})")

    def keep_mask(self, tau: Any, name: str, model: int) -> Any:
        import torch

        from gittheta_merge.merge.strategies.dare import uniforms

        density, eps = self.for_model("density", model), self.for_model("epsilon", model)
        if density <= 0:
            return torch.zeros_like(tau)
        rows = tau if tau.dim() >= 2 else tau.unsqueeze(0)
        order = torch.argsort(rows.abs(), dim=1)
        ranks = torch.empty_like(order)  # the inverse permutation: what a second argsort gives, without a sort
        ranks.scatter_(1, order, torch.arange(rows.shape[1], device=rows.device).expand_as(order))
        ranks = ranks.to(tau.dtype) + 1
        low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
        spread = (ranks - low) / (high - low)  # 0/0 (one entry per row) is NaN, and clamps to 0 as in mergekit
        probs = (density - eps) + torch.nan_to_num(spread, nan=0.0).clamp(0, 1) * 2 * eps
        return (uniforms(self.params["seed"], name, model, list(rows.shape)) < probs).to(tau.dtype).reshape(tau.shape)


class DellaLinear(Della):
    """DELLA without sign consensus (mergekit's della_linear): della's magnitude-ranked random drop, then the
    weighted task vectors are added; not normalised by default."""

    name = "della_linear"
    consensus = False
    params_spec = {**Della.params_spec, **common_params(normalize=False, rescale=True)}
