"""TSV-Merge (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model Merging").

For each 2-D tensor, with T task vectors tau_i = theta_i - theta_0 of thin SVD U_i S_i V_i^T (r = min(rows, cols)
singular values) and k = int(r / T): the first k singular triplets of every task are placed side by side,
U = [U_1[:, :k] ... U_T[:, :k]] (r columns, the rest zero), S = [S_1[:k] ... S_T[:k]], V^T likewise by rows; their
interference is removed by replacing U and V^T with their closest orthogonal matrices (polar factors: U = P Q^T for
U = P Sigma Q^T, the same for V^T), and Delta = U diag(S) V^T. Every other tensor (1-D) takes the mean task vector.
theta* = theta_0 + alpha Delta (alpha 1 by default, as the paper's TSV-M). Whole matrices (T + 2 SVDs): peak memory
is several copies of the models' largest matrix in float32.
"""

from __future__ import annotations

from typing import Any

from gittheta_merge.merge.strategies.iso import closest_orthogonal
from gittheta_merge.merge.strategies.spectral import SpectralStrategy


def tsv_delta(taus: list[Any]) -> Any:
    """The merged task matrix of 2-D task vectors (the definition above)."""
    import torch

    t = len(taus)
    us, ss, vhs = zip(*(torch.linalg.svd(tau, full_matrices=False) for tau in taus))
    r = ss[0].shape[0]
    k = int(r / t)
    u_cat, s_cat, vh_cat = torch.zeros_like(us[0]), torch.zeros_like(ss[0]), torch.zeros_like(vhs[0])
    for i, (u, s, vh) in enumerate(zip(us, ss, vhs)):
        u_cat[:, i * k:(i + 1) * k] = u[:, :k]
        s_cat[i * k:(i + 1) * k] = s[:k]
        vh_cat[i * k:(i + 1) * k, :] = vh[:k, :]
    return (closest_orthogonal(u_cat) * s_cat) @ closest_orthogonal(vh_cat)


class TsvMerge(SpectralStrategy):
    """TSV-Merge: per weight matrix, each task keeps its top 1/T singular vectors, and the stacked singular vectors
    are orthogonalised (closest orthogonal matrix) to remove interference; 1-D tensors get the mean task vector."""

    name = "tsv_merge"

    def whole_tensor_copies(self) -> int:
        return 4 * self.n_models + 6  # every task's SVD is held until the factors are stacked

    def matrix_delta(self, taus: list[Any], report: dict[str, Any]) -> Any:
        report["directions_per_task"] = int(min(taus[0].shape) / len(taus))
        return tsv_delta(taus)
