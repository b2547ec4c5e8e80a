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

`ties_local`: the same algorithm with the top-k and the majority sign computed per tensor (mergekit
calls this "ties"); a different method, hence a different name.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from gittheta_merge.errors import ThetaError
from gittheta_merge.merge.strategies.base import Chunk, Param, Strategy

BINS = 1 << 16


def keep_count(total: int, density: float) -> int:
    """int(D * K / 100) computed exactly (density = K/100 given as a decimal, e.g. 0.2)."""
    return int(total * Fraction(repr(float(density))))


def abs_bits(tau: Any) -> Any:
    """The int32 bit patterns of |tau| (float32): monotone in the value for non-negative floats."""
    import torch

    return tau.abs().contiguous().view(torch.int32)


def trim(tau: Any, threshold: float) -> Any:
    return tau * (tau.abs() >= threshold)


def elect_and_merge(trimmed: Any, majority: float) -> tuple[Any, Any, Any]:
    """Sign election (mass) with zeros -> majority, then the disjoint mean. Returns (tau*, sign, mask)."""
    import torch

    sign = torch.sign(trimmed.sum(dim=0))
    if majority != 0:
        sign[sign == 0] = majority
    mask = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * mask
    counts = (selected != 0).sum(dim=0).to(torch.float32)
    return selected.sum(dim=0) / torch.clamp(counts, min=1), sign, mask


class _Selector:
    """Exact k-th smallest |tau| per model by two histogram passes over float32 bit patterns."""

    def __init__(self, n_models: int) -> None:
        import torch

        self.n = n_models
        self.total = 0
        self.hist = [torch.zeros(BINS, dtype=torch.int64) for _ in range(n_models)]
        self.high_bin = [0] * n_models
        self.rank = [0] * n_models  # rank of the wanted value inside its high bin (1-indexed)
        self.thresholds: list[float] = [0.0] * n_models
        self.keep_all = False

    def observe_high(self, taus: list[Any]) -> None:
        import torch

        self.total += taus[0].numel()
        for i, tau in enumerate(taus):
            self.hist[i] += torch.bincount((abs_bits(tau) >> 16).flatten(), minlength=BINS)

    def zeros_high(self, numel: int) -> None:
        self.total += numel
        for hist in self.hist:
            hist[0] += numel

    def end_high(self, density: float) -> None:
        import torch

        kth = self.total - keep_count(self.total, density)
        if kth <= 0 or self.total == 0:
            self.keep_all = True  # density 1: every entry is kept (|tau| >= 0)
            return
        for i, hist in enumerate(self.hist):
            cumulative = torch.cumsum(hist, 0)
            b = int(torch.searchsorted(cumulative, kth))  # first bin with cumulative >= kth
            self.high_bin[i] = b
            self.rank[i] = kth - (int(cumulative[b - 1]) if b > 0 else 0)
            hist.zero_()

    def observe_low(self, taus: list[Any]) -> None:
        import torch

        if self.keep_all:
            return
        for i, tau in enumerate(taus):
            bits = abs_bits(tau).flatten()
            low = bits[(bits >> 16) == self.high_bin[i]] & 0xFFFF
            if low.numel():
                self.hist[i] += torch.bincount(low, minlength=BINS)

    def zeros_low(self, numel: int) -> None:
        for i, hist in enumerate(self.hist):
            if self.high_bin[i] == 0:
                hist[0] += numel

    def end_low(self) -> None:
        import torch

        for i, hist in enumerate(self.hist):
            if self.keep_all:
                self.thresholds[i] = 0.0
                continue
            cumulative = torch.cumsum(hist, 0)
            low = int(torch.searchsorted(cumulative, self.rank[i]))
            bits = torch.tensor([(self.high_bin[i] << 16) | low], dtype=torch.int32)
            self.thresholds[i] = float(bits.view(torch.float32)[0])
        self.hist = []


class Ties(Strategy):
    name = "ties"
    needs_base = True
    n_passes = 3
    pass_scope = "model"
    params_spec = {
        "density": Param(0.2, "float", "fraction of each task vector kept (K/100; paper default 0.2)"),
        "lambda": Param(1.0, "float", "scale of the merged task vector (paper default without validation: 1)"),
    }

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.params["density"] <= 1.0:
            raise ThetaError(f"strategy {self.name}: density must be in [0, 1], got {self.params['density']}")
        self._selector = _Selector(self.n_models)
        self.majority = 0.0
        self._sign_total = 0

    @staticmethod
    def _taus(chunk: Chunk) -> list[Any]:
        return [model - chunk.base for model in chunk.models]

    def begin_pass(self, index: int) -> None:
        if index == 0:
            self._selector = _Selector(self.n_models)
            self._sign_total = 0

    def observe(self, index: int, chunk: Chunk) -> None:
        import torch

        taus = self._taus(chunk)
        if index == 0:
            self._selector.observe_high(taus)
        elif index == 1:
            self._selector.observe_low(taus)
        else:
            trimmed = torch.stack([trim(t, th) for t, th in zip(taus, self._selector.thresholds)])
            self._sign_total += int(torch.sign(trimmed.sum(dim=0)).sum(dtype=torch.int64))

    def observe_zero(self, index: int, name: str, numel: int) -> None:
        if index == 0:
            self._selector.zeros_high(numel)
        elif index == 1:
            self._selector.zeros_low(numel)

    def end_pass(self, index: int) -> None:
        if index == 0:
            self._selector.end_high(self.params["density"])
        elif index == 1:
            self._selector.end_low()
        else:
            self.majority = float((self._sign_total > 0) - (self._sign_total < 0))

    @property
    def thresholds(self) -> list[float]:
        return list(self._selector.thresholds)

    def merge(self, chunk: Chunk) -> Any:
        import torch

        taus = self._taus(chunk)
        trimmed = torch.stack([trim(t, th) for t, th in zip(taus, self._selector.thresholds)])
        merged, sign, mask = elect_and_merge(trimmed, self.majority)
        nonzero = trimmed != 0
        chunk.add("elements", float(chunk.numel))
        chunk.add("kept", float(nonzero.sum()) / self.n_models)
        # a sign conflict: an entry kept in some task whose sign disagrees with the elected sign
        conflict = (nonzero & ~mask).any(dim=0)
        chunk.add("sign_conflicts", float(conflict.sum()))
        return chunk.base + self.params["lambda"] * merged

    def summary(self) -> dict[str, Any]:
        return {"thresholds": self.thresholds, "majority_sign": self.majority,
                "elements": self._selector.total}


class TiesLocal(Ties):
    """TIES with per-tensor top-k and per-tensor majority sign (mergekit's "ties")."""

    name = "ties_local"
    pass_scope = "tensor"

    def summary(self) -> dict[str, Any]:
        return {}
