"""safetensors: streamed from git's stdin header first, then tensor by tensor; rebuilt byte-exact.

Memory is one row block (≤ theta.blockBytes) whatever the model size. The header is regenerated the
way the safetensors library writes it (compact JSON, `__metadata__` first, tensors in data order,
space padding to 8 bytes); when a file's header was written differently we keep its exact bytes as an
object so checkout is still byte-identical.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

from gittheta_merge.errors import InputError
from gittheta_merge.formats.base import CheckpointFormat, Context
from gittheta_merge.formats.safetensors_header import MAX_HEADER, METADATA_KEY, parse_header, render_header
from gittheta_merge.formats.streams import read_exact_into, take_exact
from gittheta_merge.storage.metadata import BlockPlan, Metadata, TensorEntry, plan_blocks
from gittheta_merge.storage.store import BufferRing

PUT_ON_HELPER_BYTES = 1 << 20  # clean: blocks this large are hashed and stored on a helper thread
MAPPED_WORKERS = 2  # clean of a mapped file: blocks hashed (and new ones stored) by this many threads at once


def _put_shared(store: Any, view: memoryview) -> tuple[str, bool]:
    """Store a view of a mapped file (copied first if new: `ObjectStore.put(shared=True)`), then let it go."""
    try:
        return store.put(view, shared=True)
    finally:
        view.release()


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
            raise InputError(f"{where}: header length {header_len} is implausible: not a safetensors file")
        raw_header = bytearray(header_len)
        read_exact_into(stream, memoryview(raw_header), f"{where} (header)")
        file_meta, tensors, key_order = parse_header(bytes(raw_header), where)

        # blocks of 1 MiB and more are hashed and stored on a helper thread while the next block is read from
        # git (two buffers taking turns); smaller ones at once, a thread hand-off costs more than they do
        stored: list[tuple[str, str, list[int], BlockPlan, list[Any]]] = []  # oids (or their futures) per block
        done_bytes = 0
        ring = BufferRing(2, "theta-put")
        mapped_pool: ThreadPoolExecutor | None = None
        try:
            for name, dtype, shape, start, end in tensors:
                plan = plan_blocks(dtype, shape, ctx.max_block_bytes)
                oids: list[Any] = []
                for size in plan.sizes:
                    mapped = take_exact(stream, size, f"{where}: tensor {name!r}")
                    if mapped is not None:  # a mapped file (`git theta add`): views of the page cache, no copy
                        if size < PUT_ON_HELPER_BYTES:
                            oids.append(_put_shared(ctx.store, mapped)[0])
                        else:
                            mapped_pool = mapped_pool or ThreadPoolExecutor(MAPPED_WORKERS, "theta-put")
                            oids.append(mapped_pool.submit(_put_shared, ctx.store, mapped))
                        continue
                    view = ring.buffer(size)
                    read_exact_into(stream, view, f"{where}: tensor {name!r}")
                    oids.append(ctx.store.put(view)[0] if size < PUT_ON_HELPER_BYTES
                                else ring.submit(ctx.store.put, view))
                stored.append((name, dtype, shape, plan, oids))
                done_bytes += end - start
                if ctx.progress:
                    ctx.progress(len(stored), done_bytes)
            if stream.read(1):
                raise InputError(f"{where}: unexpected bytes after the last tensor: the header lies about sizes")
        except BaseException:
            if mapped_pool is not None:  # blocks not yet started are not stored for a clean that failed
                mapped_pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            ring.close()
            if mapped_pool is not None:
                mapped_pool.shutdown(wait=True)
        entries = [TensorEntry.from_plan(name, dtype, shape, plan,
                                         [oid if isinstance(oid, str) else oid.result()[0] for oid in oids])
                   for name, dtype, shape, plan, oids in stored]

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
                raise InputError(f"{where}: metadata header_order does not match its tensors")
        if "header_oid" in meta.file:
            size = meta.file.get("header_size")
            if not isinstance(size, int) or not 2 <= size <= MAX_HEADER:
                raise InputError(f"{where}: invalid header_size in metadata")
            raw = ctx.store.read(meta.file["header_oid"], size, f"{where}: header: ")
            _, tensors, _ = parse_header(raw, where)
            if [(n, d, s) for n, d, s, _, _ in tensors] != layout:
                raise InputError(f"{where}: stored header does not match the metadata's tensors")
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
                    verifier.write_object(oid, size, out, what)
                done += tensor.nbytes
                if ctx.progress:
                    ctx.progress(i + 1, done)
            verifier.check()
        finally:
            verifier.close()

