"""The shared shape of the spectral strategies (Iso-C, Iso-CTS, TSV-Merge): each weight matrix gets a merged task
matrix computed from the task vectors' SVDs (`matrix_delta`), every other tensor the mean task vector (the papers'
fallback for biases and norms), and theta* = theta_0 + alpha times that. Whole matrices: an SVD needs them."""

from __future__ import annotations

from typing import Any

from gittheta_merge.merge.strategies.base import Chunk, Param, Strategy


class SpectralStrategy(Strategy):
    needs_base = True
    row_separable = False
    params_spec = {
        "alpha": Param(1.0, "float", "scale of the merged task vector (the papers tune it on validation data)"),
    }

    def whole_tensor_copies(self) -> int:
        return 2 * self.n_models + 5  # inputs, base, task vectors, U S V^T of the sum (and of each task), result

    def matrix_delta(self, taus: list[Any], report: dict[str, Any]) -> Any:
        """The merged task matrix of 2-D task vectors; may add report fields."""
        raise NotImplementedError

    def merge(self, chunk: Chunk) -> Any:
        base = chunk.base
        taus = [m - base for m in chunk.models]
        if base.dim() == 2:
            delta = self.matrix_delta(taus, chunk.report)
        else:
            delta = sum(taus[1:], taus[0]) / len(taus)
        return base + self.params["alpha"] * delta
