"""Where the merge engine reads tensors from: git-theta metadata + object store, or safetensors files.

Both expose the same three things: per-name facts from metadata alone (`info`), the row boundaries of
how the bytes are stored (so a chunk never straddles two stored objects and whole-object reads can be
hash-verified), and `read_rows`. `key` is a content identity known without reading data (the oids),
which is what lets trivial merges skip tensor data entirely.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gittheta_merge import dtypes
from gittheta_merge.errors import ThetaError
from gittheta_merge.metadata import Metadata, TensorEntry
from gittheta_merge.store import ObjectStore

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}


@dataclass(frozen=True)
class TensorInfo:
    """What metadata says about one tensor: enough to plan and check a merge without reading data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    key: tuple[str, ...] | None  # content identity (oids); None when unknown (plain files)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_elems(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n

    @property
    def numel(self) -> int:
        return self.rows * self.row_elems if self.shape else 1

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    def same_content(self, other: TensorInfo | None) -> bool:
        if other is None or self.key is None or other.key is None:
            return False
        return (self.dtype, self.shape, self.key) == (other.dtype, other.shape, other.key)


def _as_float32(raw: bytes | bytearray, dtype: str, shape: list[int]) -> Any:
    import torch

    from gittheta_merge.tensors import _to_tensor

    return _to_tensor(bytearray(raw), dtype, shape).to(torch.float32)


class StoreSource:
    """A tracked checkpoint: its metadata plus the object store holding the tensors' bytes."""

    def __init__(self, meta: Metadata, store: ObjectStore, label: str = "") -> None:
        self.meta = meta
        self.store = store
        self.label = label
        self._entries = meta.by_name()
        self._infos = {
            t.name: TensorInfo(t.name, t.dtype, tuple(t.shape), tuple(t.oids)) for t in meta.tensors
        }

    def names(self) -> list[str]:
        return [t.name for t in self.meta.tensors]

    def info(self, name: str) -> TensorInfo | None:
        return self._infos.get(name)

    def entry(self, name: str) -> TensorEntry:
        return self._entries[name]

    def boundaries(self, name: str) -> list[int]:
        out = [0]
        for _, rows in self._entries[name].blocks:
            out.append(out[-1] + rows)
        return out

    def read_raw(self, name: str, start: int, end: int) -> bytes:
        """The bytes of rows [start, end). A range covering a whole stored block is hash-verified."""
        entry = self._entries[name]
        row_bytes = entry.row_bytes if entry.shape else entry.nbytes
        what = f"{self.label}tensor {name!r}: "
        parts: list[bytes] = []
        first = 0
        for (oid, rows), size in zip(entry.blocks, entry.block_sizes()):
            lo, hi = max(start, first), min(end, first + rows)
            if lo < hi or (rows == 0 and start == end == first):
                parts.append(self.store.read(oid, size, what, offset=(lo - first) * row_bytes,
                                             length=(hi - lo) * row_bytes))
            first += rows
        if not entry.shape:
            return self.store.read(entry.blocks[0][0], entry.nbytes, what)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_rows(self, name: str, start: int, end: int) -> Any:
        info = self._infos[name]
        shape = [end - start, *info.shape[1:]] if info.shape else []
        return _as_float32(self.read_raw(name, start, end), info.dtype, shape)


class SafetensorsSource:
    """A plain .safetensors file read lazily with safetensors' safe_open (memory-mapped slices)."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = str(path)
        try:
            self._handle = safe_open(self.path, framework="pt")
        except Exception as exc:  # noqa: BLE001 - safetensors raises several unrelated types
            raise ThetaError(f"{self.path}: cannot open as safetensors ({exc})") from None
        self._infos: dict[str, TensorInfo] = {}
        self._order: list[str] = []
        for name in self._handle.keys():
            sl = self._handle.get_slice(name)
            dtype = sl.get_dtype()
            self._infos[name] = TensorInfo(name, dtype, tuple(sl.get_shape()), None)
            self._order.append(name)
        self.file_metadata = self._handle.metadata()

    def names(self) -> list[str]:
        return list(self._order)

    def info(self, name: str) -> TensorInfo | None:
        return self._infos.get(name)

    def boundaries(self, name: str) -> list[int]:
        return [0, self._infos[name].rows]

    def read_native(self, name: str, start: int, end: int) -> Any:
        info = self._infos[name]
        if not info.shape:
            return self._handle.get_tensor(name)
        return self._handle.get_slice(name)[start:end]

    def read_rows(self, name: str, start: int, end: int) -> Any:
        import torch

        return self.read_native(name, start, end).to(torch.float32)


def dtype_itemsize(dtype: str) -> int:
    return dtypes.itemsize(dtype)
