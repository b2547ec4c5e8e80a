"""Reading tensors (or row ranges of them) from the object store as torch tensors.

This is the bridge between storage and computation used by `git theta diff` and the merge engine:
one block at a time, any dtype (bf16 and fp8 included), verified against its oid.
"""

from __future__ import annotations

import warnings
from typing import Any

from gittheta_merge import dtypes
from gittheta_merge.storage.metadata import TensorEntry
from gittheta_merge.storage.store import ObjectStore


def bytes_to_tensor(buf: bytearray | bytes, dtype: str, shape: list[int]) -> Any:
    """A tensor viewing `buf` (copied first if it is immutable bytes) as `dtype` and `shape`."""
    import torch

    torch_dtype = dtypes.to_torch(dtype)
    if not buf:
        return torch.empty(shape, dtype=torch_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer on a bytearray we own
        flat = torch.frombuffer(bytearray(buf) if isinstance(buf, bytes) else buf, dtype=torch.uint8)
    return flat.view(torch_dtype).reshape(shape)


def _read_into(store: ObjectStore, oid: str, size: int, view: memoryview, what: str) -> None:
    offset = 0
    for piece in store.iter_verified(oid, size, what):
        view[offset : offset + len(piece)] = piece
        offset += len(piece)


def load_tensor(store: ObjectStore, entry: TensorEntry, what: str = "") -> Any:
    """A whole tensor (only for callers that really need all of it at once), read into one buffer."""
    data = bytearray(entry.nbytes)
    view = memoryview(data)
    offset = 0
    for (oid, _), size in zip(entry.blocks, entry.block_sizes()):
        _read_into(store, oid, size, view[offset : offset + size], what or f"tensor {entry.name!r}: ")
        offset += size
    return bytes_to_tensor(data, entry.dtype, entry.shape)
