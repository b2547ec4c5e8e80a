"""The Karcher (Riemannian) mean of the models on the unit hypersphere, scaled by their mean norm: mergekit 0.1.5's
karcher, per tensor.

Each model's tensor x_i (flattened) has norm n_i and direction u_i = x_i / n_i (zero for a zero tensor). Over the
directions whose norm exceeds tol, with equal weights a_i: start at the normalised weighted mean of the u_i (or the
first u_i if that mean is below tol); then up to max_iter times: the tangent sum_i a_i theta_i / sin(theta_i)
(u_i - cos_i m) over the u_i not within tol of m (cos_i = <m, u_i>, theta_i = acos cos_i); stop when its norm is
below tol, else step m <- cos(|g|) m + sin(|g|) g / |g| and renormalise. The result is (sum_i n_i / N) m.
Whole tensors; float32 (float64 inputs: float64). No base is used.
"""

from __future__ import annotations

from typing import Any

from gittheta_merge.merge.strategies.base import Chunk, Param, Strategy


def karcher_mean(tensors: list[Any], max_iter: int = 10, tol: float = 1e-5) -> Any:
    import torch

    n = len(tensors)
    if n == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(x.to(dtype)) for x in tensors]
    units = [torch.zeros_like(x) if float(nrm) == 0.0 else (x / nrm).to(x.dtype) for x, nrm in zip(tensors, norms)]
    live = [i for i, nrm in enumerate(norms) if float(nrm) > tol]
    if not live:
        return sum(x * 0 for x in tensors)
    alphas = [1.0 / n] * n
    weights = [alphas[i] / sum(alphas[j] for j in live) for i in live]
    dirs = [units[i] for i in live]
    mean = torch.zeros_like(dirs[0])
    for w, u in zip(weights, dirs):
        mean += w * u
    size = torch.linalg.vector_norm(mean.to(dtype))
    mean = dirs[0].clone() if float(size) < tol else (mean / size).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, dirs):
            cos = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos)
            if float(theta) < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (u - cos * mean)
        step = torch.linalg.vector_norm(tangent.to(dtype))
        if float(step) < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(mean.dtype)
        size = torch.linalg.vector_norm(mean.to(dtype))
        if float(size) > tol:
            mean = (mean / size).to(mean.dtype)
    return sum(a * nrm for a, nrm in zip(alphas, norms)) * mean


class Karcher(Strategy):
    """Karcher mean (mergekit's karcher): the models' geodesic mean direction on the hypersphere, per tensor, scaled
    by their mean norm; N models, no base."""

    name = "karcher"
    row_separable = False
    params_spec = {
        "max_iter": Param(10, "int", "iterations of the Riemannian gradient step"),
        "tol": Param(1e-5, "float", "stop when the tangent's norm is below this; also the zero-norm threshold"),
    }

    def merge(self, chunk: Chunk) -> Any:
        return karcher_mean(list(chunk.models), self.params["max_iter"], self.params["tol"])
