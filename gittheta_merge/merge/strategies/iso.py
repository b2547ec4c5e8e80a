"""Iso-C (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces"): flatten the spectrum of the summed task matrix.

For each 2-D tensor: Delta = sum_i tau_i (tau_i = theta_i - theta_0), U S V^T = svd(Delta) (thin),
Delta_iso = mean(S) U V^T; every other tensor (1-D: biases, norms) takes the mean task vector. theta* = theta_0 +
alpha Delta (alpha is the paper's scaling factor, chosen on validation data; 1 by default, as FusionBench's
iso_c). Whole matrices (an SVD): peak memory is the models' largest matrix in float32 times M + 4.
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
        else:
            delta = sum(taus[1:], taus[0]) / len(taus)
        return base + self.params["alpha"] * delta
