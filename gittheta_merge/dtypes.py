"""The dtype vocabulary shared by every format: safetensors' names are the canonical spelling.

Every checkpoint format maps its own dtypes to these names, so the metadata file, the object store
and the merge engine speak one language (and a bf16 tensor is never a special case).
"""

from __future__ import annotations

from typing import Any

from gittheta_merge.errors import InputError

# canonical name -> size in bytes of one element
ITEMSIZE: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
    "C128": 16,
}

# canonical name -> torch dtype attribute name (resolved lazily: torch is imported only when needed)
_TORCH_NAMES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
    "C64": "complex64",
    "C128": "complex128",
}


def itemsize(dtype: str, *, where: str = "") -> int:
    """Bytes per element of a canonical dtype; a clear error for an unknown one."""
    try:
        return ITEMSIZE[dtype]
    except KeyError:
        raise InputError(
            f"{where}unknown dtype {dtype!r}; supported: {', '.join(sorted(ITEMSIZE))}"
        ) from None


def nbytes(dtype: str, shape: list[int], *, where: str = "") -> int:
    """Exact byte size of a dense tensor of this dtype and shape."""
    n = itemsize(dtype, where=where)
    for dim in shape:
        n *= dim
    return n


def to_torch(dtype: str) -> Any:
    """The torch dtype for a canonical name."""
    import torch

    name = _TORCH_NAMES.get(dtype)
    if name is None or not hasattr(torch, name):
        raise InputError(f"dtype {dtype} is not supported by this torch {torch.__version__}")
    return getattr(torch, name)


def from_torch(torch_dtype: Any) -> str:
    """The canonical name for a torch dtype."""
    import torch

    for canonical, name in _TORCH_NAMES.items():
        if getattr(torch, name, None) == torch_dtype:
            return canonical
    raise InputError(f"torch dtype {torch_dtype} has no safetensors equivalent; convert the tensor")
