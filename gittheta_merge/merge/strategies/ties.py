"""TIES-Merging, exactly as the reference code (§3), in bounded memory; and ties_local (per tensor).

`ties`: per task i, keep the entries of tau_i whose magnitude is >= t_i, where t_i is the
(D - int(D*K/100))-th smallest |tau_i| over the WHOLE model (D = every entry of every tensor merged with
this strategy, including tensors unchanged everywhere, which count as zeros without being read). t_i is
found exactly in two streaming passes: a 65536-bin histogram of the high 16 bits of the float32 bit
pattern of |tau_i| (non-negative floats order like their bit patterns), then a histogram of the low 16
bits restricted to the bin that holds the k-th value. A third pass sums sign(sum_i trimmed tau_i) over
the whole model: the global majority sign that replaces zero elected signs (0 stays 0, as in the
reference). The merge pass then needs only each chunk: disjoint mean of the entries agreeing with the
elected sign (s > 0 selects positive entries, otherwise negative ones, exactly like the reference), and
theta_0 + lambda * tau*. Peak memory: (M+1) chunks + 2 x 65536 x M counters.

`ties_local`: mergekit's `ties` (0.1.5, `sparsify.magnitude` + `get_mask(method="sum")`), per tensor: keep
exactly max(1, int(density * n)) entries of tau_i by magnitude (the k-th largest |tau_i| is the threshold; the
paper's code keeps one more), elect sign(sum_i trimmed tau_i) with a zero sum counting as +1 (no majority pass),
and average the entries that share the elected sign. A different method from `ties`, hence a different name.
"""

from __future__ import annotations

import struct
from fractions import Fraction
from typing import Any

from gittheta_merge.errors import UsageError
from gittheta_merge.merge.strategies.base import STREAM_CHUNK_BYTES, Chunk, Param, Strategy

BINS = 1 << 16


def keep_count(total: int, density: float) -> int:
    """int(D * K / 100) computed exactly (density = K/100 given as a decimal, e.g. 0.2)."""
    return int(total * Fraction(repr(float(density))))


def below(threshold: float) -> float:
    """The largest float32 below a positive float32 `threshold`: for float32 x, |x| >= threshold exactly
    when |x| > below(threshold), which is what hardshrink tests (one fused op instead of abs, compare, mul)."""
    bits = struct.unpack("<I", struct.pack("<f", threshold))[0]
    return struct.unpack("<f", struct.pack("<I", bits - 1))[0]


def trim_(tau: Any, threshold: float) -> Any:
    """tau * (|tau| >= threshold), in place."""
    import torch

    if threshold == float("inf"):
        tau.zero_()
    elif threshold > 0:
        torch.hardshrink(tau, below(threshold), out=tau)
    return tau


def elect_and_merge(trimmed: Any, majority: float) -> tuple[Any, Any, Any]:
    """Sign election (mass) with zeros -> majority, then the disjoint mean. Returns (tau*, sign, mask).

    The straightforward form on a stacked [M, ...] tensor (DARE's elect=true uses it); TIES itself runs the
    equivalent buffer-reusing form in Ties.merge."""
    import torch

    sign = torch.sign(trimmed.sum(dim=0))
    if majority != 0:
        sign[sign == 0] = majority
    mask = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * mask
    counts = (selected != 0).sum(dim=0).to(torch.float32)
    return selected.sum(dim=0) / torch.clamp(counts, min=1), sign, mask


def _sum_into(out: Any, parts: list[Any]) -> Any:
    """out = ((p0 + p1) + p2) + ..., the order a sum over a stacked first dimension uses."""
    import torch

    if len(parts) == 1:
        return out.copy_(parts[0])
    torch.add(parts[0], parts[1], out=out)
    for part in parts[2:]:
        out.add_(part)
    return out


def _count_sum(values: Any) -> int:
    """Exact sum of a float tensor of small integers (float32 is exact below 2**24 elements)."""
    import torch

    if values.numel() < (1 << 24):
        return int(values.sum())
    return int(values.sum(dtype=torch.float64))


class _Selector:
    """Exact k-th smallest |tau| per model by two histogram passes over float32 bit patterns."""

    def __init__(self, n_models: int, pool: Any, keep_exactly: bool = False) -> None:
        import torch

        self.keep_exactly = keep_exactly  # mergekit: exactly max(1, k) entries; the paper's code: k + 1
        self.n = n_models
        self.pool = pool
        self.total = 0
        self.hist = [torch.zeros(BINS, dtype=torch.int64) for _ in range(n_models)]
        self.high_bin = [0] * n_models
        self.rank = [0] * n_models  # rank of the wanted value inside its high bin (1-indexed)
        self.thresholds: list[float] = [0.0] * n_models
        self.keep_all = [False] * n_models
        self.keep_none = [False] * n_models

    def _high(self, tau: Any) -> tuple[Any, Any]:
        """(|tau| bits, their high 16 bits), flat; |tau| is taken in place."""
        import torch

        bits = tau.abs_().view(-1).view(torch.int32)
        return bits, torch.bitwise_right_shift(bits, 16, out=self.pool.like("high", bits))

    def observe_high(self, taus: list[Any]) -> None:
        import torch

        self.total += taus[0].numel()
        for i, tau in enumerate(taus):
            self.hist[i] += torch.bincount(self._high(tau)[1], minlength=BINS)

    def zeros_high(self, numel: int) -> None:
        self.total += numel
        for hist in self.hist:
            hist[0] += numel

    def end_high(self, densities: list[float]) -> None:
        """Each model's threshold bin for its own density (mergekit allows one density per model)."""
        import torch

        for i, (hist, density) in enumerate(zip(self.hist, densities)):
            keep = keep_count(self.total, density)
            if self.keep_exactly:
                if density <= 0:
                    self.keep_none[i] = True
                    continue
                keep = max(1, keep)
            # the threshold is the kth smallest |tau|: kthvalue(D - k) in the paper's code (keeps k + 1 entries),
            # the k-th largest, kthvalue(D - k + 1), where exactly k are kept
            kth = self.total - keep + (1 if self.keep_exactly else 0)
            if kth <= 0 or self.total == 0 or (self.keep_exactly and density >= 1):
                self.keep_all[i] = True  # density 1: every entry is kept (|tau| >= 0)
                continue
            cumulative = torch.cumsum(hist, 0)
            b = int(torch.searchsorted(cumulative, kth))  # first bin with cumulative >= kth
            self.high_bin[i] = b
            self.rank[i] = kth - (int(cumulative[b - 1]) if b > 0 else 0)
            hist.zero_()

    def observe_low(self, taus: list[Any]) -> None:
        """Histogram of the low 16 bits of the entries in the boundary high bin. No boolean indexing (10x
        slower): key = bits - (first bit pattern of the bin - 1), clamped to [0, 65537], so entries below the
        bin count in bin 0, above it in 65537, and the boundary bin's entries land in 1..65536."""
        import torch

        for i, tau in enumerate(taus):
            if self.keep_all[i] or self.keep_none[i]:
                continue
            bits = tau.abs_().view(-1).view(torch.int32)
            key = torch.sub(bits, (self.high_bin[i] << 16) - 1, out=self.pool.like("high", bits))
            counts = torch.bincount(key.clamp_(0, BINS + 1), minlength=BINS + 2)
            self.hist[i] += counts[1: BINS + 1]

    def zeros_low(self, numel: int) -> None:
        for i, hist in enumerate(self.hist):
            if self.high_bin[i] == 0:
                hist[0] += numel

    def end_low(self) -> None:
        import torch

        for i, hist in enumerate(self.hist):
            if self.keep_all[i] or self.keep_none[i]:
                self.thresholds[i] = float("inf") if self.keep_none[i] else 0.0
                continue
            cumulative = torch.cumsum(hist, 0)
            low = int(torch.searchsorted(cumulative, self.rank[i]))
            bits = torch.tensor([(self.high_bin[i] << 16) | low], dtype=torch.int32)
            self.thresholds[i] = float(bits.view(torch.float32)[0])
        self.hist = []


class Ties(Strategy):
    """TIES as the paper's code computes it: global top-k per task (k + 1 kept), global majority sign."""

    name = "ties"
    needs_base = True
    n_passes = 3
    keep_exactly = False  # top-k convention: the paper's kthvalue(D - k) (see _Selector)
    pass_scope = "model"
    chunk_bytes = STREAM_CHUNK_BYTES
    params_spec = {
        "density": Param(0.2, "float", "fraction of each task vector kept (K/100; paper default 0.2)"),
        "lambda": Param(1.0, "float", "scale of the merged task vector (paper default without validation: 1)"),
    }

    def validate(self) -> None:
        super().validate()
        for density in self.values_of("density"):
            if not 0.0 <= density <= 1.0:
                raise UsageError(f"strategy {self.name}: density must be in [0, 1], got {density}")
        self._selector: _Selector | None = None  # made by the first statistics pass (planning needs no torch)
        self.majority = 0.0
        self._sign_total = 0

    @staticmethod
    def _taus(chunk: Chunk) -> list[Any]:
        """tau_i = theta_i - theta_0, in place (the engine's chunk buffers are ours to overwrite)."""
        return [model.sub_(chunk.base) for model in chunk.models]

    def begin_pass(self, index: int) -> None:
        if index == 0:
            self._selector = _Selector(self.n_models, self.pool, keep_exactly=self.keep_exactly)
            self._sign_total = 0

    def _trimmed_sum(self, taus: list[Any]) -> Any:
        """Trim each task vector to its threshold, then weigh it (mergekit: sparsify, then weight), in place."""
        weights = self.params.get("weights")
        for i, (tau, th) in enumerate(zip(taus, self._selector.thresholds)):
            trim_(tau, th)
            if weights is not None and weights[i] != 1.0:
                tau.mul_(weights[i])
        return _sum_into(self.pool.like("sum", taus[0]), taus)

    def observe(self, index: int, chunk: Chunk) -> None:
        taus = self._taus(chunk)
        if index == 0:
            self._selector.observe_high(taus)
        elif index == 1:
            self._selector.observe_low(taus)
        else:
            self._sign_total += _count_sum(self._trimmed_sum(taus).sign_())

    def observe_zero(self, index: int, name: str, numel: int) -> None:
        if index == 0:
            self._selector.zeros_high(numel)
        elif index == 1:
            self._selector.zeros_low(numel)

    def reduce_pass(self, index: int, all_reduce: Any) -> None:
        """Histograms, element count and sign total are integers: their sums over ranks are exact, so every rank
        finds the same thresholds and majority sign as one process over the whole model."""
        import torch

        if index < 2:  # the histograms; pass 0 also counts the elements (pass 1 leaves that count as it is)
            sel = self._selector
            total = [sel.total] if index == 0 else []
            state = torch.cat([torch.stack(sel.hist).view(-1), torch.tensor(total, dtype=torch.int64)])
            all_reduce(state)
            sel.hist = [h.clone() for h in state[: self.n_models * BINS].view(self.n_models, BINS)]
            if index == 0:
                sel.total = int(state[-1])
        else:
            total = torch.tensor([self._sign_total], dtype=torch.int64)
            self._sign_total = int(all_reduce(total)[0])

    def end_pass(self, index: int) -> None:
        if index == 0:
            self._selector.end_high([self.for_model("density", i) for i in range(self.n_models)])
        elif index == 1:
            self._selector.end_low()
        else:
            self.majority = float((self._sign_total > 0) - (self._sign_total < 0))

    @property
    def thresholds(self) -> list[float]:
        return list(self._selector.thresholds) if self._selector else [0.0] * self.n_models

    def merge(self, chunk: Chunk) -> Any:
        """elect_and_merge's result, in float ops on reused buffers (no stacking, no boolean masks):
        sigma = +1 where the elected sign (zeros -> majority) is > 0, else -1 (s <= 0 selects negative
        entries, as in the reference); y_i = sigma * trimmed_i is > 0 where model i agrees and < 0 where it
        conflicts; tau* = sigma * sum_i relu(y_i) / max(#{i: y_i > 0}, 1). Every step is exact (sign flips,
        relu), so the result equals the reference's masked sum and division."""
        import torch

        taus = self._taus(chunk)
        sigma = self._trimmed_sum(taus).sign_()
        # sign(2 s + majority - 1/2): s = +-1 keeps its sign; s = 0 takes the majority's, or -1 if that is 0
        sigma.mul_(2).add_(self.majority - 0.5).sign_()
        for y in taus:
            y.mul_(sigma)
        # report counters in float ops (count_nonzero is ~10x slower than sign + abs + sum here)
        low = self.pool.like("min", taus[0])
        chunk.add("elements", float(chunk.numel))
        chunk.add("kept", sum(_count_sum(torch.sign(y, out=low).abs_()) for y in taus) / self.n_models)
        # a sign conflict: an entry kept in some task whose sign disagrees with the elected sign (y_i < 0)
        if len(taus) == 1:
            low.copy_(taus[0])
        else:
            torch.minimum(taus[0], taus[1], out=low)
            for y in taus[2:]:
                torch.minimum(low, y, out=low)
        chunk.add("sign_conflicts", -_count_sum(low.clamp_(max=0).sign_()))
        for y in taus:
            y.clamp_(min=0)
        merged = _sum_into(self.pool.like("agree", taus[0]), taus)
        weights = self.params.get("weights")
        if not self.params.get("normalize", True):
            pass  # mergekit's normalize=false: the sum of the agreeing task vectors
        elif weights is None:  # the disjoint mean: divide by how many models agree (at least 1)
            merged.div_(_sum_into(low, [y.sign_() for y in taus]).clamp_(min=1))
        else:  # mergekit: by the agreeing models' weights, 1 where none agree
            divisor = _sum_into(low, [y.sign_().mul_(w) for y, w in zip(taus, weights)])
            merged.div_(divisor.masked_fill_(divisor == 0, 1))
        merged.mul_(sigma)
        lam = self.params["lambda"]
        if lam != 1.0:
            merged.mul_(lam)
        return merged.add_(chunk.base)

    def summary(self) -> dict[str, Any]:
        return {"thresholds": self.thresholds, "majority_sign": self.majority,
                "elements": self._selector.total if self._selector else 0}


class TiesLocal(Ties):
    """mergekit's `ties`, per tensor: exactly max(1, int(density * n)) entries kept by magnitude, a zero sign sum
    elects + (mergekit's get_mask), so there is no majority pass; equal to mergekit 0.1.5
    (tests/e2e/test_vs_mergekit)."""

    name = "ties_local"
    pass_scope = "tensor"
    n_passes = 2
    keep_exactly = True
    params_spec = {
        "density": Param(0.2, "float", "fraction of each tensor's task vector kept, exactly max(1, int(density*n)) "
                                       "entries (mergekit's convention); one value, or one per model",
                         per_model=True),
        "lambda": Param(1.0, "float", "scale of the merged task vector (mergekit's lambda)"),
        "weights": Param(None, "floats", "per-model weights of the trimmed task vectors (mergekit's weight; "
                                         "default 1 each: the disjoint mean)"),
        "normalize": Param(True, "bool", "with weights: divide by the sum of the agreeing models' weights"),
    }

    def validate(self) -> None:
        super().validate()
        self.majority = 1.0  # mergekit: majority_sign = +1 where the sum of trimmed task vectors is >= 0

    def summary(self) -> dict[str, Any]:
        return {}
