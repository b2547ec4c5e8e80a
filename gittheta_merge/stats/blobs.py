"""Statistic blobs: one safetensors file holding the sum tensors and the provenance (JSON in the string metadata).

safetensors because the weights already use it (zero-copy, mmap-able, no pickle so a fetched blob cannot run code)
and because its header can be read without the tensors, which `stats ls` needs to describe many blobs cheaply.
The provenance is one JSON string under `METADATA_KEY` since safetensors metadata values must be strings.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, BinaryIO

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load

from gittheta_merge import dtypes
from gittheta_merge.errors import InputError, StatsError, ThetaError, loads_untrusted
from gittheta_merge.formats.safetensors_header import MAX_HEADER, parse_header, render_header

from .statistic import Statistic

__all__ = ["FORMAT", "METADATA_KEY", "blob_header", "load_statistic", "provenance_in", "read_provenance",
           "save_statistic", "statistic_from_bytes", "statistic_to_bytes", "write_blob"]

METADATA_KEY = "gittheta.stats"
FORMAT = "gittheta-stats/1"


def _metadata(kind: str, provenance: dict[str, Any]) -> dict[str, str]:
    return {"format": FORMAT, "kind": kind,
            METADATA_KEY: json.dumps(provenance, sort_keys=True, separators=(",", ":"))}


def _tensors(stat: Statistic) -> dict[str, torch.Tensor]:
    # safetensors refuses non-contiguous tensors and tensors sharing storage; statistics never share storage
    # (shared inputs have one key), but make each tensor a plain contiguous CPU tensor anyway.
    return {k: v.detach().to("cpu").contiguous() for k, v in stat.tensors.items()}


def _from_parts(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None, where: str) -> Statistic:
    if not meta or meta.get("format") != FORMAT or METADATA_KEY not in meta:
        raise StatsError(f"{where}: not a gittheta statistic blob (missing {FORMAT!r} metadata)")
    provenance = loads_untrusted(meta[METADATA_KEY], where, "statistic provenance")
    if not isinstance(provenance, dict):
        raise InputError(f"{where}: the statistic's provenance is not a JSON object")
    return Statistic(kind=meta["kind"], tensors=tensors, provenance=provenance)


def _write(stat: Statistic, out: BinaryIO) -> None:
    """Write `stat` as safetensors, tensor by tensor. The header comes from the checkpoint format's own writer
    (`render_header`), so a statistic always gives the same bytes, hence the same oid (the safetensors library
    orders the string metadata differently from one run to the next); tensors are laid out as the library lays
    them out (wider dtypes first, then by name), which keeps every tensor's data aligned."""
    write_blob(stat.kind, _tensors(stat), stat.provenance, out)


def write_blob(kind: str, tensors: dict[str, torch.Tensor], provenance: dict[str, Any], out: BinaryIO) -> None:
    """A statistic blob of any kind, including a plugin's own (gittheta_align's `alignment`): the same bytes for
    the same content. `tensors` must be contiguous CPU tensors."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header = render_header(_metadata(kind, provenance), [(k, dtypes.from_torch(tensors[k].dtype),
                                                          list(tensors[k].shape)) for k in order])
    out.write(len(header).to_bytes(8, "little"))
    out.write(header)
    for k in order:
        out.write(tensors[k].reshape(-1).view(torch.uint8).numpy().data)


def save_statistic(stat: Statistic, path: str | os.PathLike[str]) -> None:
    """Write `stat` as a safetensors file at `path`."""
    with open(path, "wb") as out:
        _write(stat, out)


def statistic_to_bytes(stat: Statistic) -> bytes:
    """The same bytes `save_statistic` writes, for putting the blob straight into an object store."""
    out = io.BytesIO()
    _write(stat, out)
    return out.getvalue()


def blob_header(source: BinaryIO, size: int, where: str) -> tuple[list[str], dict[str, str]]:
    """(tensor names, string metadata) of a safetensors blob of `size` bytes, read from the start of `source`
    (its header only, never the tensors) and validated like a checkpoint's (ThetaError naming `where`)."""
    if size < 8:
        raise InputError(f"{where}: not a safetensors file")
    n = int.from_bytes(source.read(8), "little")
    if n > MAX_HEADER or 8 + n > size:
        raise InputError(f"{where}: not a safetensors file (header length {n})")
    file_meta, tensors, _ = parse_header(source.read(n), where)
    if tensors and tensors[-1][4] != size - 8 - n:
        raise InputError(f"{where}: safetensors data size does not match its header")
    return [t[0] for t in tensors], file_meta or {}


def provenance_in(file_meta: dict[str, str]) -> dict[str, Any]:
    """The provenance a blob's string metadata records: ours (JSON under METADATA_KEY) or a hand-made file's
    JSON under "provenance"; {} when there is none or it is not a JSON object."""
    raw = file_meta.get(METADATA_KEY) or file_meta.get("provenance")
    try:
        value = loads_untrusted(raw, "statistic blob", "provenance") if raw else {}
    except ThetaError:
        return {}
    return value if isinstance(value, dict) else {}


def statistic_from_bytes(data: bytes) -> Statistic:
    return _from_parts(st_load(data), blob_header(io.BytesIO(data), len(data), "<bytes>")[1], "<bytes>")


def load_statistic(path: str | os.PathLike[str], device: str = "cpu") -> Statistic:
    with safe_open(os.fspath(path), framework="pt", device=device) as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _from_parts(tensors, meta, os.fspath(path))


def read_provenance(path: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """(kind, provenance) from the header only: no tensor data is read (cheap for listing many blobs)."""
    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata()
    stat = _from_parts({}, meta, os.fspath(path))
    return stat.kind, stat.provenance
