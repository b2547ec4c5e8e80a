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

from gittheta_merge.merge.strategies.base import Chunk, Param, Strategy


class IsoC(Strategy):
    """Iso-C: per weight matrix, the sum of the task vectors with its singular values all set to their mean
    (an isotropic spectrum); other tensors get the mean task vector; theta_0 + alpha times that."""

    name = "iso_c"
    needs_base = True
    row_separable = False
    params_spec = {
        "alpha": Param(1.0, "float", "scale of the merged task vector (the paper tunes it on validation data)"),
    }

    def merge(self, chunk: Chunk) -> Any:
        import torch

        base = chunk.base
        taus = [m - base for m in chunk.models]
        if base.dim() == 2:
            u, s, vh = torch.linalg.svd(sum(taus[1:], taus[0]), full_matrices=False)
            delta = (u * s.mean()) @ vh
            chunk.report["singular_value"] = float(s.mean())
        else:
            delta = sum(taus[1:], taus[0]) / len(taus)
        return base + self.params["alpha"] * delta


class IsoCts(Strategy):
    """Iso-CTS: Iso-C on a subspace made of the summed task matrix's top directions (common) plus each task's top
    directions outside it (task-specific), orthogonalised, with an isotropic spectrum; 1-D tensors get the mean."""

    name = "iso_cts"
    needs_base = True
    row_separable = False
    params_spec = {
        "alpha": Param(1.0, "float", "scale of the merged task vector (the paper tunes it on validation data)"),
        "common_fraction": Param(0.8, "float", "share of the directions kept from the common subspace"),
    }

    def merge(self, chunk: Chunk) -> Any:
        import torch

        base = chunk.base
        taus = [m - base for m in chunk.models]
        if base.dim() != 2:
            return base + self.params["alpha"] * (sum(taus[1:], taus[0]) / len(taus))
        t = len(taus)
        r = min(base.shape)
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
        pu, _, qu = torch.linalg.svd(u_all, full_matrices=False)
        pv, _, qv = torch.linalg.svd(vh_all, full_matrices=False)
        delta = ((pu @ qu) * s_all.mean()) @ (pv @ qv)
        chunk.report.update(common_directions=k, directions_per_task=d, singular_value=float(s_all.mean()))
        return base + self.params["alpha"] * delta
