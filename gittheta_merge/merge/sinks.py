"""Where merged tensors go: new objects in the store (git), or a safetensors file written as we go.

StoreSink cuts the output into the same row blocks `git add` would (theta.blockBytes), so a merged
tensor that is later re-added, or merged identically elsewhere, deduplicates to the same objects; a
kept tensor is not copied at all (its oids are reused). SafetensorsSink writes the header first (the
plan knows every output dtype and shape), then each tensor's bytes at their offsets: no output buffer.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path
from typing import Any

from gittheta_merge.errors import StorageError, ThetaError, human_bytes, require_space
from gittheta_merge.merge.sources import StoreSource, TensorInfo
from gittheta_merge.storage.metadata import BlockPlan, Metadata, TensorEntry, plan_blocks
from gittheta_merge.storage.store import ObjectStore, fresh_buffer

COPY_CHUNK_BYTES = 64 << 20  # a kept tensor copied into a file output: this many bytes at a time


def byte_view(rows: Any) -> memoryview:
    """The bytes of a torch tensor, a numpy array (the torch-free merge path) or a plain buffer (bytes read
    from a source), without a copy if contiguous."""
    if isinstance(rows, (bytes, bytearray, memoryview)):
        return memoryview(rows).cast("B")
    if not hasattr(rows, "numel"):  # numpy
        import numpy as np

        return memoryview(np.ascontiguousarray(rows).reshape(-1).view(np.uint8))
    import torch

    flat = rows.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class StoreSink:
    """Collects TensorEntries for merged metadata; new tensor bytes become store objects."""

    def __init__(self, store: ObjectStore, block_bytes: int) -> None:
        self.store = store
        self.block_bytes = block_bytes
        self.entries: list[TensorEntry] = []
        self._info: TensorInfo | None = None
        self._plan: BlockPlan | None = None  # the output blocks of the tensor being written
        self._oids: list[str] = []  # the blocks stored so far
        # the block being filled: one buffer of the largest block size seen, reused (filling a growing bytearray
        # reallocated it as it grew, up to twice a 64 MiB block, and moved the rest down after each block)
        self._block: Any = bytearray()
        self._fill = 0  # bytes of the current block in it

    def start(self, outputs: list[TensorInfo]) -> None:
        self.entries = []

    def require_space(self, merged_bytes: int) -> None:
        """Before merging: the merged tensors' new objects fit in the store (kept tensors reuse theirs)."""
        require_space(self.store.lfs_dir, merged_bytes, f"storing {human_bytes(merged_bytes)} of merged tensors")

    def keep(self, name: str, source: Any, info: TensorInfo) -> None:
        if isinstance(source, StoreSource) and source.store.objects_dir == self.store.objects_dir:
            entry = source.entry(name)
            self.entries.append(TensorEntry(entry.name, entry.dtype, list(entry.shape), list(entry.blocks),
                                            dict(entry.extra), entry.split))
            return
        bounds = self.begin(info)
        for lo, hi in zip(bounds, bounds[1:]):
            self._write_bytes(source.read_raw(name, lo, hi))
        self.end()

    def begin(self, info: TensorInfo) -> list[int]:
        """Start a tensor; returns the row boundaries of its output blocks (chunks never straddle them)."""
        self._info = info
        self._plan = plan_blocks(info.dtype, list(info.shape), self.block_bytes)
        self._oids = []
        self._fill = 0
        if self._plan.split == "bytes":
            return [0, info.rows]
        return list(itertools.accumulate(self._plan.counts, initial=0))

    def _write_bytes(self, data: bytes | bytearray | memoryview) -> None:
        """Copy bytes into the block buffer, storing each block as it completes."""
        assert self._plan is not None and self._info is not None
        view = memoryview(data).cast("B")
        while len(view):
            if len(self._oids) == len(self._plan.sizes):
                raise ThetaError(f"tensor {self._info.name!r}: merged output has the wrong size (internal error)")
            size = self._plan.sizes[len(self._oids)]
            if len(self._block) < size:
                self._block = fresh_buffer(size)
            n = min(len(view), size - self._fill)
            self._block[self._fill: self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            self._flush()

    def _flush(self) -> None:
        """Store the block if complete (a zero-byte tensor's one block is empty: complete)."""
        assert self._plan is not None
        while len(self._oids) < len(self._plan.sizes) and self._fill == self._plan.sizes[len(self._oids)]:
            with memoryview(self._block)[: self._fill] as piece:
                oid, _ = self.store.put(piece)
            self._fill = 0
            self._oids.append(oid)

    def write(self, rows: Any) -> None:
        self._write_bytes(byte_view(rows))  # appended to the block buffer: no intermediate bytes copy

    def end(self) -> None:
        info = self._info
        assert info is not None
        self._flush()  # a zero-byte tensor may have had nothing written
        assert self._plan is not None
        if len(self._oids) != len(self._plan.sizes) or self._fill:
            raise ThetaError(f"tensor {info.name!r}: merged output has the wrong size (internal error)")
        self.entries.append(TensorEntry.from_plan(info.name, info.dtype, list(info.shape), self._plan, self._oids))
        self._info = None

    def finish(self) -> None:
        pass

    def metadata(self, template: Metadata) -> Metadata:
        """Merged metadata in the template's (ours') format; file facts fixed up if the names changed."""
        file_info = dict(template.file)
        old = [t.name for t in template.tensors]
        new = [e.name for e in self.entries]
        layout_old = [(t.name, t.dtype, t.shape) for t in template.tensors]
        layout_new = [(e.name, e.dtype, e.shape) for e in self.entries]
        if layout_old != layout_new:
            if template.format != "safetensors" and old != new:
                raise ThetaError(
                    f"the merge adds or removes tensors ({sorted(set(old) ^ set(new))[:5]}), which the "
                    f"{template.format} format's file structure cannot express; keep one side with a rule")
            file_info.pop("header_oid", None)
            file_info.pop("header_size", None)
            order = file_info.get("header_order")
            if isinstance(order, list):
                new_names = set(new)
                kept = [k for k in order if k in new_names or k == "__metadata__"]
                kept_names = set(kept)
                file_info["header_order"] = kept + [n for n in new if n not in kept_names]
        extra = dict(template.extra)
        extra.pop("stats", None)  # ours' statistics describe ours' weights, not the merge (see merge/statsflow.py)
        return Metadata(template.format, self.entries, file_info, extra)


class SafetensorsSink:
    """Writes a .safetensors file into a temporary file that finish() renames into place.

    The plan knows every output dtype and shape, so the header, and with it every tensor's offset, is known
    before any data: all writes are positioned (os.pwrite). write() appends a tensor's rows in order;
    file_span() hands a tensor's place in the file to a writer that writes it itself (the compiled kernel's
    file loop, on several threads at once). finish() refuses a file with any byte not written."""

    def __init__(self, path: str | Path, file_metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.file_metadata = file_metadata
        self._fd: int | None = None
        self._tmp = ""
        self._infos: dict[str, TensorInfo] = {}
        self._offsets: dict[str, int] = {}  # file offset of each tensor's first byte
        self._size = 0
        self._pos = 0  # where write() goes next
        self._written = 0

    def start(self, outputs: list[TensorInfo]) -> None:
        from gittheta_merge.formats.safetensors_header import render_header

        header = render_header(self.file_metadata, [(t.name, t.dtype, list(t.shape)) for t in outputs])
        require_space(self.path.parent, 8 + len(header) + sum(t.nbytes for t in outputs), f"writing {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        pos = 8 + len(header)
        for info in outputs:  # the data order render_header laid out
            self._infos[info.name] = info
            self._offsets[info.name] = pos
            pos += info.nbytes
        self._size = pos
        self._pwrite(memoryview(len(header).to_bytes(8, "little") + header), 0)
        self._pos = 8 + len(header)

    def keep(self, name: str, source: Any, info: TensorInfo) -> None:
        self.begin(info)
        per = max(1, COPY_CHUNK_BYTES // max(info.row_bytes, 1))
        for lo in range(0, info.rows, per):
            self.write(source.read_raw(name, lo, min(info.rows, lo + per)))

    def begin(self, info: TensorInfo) -> list[int]:
        self._pos = self._offsets[info.name]
        return [0, info.rows]

    def write(self, rows: Any) -> None:
        view = byte_view(rows)
        self._pwrite(view, self._pos)
        self._pos += len(view)

    def file_span(self, name: str) -> tuple[int, int, str]:
        """(file descriptor, byte offset, what to call it in errors) of tensor `name`'s place in the output, for
        a writer that writes it whole itself (the compiled kernel's file loop); it reports with span_written."""
        assert self._fd is not None
        return self._fd, self._offsets[name], f"{self.path}: tensor {name!r}"

    def span_written(self, name: str) -> None:
        """Every byte of tensor `name` was written through its file_span."""
        self._written += self._infos[name].nbytes

    def _pwrite(self, view: memoryview, offset: int) -> None:
        if offset + len(view) > self._size:
            raise ThetaError(f"{self.path}: write past the planned end of the file (internal error)")
        assert self._fd is not None
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)
        self._written += len(view)

    def end(self) -> None:
        pass

    def finish(self) -> None:
        if self._written != self._size:
            raise StorageError(f"{self.path}: {self._size - self._written} bytes of the merged file were not "
                             "written (internal error); nothing was saved")
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tmp and os.path.exists(self._tmp):
            os.unlink(self._tmp)


class ShardedSafetensorsSink:
    """A Hugging Face sharded checkpoint: tensors in output order cut into files of at most `shard_bytes`
    (model-00001-of-0000N.safetensors, one SafetensorsSink each) and model.safetensors.index.json naming the file of
    every tensor; one file (model.safetensors, no index) when everything fits in one shard, as transformers writes."""

    def __init__(self, folder: str | Path, shard_bytes: int, file_metadata: dict[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self.shard_bytes = shard_bytes
        self.file_metadata = file_metadata
        self._sinks: list[SafetensorsSink] = []
        self._owner: dict[str, SafetensorsSink] = {}
        self._current: SafetensorsSink | None = None
        self._total = 0

    def start(self, outputs: list[TensorInfo]) -> None:
        groups: list[list[TensorInfo]] = [[]]
        size = 0
        for info in outputs:
            if groups[-1] and size + info.nbytes > self.shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(info)
            size += info.nbytes
        self._total = sum(t.nbytes for t in outputs)
        n = len(groups)
        for i, group in enumerate(groups):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            sink = SafetensorsSink(self.folder / name, self.file_metadata)
            sink.start(group)
            self._sinks.append(sink)
            self._owner.update({t.name: sink for t in group})

    def keep(self, name: str, source: Any, info: TensorInfo) -> None:
        self._owner[name].keep(name, source, info)

    def begin(self, info: TensorInfo) -> list[int]:
        self._current = self._owner[info.name]
        return self._current.begin(info)

    def write(self, rows: Any) -> None:
        assert self._current is not None
        self._current.write(rows)

    def file_span(self, name: str) -> tuple[int, int, str]:
        return self._owner[name].file_span(name)

    def span_written(self, name: str) -> None:
        self._owner[name].span_written(name)

    def end(self) -> None:
        if self._current is not None:
            self._current.end()

    def finish(self) -> None:
        import json

        for sink in self._sinks:
            sink.finish()
        written = {sink.path.name for sink in self._sinks}
        for old in [*self.folder.glob("model.safetensors"), *self.folder.glob("model-*-of-*.safetensors")]:
            if old.name not in written:  # an earlier run's output, which loaders would read instead of ours
                old.unlink()
        if len(self._sinks) == 1:
            (self.folder / "model.safetensors.index.json").unlink(missing_ok=True)
        if len(self._sinks) > 1:
            index = {"metadata": {"total_size": self._total},
                     "weight_map": {name: sink.path.name for name, sink in self._owner.items()}}
            tmp = self.folder / ".model.safetensors.index.json.tmp"
            tmp.write_text(json.dumps(index, indent=2) + "\n")
            os.replace(tmp, self.folder / "model.safetensors.index.json")

    def abort(self) -> None:
        for sink in self._sinks:
            sink.abort()
