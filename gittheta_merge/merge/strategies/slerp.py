"""SLERP: spherical interpolation between two models, per tensor, as mergekit defines it (0.1.5, merge_method slerp).

For a tensor flattened to vectors a (model 0: ours / HEAD, mergekit's base_model) and b (model 1):
  cos = <a/|a|, b/|b|> clamped to [-1, 1] (a norm below eps counts as 1);
  if |cos| > dot_threshold (nearly collinear or antipodal): (1 - t) a + t b;
  else, with theta = acos(cos): sin((1 - t) theta)/sin(theta) a + sin(t theta)/sin(theta) b.
So t = 0 gives model 0 and t = 1 model 1. The norms are taken chunk by chunk of 2^20 elements (a norm of the chunk
norms) and the dot product of the normalised chunks is summed chunk by chunk, in float32 (float64 inputs: float64),
the reduction order mergekit uses, so the results agree to float32 rounding.

Whole tensors (the coefficients depend on the whole tensor's norms): peak memory is both models' largest tensor in
float32. 1-D tensors are interpolated the same way (as mergekit does). No base (common ancestor) is used.
"""

from __future__ import annotations

from typing import Any

from gittheta_merge.errors import ThetaError
from gittheta_merge.merge.strategies.base import Chunk, Param, Strategy

CHUNK_ELEMENTS = 1 << 20


def slerp(t: float, a: Any, b: Any, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Any:
    """The interpolated tensor (a's shape, float32 or float64), straight from the definition above."""
    import torch

    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    x, y = a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)
    if x.numel() == 0:
        return ((1 - t) * x + t * y).reshape(a.shape)
    spans = [(i, min(i + CHUNK_ELEMENTS, x.numel())) for i in range(0, x.numel(), CHUNK_ELEMENTS)]

    def norm(v: Any) -> Any:
        value = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v[i:j]) for i, j in spans]))
        return torch.where(value > eps, value, torch.ones_like(value))

    na, nb = norm(x), norm(y)
    cos = torch.stack([((x[i:j] / na) * (y[i:j] / nb)).sum() for i, j in spans]).sum().clamp(-1, 1)
    if float(cos.abs()) > dot_threshold:
        ca, cb = 1 - t, t
    else:
        theta = torch.acos(cos)
        sin = torch.sin(theta)
        ca, cb = torch.sin((1 - t) * theta) / sin, torch.sin(t * theta) / sin
    return (ca * x + cb * y).reshape(a.shape)


class Slerp(Strategy):
    """SLERP (mergekit's slerp): spherical interpolation from model 0 (ours; t=0) to model 1 (theirs; t=1) over
    each whole tensor; linear where the two are nearly collinear. Two models only."""

    name = "slerp"
    row_separable = False
    params_spec = {
        "t": Param(0.5, "float", "interpolation factor: 0 = model 0 (ours / HEAD), 1 = model 1 (theirs)"),
        "dot_threshold": Param(0.9995, "float", "above this |cosine| the models count as collinear: plain lerp"),
    }

    def validate(self) -> None:
        super().validate()
        if self.n_models != 2:
            raise ThetaError(f"strategy slerp: interpolates exactly 2 models, got {self.n_models} (merge one branch "
                             "into HEAD, or use average for more)")

    def merge(self, chunk: Chunk) -> Any:
        return slerp(self.params["t"], chunk.models[0], chunk.models[1], self.params["dot_threshold"])
