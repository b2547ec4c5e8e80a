"""Model Stock (Jang et al. 2024) as mergekit 0.1.5 defines it: interpolate between the pretrained weights and the
fine-tunes' average by a ratio set from the angle between the fine-tunes.

Per tensor (or per vector along the last dimension with filter_wise), with offsets d_i = theta_i - theta_0 of N >= 2
fine-tunes: cos = mean over pairs i < j of <d_i, d_j> / max(|d_i| |d_j|, 1e-6), clamped to [-1, 1];
t = N cos / (1 + (N - 1) cos), or 0 where |1 + (N - 1) cos| < 1e-6 (no finite estimate: keep the base);
theta* = t mean_i(theta_i) + (1 - t) theta_0.

Streaming: the whole-tensor cosines come from one statistics pass over the tensor's chunks (dot products and norms
summed in float64), so memory stays one chunk per model; filter_wise needs no pass (each vector lies in one chunk).
"""

from __future__ import annotations

import math
from typing import Any

from gittheta_merge.errors import UsageError
from gittheta_merge.merge.strategies.base import STREAM_CHUNK_BYTES, Chunk, Param, Strategy


class ModelStock(Strategy):
    """Model Stock (mergekit's model_stock): per tensor, t = N cos / (1 + (N-1) cos) from the mean pairwise cosine
    of the fine-tunes' offsets; theta_0 + t (mean of the fine-tunes - theta_0). Needs 2+ fine-tunes and the base."""

    name = "model_stock"
    needs_base = True
    pass_scope = "tensor"
    chunk_bytes = STREAM_CHUNK_BYTES
    params_spec = {
        "filter_wise": Param(False, "bool", "one ratio per vector along the last dimension instead of per tensor"),
    }

    @property
    def n_passes(self) -> int:  # type: ignore[override]
        return 0 if self.params["filter_wise"] else 1

    def validate(self) -> None:
        super().validate()
        if self.n_models < 2:
            raise UsageError("strategy model_stock: needs at least 2 fine-tuned models beside the base")

    def begin_pass(self, index: int) -> None:
        n = self.n_models
        self._dots = [[0.0] * n for _ in range(n)]

    def observe(self, index: int, chunk: Chunk) -> None:
        offsets = [(m.double() - chunk.base.double()).reshape(-1) for m in chunk.models]
        for i, a in enumerate(offsets):
            for j in range(i, len(offsets)):
                self._dots[i][j] += float(a @ offsets[j])

    def end_pass(self, index: int) -> None:
        n = self.n_models
        import torch

        cos = [max(-1.0, min(1.0, self._dots[i][j] / max(math.sqrt(self._dots[i][i] * self._dots[j][j]), 1e-6)))
               for i in range(n) for j in range(i + 1, n)]
        self._t = float(ratio(torch.tensor(sum(cos) / len(cos), dtype=torch.float64), n))

    def merge(self, chunk: Chunk) -> Any:
        import torch

        models, base, n = chunk.models, chunk.base, self.n_models
        if self.params["filter_wise"]:  # one ratio per vector along the last dimension
            offsets = [(m - base).reshape(-1, base.shape[-1]) for m in models]
            norms = [torch.linalg.vector_norm(d, dim=-1) for d in offsets]
            cos = torch.stack([((offsets[i] * offsets[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
                               for i in range(n) for j in range(i + 1, n)]).mean(0)
            t = ratio(cos, n).reshape(*base.shape[:-1], 1)
        else:
            t = self._t
            chunk.report["ratio"] = t
        average = sum(models[1:], models[0]) / n  # ((theta_1 + theta_2) + ...) / N
        return t * average + (1 - t) * base


def ratio(cos: Any, n: int) -> Any:
    """t = N cos / (1 + (N - 1) cos), 0 where the denominator is below 1e-6 (no finite estimate: keep the base)."""
    import torch

    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(cos),
                                                                               denominator))
