"""The safetensors header codec, the one place it is parsed and written: validation of an untrusted header
(JSON, duplicate keys, dtypes, shapes, contiguous offsets) and the exact bytes the safetensors library writes.
Used by the format plugin (clean/smudge), the merge's file sources and sinks, and the statistic blobs."""

from __future__ import annotations

import json
from typing import Any

from gittheta_merge import dtypes
from gittheta_merge.errors import InputError, loads_untrusted

MAX_HEADER = 100_000_000  # safetensors' own limit
METADATA_KEY = "__metadata__"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def render_header(file_meta: dict[str, str] | None, tensors: list[tuple[str, str, list[int]]],
                  order: list[str] | None = None) -> bytes:
    """The header bytes the safetensors library writes for tensors laid out in the given data order."""
    offsets: dict[str, tuple[str, list[int], list[int]]] = {}
    start = 0
    for name, dtype, shape in tensors:
        end = start + dtypes.nbytes(dtype, shape)
        offsets[name] = (dtype, shape, [start, end])
        start = end
    keys = order or ([METADATA_KEY] if file_meta is not None else []) + [t[0] for t in tensors]
    doc: dict[str, Any] = {}
    for key in keys:
        if key == METADATA_KEY:
            doc[key] = file_meta
        else:
            dtype, shape, span = offsets[key]
            doc[key] = {"dtype": dtype, "shape": shape, "data_offsets": span}
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    return text + b" " * ((8 - len(text) % 8) % 8)


HeaderTensor = tuple[str, str, list[int], int, int]  # name, dtype, shape, start, end


def parse_header(raw: bytes, where: str) -> tuple[dict[str, Any] | None, list[HeaderTensor], list[str]]:
    """Validate a header; returns (__metadata__, tensors in data order with offsets, key order)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{where}: safetensors header is not valid JSON ({exc})") from None
    doc = loads_untrusted(text, where, "safetensors header", object_pairs_hook=_no_duplicates)
    if not isinstance(doc, dict):
        raise InputError(f"{where}: safetensors header is not a JSON object")
    file_meta = doc.get(METADATA_KEY)
    if file_meta is not None and not isinstance(file_meta, dict):
        raise InputError(f"{where}: __metadata__ must be an object")
    tensors = []
    for name, info in doc.items():
        if name == METADATA_KEY:
            continue
        here = f"{where}: tensor {name!r}"
        if not isinstance(info, dict):
            raise InputError(f"{here}: header entry is not an object")
        dtype, shape, span = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise InputError(f"{here}: missing dtype")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InputError(f"{here}: invalid shape {shape!r}")
        if not (isinstance(span, list) and len(span) == 2 and all(isinstance(x, int) for x in span)
                and 0 <= span[0] <= span[1]):
            raise InputError(f"{here}: invalid data_offsets {span!r}")
        expected = dtypes.nbytes(dtype, shape, where=f"{here}: ")
        if span[1] - span[0] != expected:
            raise InputError(
                f"{here}: header says {span[1] - span[0]} bytes but {dtype}{shape} needs {expected}; "
                "the file is corrupt or was written by a broken tool"
            )
        tensors.append((name, dtype, list(shape), span[0], span[1]))
    tensors.sort(key=lambda t: (t[3], t[4]))
    cursor = 0
    for name, _, _, start, end in tensors:
        if start != cursor:
            raise InputError(
                f"{where}: tensor {name!r} starts at byte {start}, expected {cursor} "
                "(overlapping or gapped tensor data: not a valid safetensors file)"
            )
        cursor = end
    return file_meta, tensors, list(doc.keys())
