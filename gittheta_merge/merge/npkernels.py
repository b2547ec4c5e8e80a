"""Torch-free float conversions for the numpy merge path (average and task arithmetic on F32/F16/BF16).

Why a second path: `import torch` alone takes 2.4-4 s on the development machine (more than reading three
0.8 GB models and writing one), and a plain average needs nothing from torch but fp32 arithmetic. numpy
imports in ~0.1-0.4 s. The conversions match torch's bit for bit (tests/unit/test_merge_numpy_path.py):
  bf16 -> fp32: the bf16 bits are the high half of the fp32 bits (exact);
  fp32 -> bf16: round to nearest even on the bit pattern, bits + 0x7FFF + ((bits >> 16) & 1), high half;
                NaN -> 0x7FC0 (torch's scalar rule; its AVX2 loop writes 0xFFFF, so torch itself varies);
  fp16 <-> fp32: IEEE round to nearest even (numpy and torch/F16C agree).
Only little-endian machines take this path (safetensors bytes are little-endian).
"""

from __future__ import annotations

import sys
from typing import Any

DTYPES = ("F32", "F16", "BF16")
AVAILABLE = sys.byteorder == "little"


def to_f32(raw: Any, dtype: str, out: Any) -> Any:
    """Raw little-endian bytes (uint8 array) of `dtype` -> float32 into `out` (same element count)."""
    import numpy as np

    if dtype == "BF16":  # widen, then shift in place: 0.16 ms per 1M elements vs 0.21 for a casting shift
        bits = out.view(np.uint32)
        np.copyto(bits, raw.view(np.uint16))
        np.left_shift(bits, 16, out=bits)
    elif dtype == "F16":
        np.copyto(out, raw.view(np.float16))
    elif dtype == "F32":
        np.copyto(out, raw.view(np.float32))
    else:
        raise ValueError(f"numpy path: unsupported dtype {dtype}")
    return out


def from_f32(x: Any, dtype: str, pool: Any) -> Any:
    """float32 array -> `dtype` (a view of a pooled buffer, valid until the next call)."""
    import numpy as np

    if dtype == "F32":
        return x
    flat = x.reshape(-1)
    if dtype == "F16":
        out = pool.get_np("cast.f16", flat.shape, np.float16)
        with np.errstate(over="ignore"):  # overflow to inf, as torch does
            np.copyto(out, flat, casting="unsafe")
        return out
    if dtype != "BF16":
        raise ValueError(f"numpy path: unsupported dtype {dtype}")
    bits = flat.view(np.uint32)
    t = pool.get_np("cast.u32", flat.shape, np.uint32)
    np.right_shift(bits, 16, out=t)
    np.bitwise_and(t, 1, out=t)
    np.add(t, 0x7FFF, out=t)
    np.add(t, bits, out=t)  # wraps only for negative NaN patterns, which the NaN fix below rewrites
    np.right_shift(t, 16, out=t)
    out = pool.get_np("cast.bf16", flat.shape, np.uint16)
    np.copyto(out, t, casting="unsafe")  # narrowing: faster than copying the high halves by stride
    if flat.size and np.isnan(np.max(flat)):
        out[np.isnan(flat)] = 0x7FC0
    return out
