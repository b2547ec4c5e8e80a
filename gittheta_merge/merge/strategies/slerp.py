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

from gittheta_merge.errors import UsageError
from gittheta_merge.merge.strategies.base import Chunk, Param, Strategy

CHUNK_ELEMENTS = 1 << 20


def slerp(t: float, a: Any, b: Any, dot_threshold: float = 0.9995, eps: float = 1e-8,
          report: dict[str, Any] | None = None, in_place: bool = False) -> Any:
    """The interpolated tensor (a's shape, float32 or float64), straight from the definition above; the cosine
    goes into `report` if one is given. in_place: a and b may be overwritten (the engine's chunk tensors), which
    saves three whole-tensor temporaries (the 400M benchmark's peak: 1.42 GB before)."""
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
    if report is not None:
        report["cosine"] = float(cos)
    if float(cos.abs()) > dot_threshold:
        ca, cb = 1 - t, t
    else:
        theta = torch.acos(cos)
        sin = torch.sin(theta)
        ca, cb = torch.sin((1 - t) * theta) / sin, torch.sin(t * theta) / sin
    if in_place and x.data_ptr() == a.data_ptr() and y.data_ptr() == b.data_ptr():
        return x.mul_(ca).add_(y.mul_(cb)).reshape(a.shape)  # no whole-tensor temporaries: a and b are ours
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
            raise UsageError(f"strategy slerp: interpolates exactly 2 models, got {self.n_models} (merge one branch "
                             "into HEAD, or use average for more)")
        if not 0.0 <= self.params["t"] <= 1.0:
            raise UsageError(f"strategy slerp: t must be in [0, 1], got {self.params['t']}")

    def merge(self, chunk: Chunk) -> Any:
        a, b = chunk.models
        return slerp(self.params["t"], a, b, self.params["dot_threshold"], report=chunk.report, in_place=True)


def nuslerp(t: float, a: Any, b: Any, vectors: str, eps: float = 1e-8) -> Any:
    """mergekit's nuslerp of a and b: over the flattened tensor (vectors="flatten"), per vector along the last
    dimension ("rows") or along the first ("columns"; mergekit's nuslerp_row_wise); collinear vectors
    (1 - cos^2 <= eps^2) are interpolated linearly."""
    import torch

    shape = a.shape
    if vectors == "flatten":
        a, b = a.reshape(-1), b.reshape(-1)
    elif vectors == "columns":
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    ua = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(collinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where(collinear, (1 - t) * a + t * b, spherical)
    if vectors == "columns":
        out = out.transpose(0, -1)
    return out.reshape(shape)


class NuSlerp(Strategy):
    """NuSLERP (mergekit's nuslerp): SLERP of two models, or of their task vectors when a base is given, with
    t = w_1 / (w_0 + w_1) from two weights; over the flattened tensor, or per row / per column vector."""

    name = "nuslerp"
    uses_base = True
    row_separable = False
    params_spec = {
        "weights": Param(None, "floats", "two weights; t = w1 / (w0 + w1) (default equal: t = 0.5)"),
        "vectors": Param("flatten", "choice", "what is interpolated: the flattened tensor, each row (last "
                         "dimension), or each column (mergekit's nuslerp_row_wise)", ("flatten", "rows", "columns")),
        "use_base": Param(True, "bool", "with a base, interpolate the task vectors and add them to the base"),
    }

    def validate(self) -> None:
        super().validate()
        if self.n_models != 2:
            raise UsageError(f"strategy nuslerp: interpolates exactly 2 models, got {self.n_models}")

    def merge(self, chunk: Chunk) -> Any:
        w0, w1 = self.model_weights()
        t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
        a, b = chunk.models
        vectors = self.params["vectors"]
        if chunk.base is not None and self.params["use_base"]:
            return chunk.base + nuslerp(t, a - chunk.base, b - chunk.base, vectors)
        return nuslerp(t, a, b, vectors)
