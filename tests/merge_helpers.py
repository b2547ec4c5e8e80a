"""Helpers for the merge tests: random model families, files, store-backed models, counting reads."""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from gittheta_merge import formats
from gittheta_merge.formats.base import Context
from gittheta_merge.storage.metadata import Metadata
from gittheta_merge.storage.store import ObjectStore

SHAPES = {"emb.weight": (50, 16), "l0.weight": (24, 16), "l0.bias": (24,), "l1.weight": (16, 24),
          "ln.weight": (16,), "scale": ()}


def family(n_models: int = 2, seed: int = 0, noise: float = 0.05, dtype: torch.dtype = torch.float32,
           shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[dict, list[dict]]:
    """A base state dict and n fine-tunes of it (every tensor changed in every model)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = shapes or SHAPES
    base = {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
    models = [{k: (v.float() + noise * torch.randn(v.shape, generator=gen)).to(dtype) for k, v in base.items()}
              for _ in range(n_models)]
    return base, models


def f32(sd: dict) -> dict:
    return {k: v.float() for k, v in sd.items()}


def write_files(tmp: Path, base: dict | None, models: list[dict]) -> tuple[str | None, list[str]]:
    paths = []
    for i, m in enumerate(models):
        p = tmp / f"m{i}.safetensors"
        save_file({k: v.contiguous() for k, v in m.items()}, str(p))
        paths.append(str(p))
    bpath = None
    if base is not None:
        bpath = str(tmp / "base.safetensors")
        save_file({k: v.contiguous() for k, v in base.items()}, bpath)
    return bpath, paths


class CountingStore(ObjectStore):
    """An ObjectStore that counts reads of tensor data (to prove trivial merges read none)."""

    reads = 0

    def read(self, *args, **kwargs):  # type: ignore[override]
        CountingStore.reads += 1
        return super().read(*args, **kwargs)

    def iter_verified(self, *args, **kwargs):  # type: ignore[override]
        CountingStore.reads += 1
        return super().iter_verified(*args, **kwargs)


def to_meta(sd: dict, store: ObjectStore, block_bytes: int = 64 << 20) -> Metadata:
    """Clean a state dict into the store exactly like `git add` would."""
    buf = io.BytesIO()
    from safetensors.torch import save

    buf.write(save({k: v.contiguous() for k, v in sd.items()}))
    buf.seek(0)
    return formats.by_name("safetensors").clean(buf, Context("model.safetensors", store, block_bytes))


def from_meta(meta: Metadata, store: ObjectStore) -> dict:
    from gittheta_merge.storage.tensors import load_tensor

    return {t.name: load_tensor(store, t) for t in meta.tensors}


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    denom = b.abs().max().clamp(min=1e-30)
    return float((a - b).abs().max() / denom)


def flip_byte(store: ObjectStore, oid: str, position: int, mask: int) -> None:
    """Corrupt a stored object in place, same size (position may be negative); flipping again restores it."""
    path = store.path(oid)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[position] ^= mask
    path.write_bytes(bytes(data))
