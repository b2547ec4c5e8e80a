"""Executing a planned merge, tensor by tensor: the thread schedule (helpers read and merge the next chunks
while the caller writes in order), the choice of compute backend (compiled kernel, numpy, torch on a
device) and their bookkeeping. docs/merge.md, "Performance", has the measurements behind each choice. One
class a little over 400 lines: the schedule and the backends share the per-tensor state."""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from gittheta_merge import dtypes
from gittheta_merge.errors import ThetaError
from gittheta_merge.merge import fused, npkernels
from gittheta_merge.merge.buffers import Pool
from gittheta_merge.merge.plan import (
    MergeOptions,
    MergePlan,
    Sink,
    Source,
    TensorPlan,
    chunk_ranges,
    worker_threads,
)
from gittheta_merge.merge.strategies.base import Chunk, StatsAccess, Strategy

# the compiled kernel's file loop (fused.run_files): elements per read-merge-write step (1 MiB of float32:
# measured faster than 128-512 KiB, docs/merge.md) and the least elements worth a thread of their own
FILE_STEP_ELEMS = 1 << 18
FILE_PART_MIN_ELEMS = 1 << 20





class _Runner:
    def __init__(self, models: list[Source], base: Source | None, plan: MergePlan, options: MergeOptions,
                 stats: StatsAccess) -> None:
        self.models = models
        self.base = base
        self.plan = plan
        self.options = options
        self.stats = stats
        self.bytes_read = 0
        self.pool = Pool()  # read and output buffers of streaming strategies, reused chunk after chunk
        self._executor: Any = None  # the prefetch threads (options.prefetch, prefetch_depth)
        self.fused_tensors = 0  # tensors the compiled kernel merged

    def _inputs(self, strat: Strategy, name: str) -> list[Source]:
        """The sources a strategy reads for a tensor: the models, then the base if it gets one (_base_for)."""
        base = self._base_for(strat, name)
        return [*self.models, *([base] if base is not None else [])]

    def _base_for(self, strat: Strategy, name: str) -> Source | None:
        """The base a strategy gets for a tensor: always if it needs one; if it can use one, when there is one."""
        if strat.needs_base:
            return self.base
        if strat.uses_base and self.base is not None and self.base.info(name) is not None:
            return self.base
        return None

    def chunks(self, tp: TensorPlan, strat: Strategy, extra_bounds: list[int], report: dict[str, Any],
               kind: str = "torch", apply: Any = None):
        """The Chunks of one tensor, in buffers reused from chunk to chunk for streaming strategies, fresh ones
        of up to max_block_bytes otherwise. Their models and base are, by `kind`: "torch" float32 tensors,
        "numpy" float32 arrays, "raw" (stored bytes as a uint8 array, dtype) pairs for the compiled kernel.
        With `apply`, (chunk, apply(chunk, buffer_set)) pairs instead, apply running where the chunk is read:
        on the prefetch thread when there is one, so that thread reads and merges while the caller writes
        (buffer_set names the set of reused buffers this chunk is in, for apply's own output buffer)."""
        info = tp.info
        assert info is not None
        base = self._base_for(strat, tp.name)
        whole = kind == "torch" and not strat.separable(tp.name, list(info.shape), self.stats)
        streaming = bool(strat.chunk_bytes) and not whole
        budget = min(self.plan.max_block_bytes, strat.chunk_bytes) if streaming else self.plan.max_block_bytes
        ranges = chunk_ranges(info, self._inputs(strat, tp.name), extra_bounds, budget, whole)
        if kind == "numpy":
            reader = self.read_np
        elif kind == "raw":
            reader = self.read_raw_np
        elif streaming:
            reader = self.read_pooled
        else:
            def reader(src: Source, slot: str, name: str, start: int, end: int) -> Any:
                return src.read_rows(name, start, end)

        depth = self.prefetch_depth(kind) if streaming else 0
        # with two helpers, a source whose reads must stay in order is read by one chunk after the other,
        # while the other sources are read at the same time (different blocks hash on both cores)
        turns = {id(src): _InOrder() for src in self._inputs(strat, tp.name)
                 if depth > 1 and getattr(src, "ordered_reads", True)}

        def read_one(index: int, src: Source, slot: str, start: int, end: int) -> Any:
            turn = turns.get(id(src))
            if turn is None:
                return reader(src, slot, tp.name, start, end)
            with turn.of(index):
                return reader(src, slot, tp.name, start, end)

        def read(index: int, suffix: str, start: int, end: int) -> tuple[Chunk, Any]:
            try:
                models = [read_one(index, m, f"model{i}{suffix}", start, end) for i, m in enumerate(self.models)]
                base_rows = read_one(index, base, "base" + suffix, start, end) if base is not None else None
            except BaseException:
                for turn in turns.values():
                    turn.abandon(index)
                raise
            if self.options.device != "cpu":
                import torch

                dev = torch.device(self.options.device)
                models = [t.to(dev) for t in models]
                base_rows = base_rows.to(dev) if base_rows is not None else None
            chunk = Chunk(tp.name, list(info.shape), start, end, base_rows, models, self.stats, report)
            return chunk, (apply(chunk, suffix) if apply is not None else None)

        n_inputs = len(self.models) + (base is not None)
        for chunk, result in self._stream(ranges, read, depth):
            self.bytes_read += n_inputs * 4 * chunk.numel
            yield chunk if apply is None else (chunk, result)

    def prefetch_depth(self, kind: str) -> int:
        """How many chunks helper threads work on ahead of the caller (options.prefetch; None: the measured
        default). 0: none. 1: a helper reads (and on the torch-free path merges) chunk k+1 while the caller writes
        chunk k, so reads stay in order. 2: the compiled kernel (no shared temporaries): two helpers, so the two
        cores split reads, hash verification and the kernel while the caller stores the output; a source whose
        reads must stay in order (the object store's incremental verification) is read one chunk after the other
        (`_InOrder`). (Over plain files the kernel does its own I/O instead: `_merge_in_files`.)"""
        two_cpus = worker_threads() >= 2
        on = self.options.prefetch if self.options.prefetch is not None else kind != "torch" and two_cpus
        if not on:
            return 0
        return 2 if kind == "raw" and two_cpus else 1

    def _stream(self, ranges: list[tuple[int, int]], read: Any, depth: int) -> Iterator[Any]:
        """read(index, buffer set, start, end) per row range, in order. With depth d > 0 (reused buffers only), helper
        threads produce the next d ranges, each into its own buffer set (d + 1 sets: the caller still holds one),
        while the caller consumes range k. With d = 1 one range is in flight at a time, so reads stay in order."""
        if depth <= 0 or len(ranges) <= 1:
            for k, (start, end) in enumerate(ranges):
                yield read(k, "", start, end)
            return
        sets = depth + 1
        pending = deque(self._pool().submit(read, k, f".{k % sets}", *ranges[k])
                        for k in range(min(depth, len(ranges))))
        following = len(pending)
        try:
            while pending:
                item = pending.popleft().result()
                if following < len(ranges):
                    pending.append(self._pool().submit(read, following, f".{following % sets}",
                                                         *ranges[following]))
                    following += 1
                yield item
        finally:
            for fut in pending:  # abandoned mid-tensor: no helper may still write into the buffers
                if not fut.done():
                    fut.exception()

    def _pool(self) -> Any:
        """The helper threads: two for prefetching, one per CPU but the caller's for the file loop."""
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max(2, worker_threads() - 1), thread_name_prefix="merge-helper",
                                                initializer=_one_intra_op_thread)
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def read_pooled(self, src: Source, slot: str, name: str, start: int, end: int) -> Any:
        """Rows [start, end) of `name` as float32 in a reused buffer: raw bytes are read into a reused buffer
        (no allocation) and converted in place; valid until the same slot is read again."""
        import torch

        sinfo = src.info(name)
        assert sinfo is not None
        shape = sinfo.rows_shape(start, end)
        out = self.pool.get(slot, shape, torch.float32)
        read_into = getattr(src, "read_into", None)
        if read_into is None:
            out.copy_(src.read_rows(name, start, end))
        elif sinfo.dtype == "F32":
            read_into(name, start, end, memoryview(out.reshape(-1).view(torch.uint8).numpy()))
        else:
            view, typed = self.pool.raw(slot + ".raw", dtypes.nbytes(sinfo.dtype, shape),
                                        dtypes.to_torch(sinfo.dtype), shape)
            read_into(name, start, end, view)
            out.copy_(typed)
        return out

    def read_np(self, src: Source, slot: str, name: str, start: int, end: int) -> Any:
        import numpy as np

        sinfo = src.info(name)
        assert sinfo is not None
        out = self.pool.get_np(slot, sinfo.rows_shape(start, end), np.float32)
        if sinfo.dtype == "F32":
            src.read_into(name, start, end, memoryview(out.reshape(-1).view(np.uint8)))  # type: ignore[attr-defined]
        else:
            raw, dtype = self.read_raw_np(src, slot, name, start, end)
            npkernels.to_f32(raw, dtype, out.reshape(-1))
        return out

    def read_raw_np(self, src: Source, slot: str, name: str, start: int, end: int) -> tuple[Any, str]:
        """Rows [start, end) as stored: (uint8 array in a reused buffer, dtype). Read into a buffer, not viewed
        in a mapping of the file: measured faster, because the kernel then works on cache-resident bytes
        (docs/merge.md)."""
        sinfo = src.info(name)
        assert sinfo is not None
        raw, view = self.pool.raw_np(slot + ".raw", dtypes.nbytes(sinfo.dtype, sinfo.rows_shape(start, end)))
        src.read_into(name, start, end, view)  # type: ignore[attr-defined]
        return raw, sinfo.dtype

    def lincomb_for(self, tp: TensorPlan, strat: Strategy) -> fused.LinComb | None:
        """The combination the compiled kernel computes for this tensor, if it can: the option is on, the
        kernel is built, the strategy is a linear combination and every input and the output are F32/BF16."""
        if not self.options.fused_kernel:
            return None
        spec = strat.lincomb()
        if spec is None or tp.info is None or not fused.available():
            return None
        infos = [src.info(tp.name) for src in self._inputs(strat, tp.name)]
        if len(infos) != len(spec.scales) + (spec.base_scale is not None) or None in infos:
            return None
        return spec if fused.supports(tp.info.dtype, *(i.dtype for i in infos)) else None  # type: ignore[union-attr]

    def _apply_lincomb(self, spec: fused.LinComb, out_dtype: str, chunk: Chunk, buffer_set: str) -> Any:
        """The kernel over one raw chunk, into the output buffer of the chunk's buffer set."""
        import numpy as np

        out = self.pool.get_np("lincomb" + buffer_set, [chunk.numel], np.float32 if out_dtype == "F32" else np.uint16)
        return fused.run(spec, chunk.models, chunk.base, out, out_dtype, chunk.numel)

    def in_files(self, tp: TensorPlan, strat: Strategy, sink: Sink) -> bool:
        """True when the compiled kernel can do the tensor's whole I/O itself: every input's bytes lie
        contiguous in an open file (plain safetensors, not the object store, whose reads are hash-verified)
        and the sink gives the output's place in a file."""
        return hasattr(sink, "file_span") and all(hasattr(src, "file_span") for src in self._inputs(strat, tp.name))

    def _merge_in_files(self, tp: TensorPlan, strat: Strategy, spec: fused.LinComb, sink: Any) -> None:
        """One tensor by the kernel's file loop (fused.run_files): no Python per chunk. Measured on the 400M
        bf16 model (in-process): 0.33-0.38 s for an average of two inputs against 0.60-0.62 s with the same
        kernel fed chunk by chunk from Python (docs/merge.md). A large tensor is cut into one element range
        per thread (the caller's thread runs the first): reads, merging and writes of the ranges run in
        parallel."""
        info = tp.info
        assert info is not None
        base = self._base_for(strat, tp.name)
        out_fd, out_offset, out_what = sink.file_span(tp.name)
        n = info.numel
        step = max(1, min(FILE_STEP_ELEMS, self.plan.max_block_bytes // 4))
        threads = worker_threads() if self.options.prefetch is not False else 1
        parts = max(1, min(threads, n // FILE_PART_MIN_ELEMS))
        per = -(-n // parts) if n else 0

        def span(src: Any, start: int) -> fused.FileSpan:
            sinfo = src.info(tp.name)
            fd, offset, what = src.file_span(tp.name)
            return fused.FileSpan(fd, offset + start * dtypes.itemsize(sinfo.dtype), sinfo.dtype, what)

        def run(start: int) -> None:
            fused.run_files(spec, [span(src, start) for src in self.models], span(base, start) if base else None,
                            fused.FileSpan(out_fd, out_offset + start * dtypes.itemsize(info.dtype), info.dtype,
                                           out_what), min(per, n - start), step)

        starts = list(range(0, n, per)) if n else []
        helpers = [self._pool().submit(run, start) for start in starts[1:]]
        try:
            if starts:
                run(starts[0])
        finally:
            for fut in helpers:  # every range is done (or failed) before the output file may be closed
                fut.exception()
        for fut in helpers:
            fut.result()
        sink.span_written(tp.name)
        self.bytes_read += len(self._inputs(strat, tp.name)) * 4 * n

    def uses_numpy(self) -> bool:
        """True when every merged tensor can take the torch-free path: CPU, strategies with merge_np and no
        passes, sources with read_into, F32/F16/BF16 inputs and outputs."""
        if not (self.options.numpy_kernels and self.options.device == "cpu" and npkernels.AVAILABLE):
            return False
        for tp in self.plan.tensors:
            if tp.action != "merge":
                continue
            strat = self.plan.strategies[tp.strategy]  # type: ignore[index]
            if not strat.numpy_merge or strat.n_passes or not strat.chunk_bytes or tp.info is None \
                    or tp.info.dtype not in npkernels.DTYPES:
                return False
            for src in self._inputs(strat, tp.name):
                sinfo = src.info(tp.name)
                if not hasattr(src, "read_into") or sinfo is None or sinfo.dtype not in npkernels.DTYPES:
                    return False
        return True

    def merge_tensor(self, tp: TensorPlan, strat: Strategy, sink: Sink, entry: dict[str, Any],
                     use_numpy: bool) -> None:
        """Stream one merged tensor into the sink."""
        assert tp.info is not None
        out_bounds = sink.begin(tp.info)
        spec = self.lincomb_for(tp, strat) if use_numpy else None
        if spec is not None:
            if self.in_files(tp, strat, sink):  # plain files: the kernel does the I/O too
                self._merge_in_files(tp, strat, spec, sink)
            else:
                # the compiled kernel combines the raw chunks where they are read (the prefetch threads, if
                # any); this thread writes them in order
                apply = partial(self._apply_lincomb, spec, tp.info.dtype)
                for _chunk, result in self.chunks(tp, strat, out_bounds, entry, kind="raw", apply=apply):
                    sink.write(result)
            self.fused_tensors += 1
            sink.end()
            return
        if use_numpy:
            # merge_np runs where the chunk is read (the prefetch thread, if any); only the cast and the write
            # stay here: with prefetch the two threads split the work about evenly (docs/merge.md)
            for chunk, result in self.chunks(tp, strat, out_bounds, entry, kind="numpy",
                                             apply=lambda chunk, _: strat.merge_np(chunk)):
                _check_shape(tp, strat, list(result.shape), list(chunk.models[0].shape))
                sink.write(npkernels.from_f32(result, tp.info.dtype, self.pool))
            sink.end()
            return
        import torch

        out_dtype = dtypes.to_torch(tp.info.dtype)
        with intra_op_threads(strat):
            for chunk in self.chunks(tp, strat, out_bounds, entry):
                result = strat.merge(chunk)
                _check_shape(tp, strat, list(result.shape), list(chunk.models[0].shape))
                if strat.chunk_bytes:  # cast into a reused buffer (written out before the next chunk)
                    if out_dtype == torch.float32 and result.device.type == "cpu":
                        sink.write(result)
                    else:
                        sink.write(self.pool.get("out", list(result.shape), out_dtype).copy_(result))
                else:
                    sink.write(result.to("cpu", torch.float32).to(out_dtype))
        sink.end()

    def run_passes(self, strat: Strategy, owned: list[TensorPlan], reduce: Any = None) -> None:
        """Statistics passes over `owned`; `reduce(strat, index)` (a distributed merge) adds the ranks' pass state
        before each pass ends."""
        with intra_op_threads(strat):
            self._run_passes(strat, owned, reduce)

    def _run_passes(self, strat: Strategy, owned: list[TensorPlan], reduce: Any) -> None:
        for index in range(strat.n_passes):
            strat.begin_pass(index)
            for tp in owned:
                if tp.zero:
                    strat.observe_zero(index, tp.name, tp.info.numel)  # type: ignore[union-attr]
                elif tp.action == "merge":
                    for chunk in self.chunks(tp, strat, [], {}):
                        strat.observe(index, chunk)
            if reduce is not None:
                reduce(strat, index)
            strat.end_pass(index)


class _InOrder:
    """Chunk k's read of one source waits for chunk k-1's (hash verification reads each stored block front to
    back). When chunk j's read of any source fails, `abandon(j)` releases every later chunk's waiter with an
    error: chunk j may never reach this source, and the merge ends with j's error anyway (the caller takes
    results in order). Chunks before j go on: they may still be reading, and their results come first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0
        self._failed: float = math.inf  # the first chunk whose read failed

    @contextmanager
    def of(self, index: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._next >= index or self._failed < index)
            if self._failed < index:
                raise ThetaError("an earlier chunk's read failed")
        try:
            yield
        finally:
            with self._cond:
                self._next = index + 1
                self._cond.notify_all()

    def abandon(self, index: int) -> None:
        with self._cond:
            self._failed = min(self._failed, index)
            self._cond.notify_all()


def _check_shape(tp: TensorPlan, strat: Strategy, got: list[int], want: list[int]) -> None:
    if got != want:
        raise ThetaError(f"tensor {tp.name!r}: strategy {strat.name} returned shape {got} for a chunk of {want}")


def _one_intra_op_thread() -> None:
    """The prefetch thread's torch ops run on one thread too (OpenMP's thread count is per calling thread)."""
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


@contextmanager
def intra_op_threads(strat: Strategy) -> Iterator[None]:
    """Streaming strategies run torch's elementwise ops on one thread.

    Their chunks are cache-sized, so an op takes ~0.1-1 ms, and torch's OpenMP threads meet at a barrier
    after every op: on a shared machine where another process holds a core, each barrier waits for a
    descheduled thread. Measured on the 2-core development machine under load 4: the same bf16 average
    ran at 37-161 M elements/s with 2 intra-op threads and 566-632 M elements/s with 1 (docs/merge.md)."""
    if not strat.chunk_bytes:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

