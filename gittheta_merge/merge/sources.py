"""Where the merge engine reads tensors from: git-theta metadata + object store, or safetensors files.

Both expose the same three things: per-name facts from metadata alone (`info`), the row boundaries of
how the bytes are stored (so a chunk never straddles two stored objects and each object read front to
back is hash-verified), and reads of row ranges (`read_into` a caller's buffer; `read_raw`, `read_native`
and `read_rows` are built on it). `key` is a content identity known without reading data (the oids),
which is what lets trivial merges skip tensor data entirely.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gittheta_merge import dtypes
from gittheta_merge.errors import InputError, MissingError
from gittheta_merge.storage.metadata import Metadata, TensorEntry
from gittheta_merge.storage.store import CorruptObject, ObjectStore

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
        return math.prod(self.shape[1:])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def rows_shape(self, start: int, end: int) -> list[int]:
        """The shape of rows [start, end) (a scalar: [])."""
        return [end - start, *self.shape[1:]] if self.shape else []

    @property
    def row_bytes(self) -> int:
        """Bytes of one leading-dimension row (of the one element, for a scalar)."""
        return dtypes.nbytes(self.dtype, list(self.shape[1:]))

    @property
    def nbytes(self) -> int:
        return dtypes.nbytes(self.dtype, list(self.shape))

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    def same_content(self, other: TensorInfo | None) -> bool:
        if other is None or self.key is None or other.key is None:
            return False
        return (self.dtype, self.shape, self.key) == (other.dtype, other.shape, other.key)


class _RowSource:
    """What both sources share: names and facts from `_infos` (in the file's tensor order), and every read
    built on the subclass' `read_into` (the raw bytes of a row range into a caller's buffer)."""

    _infos: dict[str, TensorInfo]
    # True: reads must come in one sequence (each stored block front to back), so the engine never reads
    # two chunks of this source at once; the object store's incremental hash verification needs it
    ordered_reads = False

    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo | None:
        return self._infos.get(name)

    def read_into(self, name: str, start: int, end: int, out: memoryview) -> None:
        raise NotImplementedError

    def read_raw(self, name: str, start: int, end: int) -> bytearray:
        """The bytes of rows [start, end) (a scalar: its one element) in a new buffer."""
        info = self._infos[name]
        buf = bytearray(info.row_bytes * (end - start if info.shape else 1))
        self.read_into(name, start, end, memoryview(buf))
        return buf

    def read_native(self, name: str, start: int, end: int) -> Any:
        """Rows [start, end) as a torch tensor of the stored dtype (viewing the read buffer: no copy)."""
        from gittheta_merge.storage.tensors import bytes_to_tensor

        info = self._infos[name]
        return bytes_to_tensor(self.read_raw(name, start, end), info.dtype, info.rows_shape(start, end))

    def read_rows(self, name: str, start: int, end: int) -> Any:
        import torch

        return self.read_native(name, start, end).to(torch.float32)


class StoreSource(_RowSource):
    """A tracked checkpoint: its metadata plus the object store holding the tensors' bytes."""

    ordered_reads = True

    def __init__(self, meta: Metadata, store: ObjectStore, label: str = "") -> None:
        self.meta = meta
        self.store = store
        self.label = label
        self._entries = meta.by_name()
        self._infos = {
            t.name: TensorInfo(t.name, t.dtype, tuple(t.shape), tuple(t.oids)) for t in meta.tensors
        }
        self._handle: tuple[str, Any] | None = None  # the object read last (consecutive chunks share it)
        self._verified: set[str] = set()  # oids whose bytes were hashed during this merge
        self._hashing: dict[str, tuple[int, Any]] = {}  # oid -> (bytes hashed so far, sha256 state)

    def entry(self, name: str) -> TensorEntry:
        return self._entries[name]

    def boundaries(self, name: str) -> list[int]:
        return self._entries[name].row_boundaries()

    def _pieces(self, name: str, start: int, end: int) -> list[tuple[str, int, int, int]]:
        """(oid, object size, offset in the object, length) of each stored block rows [start, end) touch (blocks
        of whole rows or byte ranges alike: the rows' byte range intersected with each block's)."""
        entry = self._entries[name]
        if not entry.shape:
            return [(entry.blocks[0][0], entry.nbytes, 0, entry.nbytes)]
        lo_byte, hi_byte = start * entry.row_bytes, end * entry.row_bytes
        out = []
        first = 0
        for (oid, _), size in zip(entry.blocks, entry.block_sizes()):
            lo, hi = max(lo_byte, first), min(hi_byte, first + size)
            if lo < hi or (size == 0 and lo_byte == hi_byte == first):  # an empty tensor's object is still opened
                out.append((oid, size, lo - first, hi - lo))
            first += size
        return out

    def read_into(self, name: str, start: int, end: int, out: memoryview) -> None:
        """Rows [start, end) into `out` (exactly their size), without allocating.

        Stored blocks are hash-verified incrementally: a block read front to back in consecutive ranges
        (what every streaming pass does) is checked when its last byte arrives, then trusted for the rest
        of the merge, so multi-pass strategies hash each block once, not once per pass. (Reading through
        mmap windows instead of os.pread was measured: no faster here, 0.32-0.34 s vs 0.27-0.30 s per 0.8 GB
        bf16 file including the fp32 conversion, and a truncated file would be a SIGBUS, not an error.)"""
        what = f"{self.label}tensor {name!r}: "
        pos = 0
        for oid, size, offset, n in self._pieces(name, start, end):
            view = out[pos: pos + n]
            _pread_exact(self._open(oid, size, what), view, offset, what)
            self._verify(oid, size, offset, view, what)
            pos += n

    def _open(self, oid: str, size: int, what: str) -> int:
        """A file descriptor of the object (the one read last stays open: consecutive chunks share it)."""
        if self._handle is None or self._handle[0] != oid:
            if self._handle is not None:
                self._handle[1].close()
            self._handle = (oid, self.store.open(oid, size, what))
        return self._handle[1].fileno()

    def _verify(self, oid: str, size: int, offset: int, data: memoryview, what: str) -> None:
        if oid in self._verified:
            return
        state = self._hashing.pop(oid, None)
        if offset == 0:
            state = (0, hashlib.sha256())
        if state is None or state[0] != offset:
            return  # not a front-to-back read: this range stays unverified (a later sequential pass checks it)
        state[1].update(data)
        done = offset + len(data)
        if done < size:
            self._hashing[oid] = (done, state[1])
        elif state[1].hexdigest() == oid:
            self._verified.add(oid)
        else:
            raise CorruptObject.mismatch(oid, what)


class SafetensorsSource(_RowSource):
    """A plain .safetensors file read with positioned reads (os.pread) of exactly the rows asked for.

    Not mmap (safe_open): pages of a mapped file count toward the process' RSS once touched, so streaming
    three 800 MB models through mmap showed 2-3 GB peak RSS; preads keep it at the chunks in flight.
    """

    def __init__(self, path: str | Path) -> None:
        from gittheta_merge.formats.safetensors_header import MAX_HEADER, parse_header

        self.path = str(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise MissingError(f"{self.path}: cannot open ({exc.strerror})") from None
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > MAX_HEADER or 8 + n > size:
            raise InputError(f"{self.path}: cannot open as safetensors (bad header length)")
        file_meta, tensors, _ = parse_header(os.pread(self._fd, n, 8), self.path)
        self._data_start = 8 + n
        self._infos: dict[str, TensorInfo] = {}
        self._offsets: dict[str, int] = {}
        for name, dtype, shape, start, end in tensors:
            if self._data_start + end > size:
                raise InputError(f"{self.path}: truncated (tensor {name!r} ends past the end of the file)")
            self._infos[name] = TensorInfo(name, dtype, tuple(shape), None)
            self._offsets[name] = start
        self.file_metadata = file_meta

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def boundaries(self, name: str) -> list[int]:
        return [0, self._infos[name].rows]

    def file_span(self, name: str) -> tuple[int, int, str]:
        """(open file descriptor, byte offset, what to call it in errors) of the tensor's bytes, which lie
        contiguous in the file: the compiled kernel reads them itself (engine `_merge_in_files`). Only plain
        files have this; the object store's reads go through Python to be hash-verified."""
        return self._fd, self._data_start + self._offsets[name], f"{self.path}: tensor {name!r}"

    def read_into(self, name: str, start: int, end: int, out: memoryview) -> None:
        """The bytes of rows [start, end) into `out` (exactly their size): no allocation."""
        info = self._infos[name]
        if not info.shape:
            start, end = 0, 1
        want = (end - start) * info.row_bytes
        if len(out) != want:
            raise ValueError(f"read_into: buffer of {len(out)} bytes for {want}")
        offset = self._data_start + self._offsets[name] + start * info.row_bytes
        _pread_exact(self._fd, out, offset, f"{self.path}: tensor {name!r}: ")


def _pread_exact(fd: int, out: memoryview, offset: int, what: str) -> None:
    got = 0
    want = len(out)
    while got < want:
        n = os.preadv(fd, [out[got:]], offset + got)
        if n <= 0:
            raise InputError(f"{what}file ended early")
        got += n


class ShardedSource:
    """A Hugging Face sharded checkpoint (model.safetensors.index.json + its shards) read as one source: each
    tensor from its shard's SafetensorsSource (positioned reads, as for one file)."""

    ordered_reads = False

    def __init__(self, index_path: str | Path) -> None:
        from gittheta_merge.errors import loads_untrusted

        index_path = Path(index_path)
        index = loads_untrusted(index_path.read_text(), str(index_path), "model.safetensors.index.json")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index_path}: no weight_map")
        self.path = str(index_path.parent)
        shards: dict[str, SafetensorsSource] = {}
        self._by_name: dict[str, SafetensorsSource] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or "/" in shard or shard.startswith("."):
                raise InputError(f"{index_path}: tensor {name!r}: shard {shard!r} is not a file beside the index")
            if shard not in shards:
                shards[shard] = SafetensorsSource(index_path.parent / shard)
            self._by_name[name] = shards[shard]
        order = [n for src in shards.values() for n in src.names() if self._by_name.get(n) is src]
        self._order = order + [n for n in weight_map if n not in set(order)]
        self.file_metadata = next(iter(shards.values())).file_metadata

    def names(self) -> list[str]:
        return list(self._order)

    def info(self, name: str) -> TensorInfo | None:
        src = self._by_name.get(name)
        return src.info(name) if src is not None else None

    def boundaries(self, name: str) -> list[int]:
        return self._by_name[name].boundaries(name)

    def read_rows(self, name: str, start: int, end: int) -> Any:
        return self._by_name[name].read_rows(name, start, end)

    def read_raw(self, name: str, start: int, end: int) -> Any:
        return self._by_name[name].read_raw(name, start, end)

    def read_into(self, name: str, start: int, end: int, out: memoryview) -> None:
        self._by_name[name].read_into(name, start, end, out)

    def file_span(self, name: str) -> tuple[int, int, str]:
        return self._by_name[name].file_span(name)


def open_checkpoint(path: str | Path) -> Any:
    """A merge source for a .safetensors file, or a model directory (model.safetensors, or a sharded checkpoint's
    model.safetensors.index.json)."""
    p = Path(path)
    if p.is_dir():
        if (p / "model.safetensors").is_file():
            return SafetensorsSource(p / "model.safetensors")
        if (p / "model.safetensors.index.json").is_file():
            return ShardedSource(p / "model.safetensors.index.json")
        raise MissingError(f"{path}: a directory without model.safetensors or model.safetensors.index.json")
    if p.name.endswith(".index.json"):
        return ShardedSource(p)
    return SafetensorsSource(p)
