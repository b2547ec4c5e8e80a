"""The compiled one-pass kernel for linear combinations (average, task arithmetic) on raw F32/BF16 bytes.

Why: on the numpy path a bf16 average costs ~12 passes over memory per element (docs/merge.md); the C kernel
(_lincomb.c) reads each input once and writes the output once, 4-6x faster, which is what brings a merge near
the time it takes to read the inputs and write the output. It is loaded with ctypes, which releases the GIL
during the call, so the prefetch thread's kernel runs while the main thread writes.

Two entry points: `run` combines buffers the caller read (the object store's path, whose reads Python
hash-verifies); `run_files` hands the kernel open files and offsets and it reads, combines and writes by
itself (plain safetensors files): no interpreter work per chunk (a 400M average: 0.78 CPU-seconds instead
of 1.26, docs/merge.md).

The kernel is optional (setup.py builds it when a C compiler is there); `available()` says whether it loaded.
Its results equal the numpy path's bit for bit (tests/unit/test_merge_fused.py), so which one ran never changes a
merged tensor, only the time. (Except NaN payload bits in F32 outputs, see _lincomb.c: a NaN stays a NaN.)
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gittheta_merge import dtypes
from gittheta_merge.errors import StorageError

ABI = 2  # must match GT_LINCOMB_ABI in _lincomb.c: a stale build from an older source is not used
DTYPE_CODES = {"F32": 0, "BF16": 1}


@dataclass(frozen=True)
class LinComb:
    """What the kernel computes, in float32, each operation rounded:
    acc = sum_i scales[i] * x_i (left to right; a scale of 1 is not applied), then with a base b:
    acc = (acc - base_scale * b) * lam + b (lam of 1 not applied). Average: scales only. Task arithmetic:
    scales = per-model weights, base_scale = their sum, lam = lambda."""

    scales: tuple[float, ...]
    base_scale: float | None = None
    lam: float = 1.0


_lib: Any = None
_load_error: str | None = None


def library_path() -> Path | None:
    """Where the built kernel is (next to this file, under the interpreter's extension-module suffix)."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = Path(__file__).with_name("_lincomb" + suffix)
        if path.exists():
            return path
    return None


def _load() -> Any:
    global _lib, _load_error
    if _lib is not None or _load_error is not None:
        return _lib
    path = library_path()
    if sys.byteorder != "little":
        _load_error = "big-endian machine (safetensors bytes are little-endian)"
    elif path is None:
        _load_error = "not built: reinstall with a C compiler (pip install -e .) or run python setup.py build_ext -i"
    else:
        try:
            lib = ctypes.CDLL(str(path))
            if lib.gt_lincomb_abi() != ABI:
                raise OSError(f"{path.name} is a stale build (ABI {lib.gt_lincomb_abi()}, want {ABI}); rebuild it")
            fn = lib.gt_lincomb
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int),
                           ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int, ctypes.c_float,
                           ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
            fd_fn = lib.gt_lincomb_fd
            fd_fn.restype = ctypes.c_int
            int_p = ctypes.POINTER(ctypes.c_int)
            fd_fn.argtypes = [ctypes.c_int64, ctypes.c_int, int_p, ctypes.POINTER(ctypes.c_int64), int_p,
                              ctypes.POINTER(ctypes.c_float), ctypes.c_int, ctypes.c_int64, ctypes.c_int,
                              ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_int64, ctypes.c_int,
                              ctypes.c_int64, int_p, int_p]
            _lib = lib
        except OSError as exc:
            _load_error = str(exc)
    return _lib


def available() -> bool:
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _load_error


def supports(*dtypes: str) -> bool:
    return all(d in DTYPE_CODES for d in dtypes)


def _checked(spec: LinComb, n_inputs: int, has_base: bool, used: list[str]) -> Any:
    """The loaded library, after checking the inputs and base match the combination and every dtype `used`
    (inputs, base, output) is one the kernel has."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the compiled merge kernel is unavailable: {_load_error}")
    if n_inputs != len(spec.scales) or not n_inputs:
        raise ValueError(f"{n_inputs} inputs for {len(spec.scales)} scales")
    if has_base != (spec.base_scale is not None):
        raise ValueError("a base is given exactly when the combination has a base scale")
    for dtype in used:
        if dtype not in DTYPE_CODES:
            raise ValueError(f"the compiled kernel has no {dtype}")
    return lib


def run(spec: LinComb, inputs: list[tuple[Any, str]], base: tuple[Any, str] | None, out: Any, out_dtype: str,
        n: int) -> Any:
    """Compute `spec` over `n` elements. inputs / base: (contiguous numpy array of raw bytes, dtype); out: a
    contiguous numpy array for `n` elements of out_dtype. Sizes are checked here, not trusted: the C side
    indexes raw pointers."""
    arrays = [*inputs, *([base] if base is not None else []), (out, out_dtype)]
    lib = _checked(spec, len(inputs), base is not None, [dtype for _, dtype in arrays])
    for arr, dtype in arrays:
        if not arr.flags.c_contiguous or arr.nbytes < n * dtypes.itemsize(dtype):
            raise ValueError(f"buffer of {arr.nbytes} bytes for {n} {dtype} elements")
    if not out.flags.writeable:
        raise ValueError("output buffer is read-only")
    k = len(inputs)
    pointers = (ctypes.c_void_p * k)(*(arr.ctypes.data for arr, _ in inputs))
    codes = (ctypes.c_int * k)(*(DTYPE_CODES[d] for _, d in inputs))
    scales = (ctypes.c_float * k)(*spec.scales)
    rc = lib.gt_lincomb(n, k, pointers, codes, scales,
                        base[0].ctypes.data if base is not None else None,
                        DTYPE_CODES[base[1]] if base is not None else 0,
                        spec.base_scale if spec.base_scale is not None else 0.0, spec.lam,
                        out.ctypes.data, DTYPE_CODES[out_dtype])
    if rc != 0:
        raise RuntimeError(f"compiled merge kernel failed (code {rc})")
    return out


@dataclass(frozen=True)
class FileSpan:
    """n elements of `dtype` lying contiguously at byte `offset` of the open file `fd` (an input to read or the
    place of an output to write); `what` names it in errors ("model.safetensors: tensor 'w'")."""

    fd: int
    offset: int
    dtype: str
    what: str


def run_files(spec: LinComb, inputs: list[FileSpan], base: FileSpan | None, out: FileSpan, n: int,
              step: int) -> None:
    """Compute `spec` over `n` elements read from files, writing the result into a file: the kernel's own C loop
    reads `step` elements of every input into its buffers, combines them and writes them, with no Python in
    between (the GIL is released for the whole call, so threads run ranges in parallel). Errors name the file
    and tensor; a failed call may have written part of the output range (the caller's file is a temporary
    one that is deleted on failure)."""
    spans = [*inputs, *([base] if base else []), out]
    lib = _checked(spec, len(inputs), base is not None, [span.dtype for span in spans])
    for span in spans:
        if span.fd < 0 or span.offset < 0:
            raise ValueError(f"{span.what}: bad file span ({span.fd}, {span.offset})")
    if n < 0 or step < 1:
        raise ValueError(f"n={n}, step={step}")
    k = len(inputs)
    failed, err = ctypes.c_int(-1), ctypes.c_int(0)
    rc = lib.gt_lincomb_fd(n, k, (ctypes.c_int * k)(*(s.fd for s in inputs)),
                           (ctypes.c_int64 * k)(*(s.offset for s in inputs)),
                           (ctypes.c_int * k)(*(DTYPE_CODES[s.dtype] for s in inputs)),
                           (ctypes.c_float * k)(*spec.scales),
                           base.fd if base else -1, base.offset if base else 0,
                           DTYPE_CODES[base.dtype] if base else 0,
                           spec.base_scale if spec.base_scale is not None else 0.0, spec.lam,
                           out.fd, out.offset, DTYPE_CODES[out.dtype], step, ctypes.byref(failed), ctypes.byref(err))
    if rc == 0:
        return
    if rc == -2:
        span = inputs[failed.value] if failed.value < k else base
        assert span is not None
        why = "file ended early" if err.value == 0 else os.strerror(err.value)
        raise StorageError(f"{span.what}: read failed ({why})")
    if rc == -3:
        raise StorageError(f"{out.what}: write failed ({os.strerror(err.value)})")
    raise RuntimeError(f"compiled merge kernel failed (code {rc})")
