"""The in-memory form of a statistic: named sum tensors, the count each one is a sum over, and provenance.

Sums are kept instead of means (merge-methods.md §8) so that a merge can use either convention without
recomputing: RegMean in the paper weights models by token count (sums), the reference code by model (means).
Sums also make statistics additive: the statistic of a merged model for RegMean/Fisher is the sum of the inputs'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gittheta_merge.errors import StatsError

__all__ = ["KINDS", "Statistic"]

KINDS = ("fisher", "gram", "kfac")


@dataclass
class Statistic:
    """`tensors` maps a tensor key to a sum; `provenance["sharing"]` maps every weight name the statistic covers to
    its tensor key (q/k/v weights reading one input point to one Gram; tied weights to one Fisher);
    `provenance["counts"]` maps each tensor key to the number of terms in its sum (examples for a Fisher, unpadded
    tokens or rows for a Gram / K-FAC factor)."""

    kind: str
    tensors: dict[str, torch.Tensor]
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise StatsError(f"unknown statistic kind {self.kind!r} (one of {', '.join(KINDS)})")

    @property
    def sharing(self) -> dict[str, str]:
        """weight name → tensor key (identity when nothing is shared)."""
        return dict(self.provenance.get("sharing") or {k: k for k in self.tensors})

    @property
    def counts(self) -> dict[str, int]:
        return {k: int(v) for k, v in (self.provenance.get("counts") or {}).items()}

    def key_for(self, weight_name: str) -> str:
        """The tensor key holding the statistic of `weight_name` (KeyError if the statistic does not cover it)."""
        try:
            return self.sharing[weight_name]
        except KeyError:
            raise KeyError(f"the {self.kind} statistic has no entry for weight {weight_name!r}") from None

    def sum_for(self, weight_name: str) -> torch.Tensor:
        return self.tensors[self.key_for(weight_name)]

    def count_for(self, weight_name: str) -> int:
        return self.counts[self.key_for(weight_name)]

    def mean_for(self, weight_name: str) -> torch.Tensor:
        """The sum divided by its count (the convention of the reference code: each model weighs the same)."""
        key = self.key_for(weight_name)
        return self.tensors[key] / max(self.counts[key], 1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())
