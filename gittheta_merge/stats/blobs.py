"""Statistic blobs: one safetensors file holding the sum tensors and the provenance (JSON in the string metadata).

safetensors because the weights already use it (zero-copy, mmap-able, no pickle so a fetched blob cannot run code)
and because its header can be read without the tensors, which `stats ls` needs to describe many blobs cheaply.
The provenance is one JSON string under `METADATA_KEY` since safetensors metadata values must be strings.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file

from .statistic import Statistic

__all__ = ["FORMAT", "METADATA_KEY", "load_statistic", "read_provenance", "save_statistic", "statistic_from_bytes",
           "statistic_to_bytes"]

METADATA_KEY = "gittheta.stats"
FORMAT = "gittheta-stats/1"


def _metadata(stat: Statistic) -> dict[str, str]:
    return {"format": FORMAT, "kind": stat.kind,
            METADATA_KEY: json.dumps(stat.provenance, sort_keys=True, separators=(",", ":"))}


def _tensors(stat: Statistic) -> dict[str, torch.Tensor]:
    # safetensors refuses non-contiguous tensors and tensors sharing storage; statistics never share storage
    # (shared inputs have one key), but make each tensor a plain contiguous CPU tensor anyway.
    return {k: v.detach().to("cpu").contiguous() for k, v in stat.tensors.items()}


def _from_parts(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None, where: str) -> Statistic:
    if not meta or meta.get("format") != FORMAT or METADATA_KEY not in meta:
        raise ValueError(f"{where}: not a gittheta statistic blob (missing {FORMAT!r} metadata)")
    provenance: dict[str, Any] = json.loads(meta[METADATA_KEY])
    return Statistic(kind=meta["kind"], tensors=tensors, provenance=provenance)


def save_statistic(stat: Statistic, path: str | os.PathLike[str]) -> None:
    """Write `stat` as a safetensors file at `path`."""
    save_file(_tensors(stat), os.fspath(path), metadata=_metadata(stat))


def statistic_to_bytes(stat: Statistic) -> bytes:
    """The same bytes `save_statistic` writes, for putting the blob straight into an object store."""
    return st_save(_tensors(stat), metadata=_metadata(stat))


def _bytes_metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    return header.get("__metadata__", {})


def statistic_from_bytes(data: bytes) -> Statistic:
    return _from_parts(st_load(data), _bytes_metadata(data), "<bytes>")


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
