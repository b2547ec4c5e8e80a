"""Iso-C (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces"): flatten the spectrum of the summed task matrix.

For each 2-D tensor: Delta = sum_i tau_i (tau_i = theta_i - theta_0), U S V^T = svd(Delta) (thin),
Delta_iso = mean(S) U V^T; every other tensor (1-D: biases, norms) takes the mean task vector. theta* = theta_0 +
alpha Delta (alpha is the paper's scaling factor, chosen on validation data; 1 by default, as FusionBench's
iso_c). Whole matrices (an SVD): peak memory is the models' largest matrix in float32 times M + 4.

Iso-CTS (the same paper) keeps a common subspace and adds task-specific ones: with r = min(rows, cols), T tasks and
the common fraction f, k = r - T round((r - int(f r)) / T) common directions and d = (r - k) / T per task;
U S V^T = svd(sum_i tau_i); the top k triplets are the common subspace; each task's tau_i with the common subspace
projected out (tau_i - U_k U_k^T tau_i) gives its top d triplets; all of them side by side (tasks first, then the
common ones), U and V^T replaced by their closest orthogonal matrices, and every singular value by their mean.
"""

from __future__ import annotations

from typing import Any

from gittheta_merge.merge.strategies.base import Param
from gittheta_merge.merge.strategies.spectral import SpectralStrategy


class IsoC(SpectralStrategy):
    """Iso-C: per weight matrix, the sum of the task vectors with its singular values all set to their mean
    (an isotropic spectrum); other tensors get the mean task vector; theta_0 + alpha times that."""

    name = "iso_c"

    def matrix_delta(self, taus: list[Any], report: dict[str, Any]) -> Any:
        import torch

        u, s, vh = torch.linalg.svd(sum(taus[1:], taus[0]), full_matrices=False)
        report["singular_value"] = float(s.mean())
        return (u * s.mean()) @ vh


class IsoCts(SpectralStrategy):
    """Iso-CTS: Iso-C on a subspace made of the summed task matrix's top directions (common) plus each task's top
    directions outside it (task-specific), orthogonalised, with an isotropic spectrum; 1-D tensors get the mean."""

    name = "iso_cts"
    params_spec = {
        **SpectralStrategy.params_spec,
        "common_fraction": Param(0.8, "float", "share of the directions kept from the common subspace"),
    }

    def matrix_delta(self, taus: list[Any], report: dict[str, Any]) -> Any:
        import torch

        t = len(taus)
        r = min(taus[0].shape)
        k = r - round((r - int(r * self.params["common_fraction"])) / t) * t
        d = (r - k) // t
        u, s, vh = torch.linalg.svd(sum(taus[1:], taus[0]), full_matrices=False)
        uk = u[:, :k]
        u_all, s_all, vh_all = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
        for i, tau in enumerate(taus):
            ui, si, vhi = torch.linalg.svd(tau - uk @ (uk.T @ tau), full_matrices=False)
            u_all[:, i * d:(i + 1) * d], s_all[i * d:(i + 1) * d], vh_all[i * d:(i + 1) * d] = \
                ui[:, :d], si[:d], vhi[:d]
        u_all[:, t * d:t * d + k], s_all[t * d:t * d + k], vh_all[t * d:t * d + k] = uk, s[:k], vh[:k]
        report.update(common_directions=k, directions_per_task=d, singular_value=float(s_all.mean()))
        return (closest_orthogonal(u_all) * s_all.mean()) @ closest_orthogonal(vh_all)


def closest_orthogonal(m: Any) -> Any:
    """P Q^T for m = P Sigma Q^T: the (semi-)orthogonal matrix nearest to m (its polar factor)."""
    import torch

    p, _, q = torch.linalg.svd(m, full_matrices=False)
    return p @ q
