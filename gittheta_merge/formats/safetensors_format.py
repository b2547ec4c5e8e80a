"""safetensors: streamed from git's stdin header first, then tensor by tensor; rebuilt byte-exact.

Memory is one row block (≤ theta.blockBytes) whatever the model size. The header is regenerated the
way the safetensors library writes it (compact JSON, `__metadata__` first, tensors in data order,
space padding to 8 bytes); when a file's header was written differently we keep its exact bytes as an
object so checkout is still byte-identical.
"""

from __future__ import annotations

import json
from typing import Any, BinaryIO

from gittheta_merge import dtypes
from gittheta_merge.errors import ThetaError, loads_untrusted
from gittheta_merge.formats.base import CheckpointFormat, Context
from gittheta_merge.formats.streams import read_exact_into
from gittheta_merge.storage.metadata import Metadata, TensorEntry, plan_row_blocks
from gittheta_merge.storage.store import BufferRing

MAX_HEADER = 100_000_000  # safetensors' own limit
METADATA_KEY = "__metadata__"
PUT_ON_HELPER_BYTES = 1 << 20  # clean: blocks this large are hashed and stored on a helper thread


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
        raise ThetaError(f"{where}: safetensors header is not valid JSON ({exc})") from None
    doc = loads_untrusted(text, where, "safetensors header", object_pairs_hook=_no_duplicates)
    if not isinstance(doc, dict):
        raise ThetaError(f"{where}: safetensors header is not a JSON object")
    file_meta = doc.get(METADATA_KEY)
    if file_meta is not None and not isinstance(file_meta, dict):
        raise ThetaError(f"{where}: __metadata__ must be an object")
    tensors = []
    for name, info in doc.items():
        if name == METADATA_KEY:
            continue
        here = f"{where}: tensor {name!r}"
        if not isinstance(info, dict):
            raise ThetaError(f"{here}: header entry is not an object")
        dtype, shape, span = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise ThetaError(f"{here}: missing dtype")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ThetaError(f"{here}: invalid shape {shape!r}")
        if not (isinstance(span, list) and len(span) == 2 and all(isinstance(x, int) for x in span)
                and 0 <= span[0] <= span[1]):
            raise ThetaError(f"{here}: invalid data_offsets {span!r}")
        expected = dtypes.nbytes(dtype, shape, where=f"{here}: ")
        if span[1] - span[0] != expected:
            raise ThetaError(
                f"{here}: header says {span[1] - span[0]} bytes but {dtype}{shape} needs {expected}; "
                "the file is corrupt or was written by a broken tool"
            )
        tensors.append((name, dtype, list(shape), span[0], span[1]))
    tensors.sort(key=lambda t: (t[3], t[4]))
    cursor = 0
    for name, _, _, start, end in tensors:
        if start != cursor:
            raise ThetaError(
                f"{where}: tensor {name!r} starts at byte {start}, expected {cursor} "
                "(overlapping or gapped tensor data: not a valid safetensors file)"
            )
        cursor = end
    return file_meta, tensors, list(doc.keys())


class SafetensorsFormat(CheckpointFormat):
    name = "safetensors"
    extensions = (".safetensors",)

    def sniff(self, path: str, head: bytes) -> int:
        if len(head) >= 9:
            n = int.from_bytes(head[:8], "little")
            if 2 <= n <= MAX_HEADER and head[8:9] == b"{":
                return 2
        return 1 if path.endswith(self.extensions) else 0

    def clean(self, stream: BinaryIO, ctx: Context) -> Metadata:
        where = ctx.path
        prefix = bytearray(8)
        read_exact_into(stream, memoryview(prefix), where)
        header_len = int.from_bytes(prefix, "little")
        if header_len > MAX_HEADER:
            raise ThetaError(f"{where}: header length {header_len} is implausible: not a safetensors file")
        raw_header = bytearray(header_len)
        read_exact_into(stream, memoryview(raw_header), f"{where} (header)")
        file_meta, tensors, key_order = parse_header(bytes(raw_header), where)

        # blocks of 1 MiB and more are hashed and stored on a helper thread while the next block is read from
        # git (two buffers taking turns); smaller ones at once, a thread hand-off costs more than they do
        stored: list[tuple[str, str, list[int], list[tuple[Any, int]]]] = []  # blocks: (oid or its future, rows)
        done_bytes = 0
        ring = BufferRing(2, "theta-put")
        try:
            for name, dtype, shape, start, end in tensors:
                plan = plan_row_blocks(dtype, shape, ctx.max_block_bytes)
                rows = shape[0] if shape else 1
                row_bytes = (end - start) // rows if rows else 0
                blocks: list[tuple[Any, int]] = []
                for block_rows in plan:
                    size = block_rows * row_bytes if rows else 0
                    view = ring.buffer(size)
                    read_exact_into(stream, view, f"{where}: tensor {name!r}")
                    oid = ctx.store.put(view)[0] if size < PUT_ON_HELPER_BYTES else ring.submit(ctx.store.put, view)
                    blocks.append((oid, block_rows))
                stored.append((name, dtype, shape, blocks))
                done_bytes += end - start
                if ctx.progress:
                    ctx.progress(len(stored), done_bytes)
            if stream.read(1):
                raise ThetaError(f"{where}: unexpected bytes after the last tensor: the header lies about sizes")
        finally:
            ring.close()
        entries = [TensorEntry(name, dtype, shape, [(oid if isinstance(oid, str) else oid.result()[0], rows)
                                                    for oid, rows in blocks])
                   for name, dtype, shape, blocks in stored]

        info: dict[str, Any] = {}
        if file_meta is not None:
            info["metadata"] = file_meta
        layout = [(t[0], t[1], t[2]) for t in tensors]
        default_order = ([METADATA_KEY] if file_meta is not None else []) + [t[0] for t in tensors]
        if key_order != default_order:
            info["header_order"] = key_order
        if render_header(file_meta, layout, info.get("header_order")) != bytes(raw_header):
            oid, _ = ctx.store.put(raw_header)
            info["header_oid"] = oid
            info["header_size"] = header_len
        return Metadata(self.name, entries, info)

    def header_bytes(self, meta: Metadata, ctx: Context) -> bytes:
        where = ctx.path
        layout = [(t.name, t.dtype, t.shape) for t in meta.tensors]
        file_meta = meta.file.get("metadata")
        order = meta.file.get("header_order")
        if order is not None:
            expected = set(([METADATA_KEY] if file_meta is not None else []) + [t.name for t in meta.tensors])
            if not isinstance(order, list) or set(order) != expected or len(order) != len(expected):
                raise ThetaError(f"{where}: metadata header_order does not match its tensors")
        if "header_oid" in meta.file:
            size = meta.file.get("header_size")
            if not isinstance(size, int) or not 2 <= size <= MAX_HEADER:
                raise ThetaError(f"{where}: invalid header_size in metadata")
            raw = ctx.store.read(meta.file["header_oid"], size, f"{where}: header: ")
            _, tensors, _ = parse_header(raw, where)
            if [(n, d, s) for n, d, s, _, _ in tensors] != layout:
                raise ThetaError(f"{where}: stored header does not match the metadata's tensors")
            return raw
        return render_header(file_meta, layout, order)

    def smudge(self, meta: Metadata, out: BinaryIO, ctx: Context) -> None:
        header = self.header_bytes(meta, ctx)
        out.write(len(header).to_bytes(8, "little"))
        out.write(header)
        done = 0
        # objects are hashed on a helper thread while their bytes go out, and a bad one fails the smudge at the
        # end: git discards a smudge's output when it fails (store.OverlappedVerifier)
        verifier = ctx.store.overlapped_verifier()
        try:
            for i, tensor in enumerate(meta.tensors):
                what = f"{ctx.path}: tensor {tensor.name!r}: "
                for (oid, _), size in zip(tensor.blocks, tensor.block_sizes()):
                    for piece in verifier.iter_object(oid, size, what):
                        out.write(piece)
                done += tensor.nbytes
                if ctx.progress:
                    ctx.progress(i + 1, done)
            verifier.check()
        finally:
            verifier.close()

