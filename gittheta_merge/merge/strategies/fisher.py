"""Diagonal Fisher merging (§4): theta* = sum_i c_i F~_i theta_i / sum_i c_i F~_i, elementwise.

Defaults follow the reference implementation (mmatena/model_merging): floor 1e-6; `favor_target=true`
applies the floor only to model 0 (ours, the target), so entries with no Fisher mass anywhere fall
back to the target's value; `normalize=true` divides each model's coefficient by the global L2 norm of
its Fisher over every tensor merged with this strategy (a prepare step that reads statistics only).
Where the denominator is still exactly 0 (possible only with c_0 = 0 or floor = 0) we take the plain
mean of the models: git-theta's branch returns 0 there, which silently zeroes frozen parameters.
We also do not copy git-theta's M = 2 default coefficients [1, 0] (model 2 ignored): c defaults to 1.

Statistics: kind "fisher", one safetensors file per model keyed by tensor name, same shapes, fp32.
"""

from __future__ import annotations

import math
from typing import Any

from gittheta_merge.errors import InputError, MissingError
from gittheta_merge.merge.strategies.base import Chunk, Param, StatsAccess, Strategy

KIND = "fisher"


class Fisher(Strategy):
    """Fisher merging (Matena & Raffel 2022): per-parameter average weighted by each model's diagonal Fisher
    (statistic `fisher`, from `git theta stats compute --kind fisher`)."""

    name = "fisher"
    params_spec = {
        "floor": Param(1e-6, "float", "minimum Fisher value (FISH --fisher_floor)"),
        "favor_target": Param(True, "bool", "apply the floor to model 0 (ours) only"),
        "normalize": Param(True, "bool", "divide each model's coefficient by its global Fisher L2 norm"),
        "weights": Param(None, "floats", "per-model coefficients c_i (default 1 each)"),
        "missing": Param("error", "choice", "tensors without a Fisher: error or average",
                         ("error", "average")),
    }

    def validate(self) -> None:
        super().validate()
        self.norms = [1.0] * self.n_models

    def stat_kinds(self) -> tuple[str, ...]:
        return (KIND,)

    def _counts_weights(self, stats: StatsAccess) -> list[float]:
        """Coefficients for tensors merged without a Fisher: explicit weights, else how many models each input
        stands for (a merged model carrying derived statistics counts as the models it merged)."""
        if self.params.get("weights") is not None:
            return self.model_weights()
        from gittheta_merge.merge.statsflow import model_counts

        return [float(c) for c in model_counts(stats, KIND, self.n_models)]

    def _has(self, name: str, stats: StatsAccess) -> bool:
        return all(stats.lookup(KIND, i, name) is not None for i in range(self.n_models))

    def check_tensor(self, name: str, shape: list[int], stats: StatsAccess) -> None:
        if not stats.has_kind(KIND):
            raise MissingError("strategy fisher needs Fisher statistics: one safetensors file per model "
                             "(--stats fisher=ours.safetensors,theirs.safetensors)")
        for i in range(self.n_models):
            got = stats.shape(KIND, i, name)
            if got is None:
                if self.params["missing"] == "average":
                    continue
                raise MissingError(f"tensor {name!r}: no Fisher for model {i}; add it to the statistics file, "
                                 f"or set missing=average, or keep one side with a rule")
            if got != shape:
                raise InputError(f"tensor {name!r}: Fisher of model {i} has shape {got}, the tensor {shape}")

    def prepare(self, owned: list[tuple[str, list[int]]], stats: StatsAccess) -> None:
        if not self.params["normalize"]:
            return
        for i in range(self.n_models):
            total = 0.0
            for name, _ in owned:
                if stats.lookup(KIND, i, name) is None:
                    continue
                f = stats.whole(KIND, i, name).double()
                total += float((f * f).sum())
            if total == 0.0:
                raise InputError(f"the Fisher of model {i} is zero everywhere: cannot normalize "
                                 "(set normalize=false)")
            self.norms[i] = math.sqrt(total)

    def merge(self, chunk: Chunk) -> Any:
        import torch

        p = self.params
        coeffs = [c / n for c, n in zip(self.model_weights(), self.norms)]
        if not self._has(chunk.name, chunk.stats):
            w = self._counts_weights(chunk.stats)
            return sum(c * m for c, m in zip(w, chunk.models)) / sum(w)
        num = torch.zeros_like(chunk.models[0])
        den = torch.zeros_like(chunk.models[0])
        for i, (c, model) in enumerate(zip(coeffs, chunk.models)):
            f = chunk.stats.rows(KIND, i, chunk.name, chunk.row_start, chunk.row_end).to(model.device, torch.float32)
            if i == 0 or not p["favor_target"]:
                f = torch.clamp(f, min=p["floor"])
            num += c * f * model
            den += c * f
        zero = den == 0
        out = num / torch.where(zero, torch.ones_like(den), den)
        if bool(zero.any()):
            w = self._counts_weights(chunk.stats)
            mean = sum(c * m for c, m in zip(w, chunk.models)) / sum(w)
            out = torch.where(zero, mean, out)
            chunk.add("zero_fisher_entries", float(zero.sum()))
        return out

    def summary(self) -> dict[str, Any]:
        return {"fisher_norms": self.norms} if self.params["normalize"] else {}
