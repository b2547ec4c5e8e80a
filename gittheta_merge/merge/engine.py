"""The streaming merge engine: plan from metadata, then merge one row chunk of one tensor at a time.

Planning reads metadata only. For every name in the union of the models' (and base's) tensors it
decides: keep a side's tensor untouched, leave it out, or merge it with a strategy; and it checks
presence, shapes and dtypes, so a merge that cannot succeed fails before any tensor byte is read.
Trivial cases are decided from content identities (oids) alone and never read data:
  unchanged on every side -> base; changed on one side, or identically on several -> that change
(`shortcuts="git"`, git's own 3-way semantics; `shortcuts="exact"` only skips tensors equal to the base
everywhere, so a whole-model merge reproduces the paper's formula for every tensor).

Execution: strategies with global statistics passes (TIES) stream the chunks they own first; then every
tensor is produced in output order: row chunks of at most max_block_bytes (float32 working size) that
never straddle a stored input block or an output block, the M+1 chunks upcast to float32, merged, cast
back to the output dtype (model 0's) and appended to the output block. Peak tensor memory is therefore
about (M + 1 + k) x max_block_bytes plus one output block, where k (~2-4) counts a strategy's
temporaries; strategies that are not row-separable (MaTS' CG couples all rows) take whole tensors.

Streaming strategies (elementwise: average, task arithmetic, TIES; `Strategy.chunk_bytes`) use cache-sized
chunks (1 MiB float32) in buffers reused from chunk to chunk, with torch's ops on one thread; average and
task arithmetic over F32/F16/BF16 on the CPU never import torch: over F32/BF16 a compiled one-pass kernel
(merge/fused.py) combines the raw bytes (over plain files it reads and writes them itself), otherwise numpy
kernels do the same arithmetic. docs/merge.md,
"Performance", has the measurements behind each of these choices.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from gittheta_merge import dtypes
from gittheta_merge.constants import MERGE_CHUNK_BYTES
from gittheta_merge.errors import ThetaError
from gittheta_merge.merge import fused, npkernels, strategies
from gittheta_merge.merge.buffers import Pool
from gittheta_merge.merge.rules import Rule, first_match
from gittheta_merge.merge.sources import TensorInfo
from gittheta_merge.merge.strategies.base import Chunk, StatsAccess, Strategy

# the compiled kernel's file loop (fused.run_files): elements per read-merge-write step (1 MiB of float32:
# measured faster than 128-512 KiB, docs/merge.md) and the least elements worth a thread of their own
FILE_STEP_ELEMS = 1 << 18
FILE_PART_MIN_ELEMS = 1 << 20


def _cpus() -> int:
    """Threads worth running: the CPUs, at most 8 (the file loop's writes share one file)."""
    return max(1, min(os.cpu_count() or 1, 8))


class Source(Protocol):
    ordered_reads: bool  # reads must come in one sequence (sources.py); assumed True when absent
    def names(self) -> list[str]: ...
    def info(self, name: str) -> TensorInfo | None: ...
    def boundaries(self, name: str) -> list[int]: ...
    def read_rows(self, name: str, start: int, end: int) -> Any: ...
    def read_raw(self, name: str, start: int, end: int) -> Any: ...  # stored bytes (sinks copy kept tensors)
    # optional: def file_span(self, name: str) -> (fd, byte offset, label): the tensor's bytes, contiguous


class Sink(Protocol):
    def start(self, outputs: list[TensorInfo]) -> None: ...
    def keep(self, name: str, source: Any, info: TensorInfo) -> None: ...
    def begin(self, info: TensorInfo) -> list[int]: ...
    def write(self, rows: Any) -> None: ...
    # optional: file_span(name) -> (fd, byte offset, label) of the tensor's place, and span_written(name)
    def end(self) -> None: ...
    def finish(self) -> None: ...


@dataclass
class MergeOptions:
    """Everything that decides a merge besides its inputs."""

    strategy: str = "average"
    params: dict[str, Any] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    max_block_bytes: int = MERGE_CHUNK_BYTES
    shortcuts: str = "git"  # git | exact
    device: str = "cpu"
    labels: list[str] | None = None
    progress: bool | None = None
    check_stats: bool = True  # False: plan without the statistics checks (to learn which kinds are needed)
    numpy_kernels: bool = True  # False: never take the torch-free path (tests compare the two)
    fused_kernel: bool = True  # False: the torch-free path never uses the compiled kernel (tests compare)
    # a helper thread reads (and, on the torch-free path, merges) chunk k+1 while the caller writes chunk k;
    # the compiled kernel over plain files runs one range per CPU. None: on for the torch-free path when
    # there are 2+ CPUs, off for the torch path (docs/merge.md: measured). False: one thread throughout
    prefetch: bool | None = None


@dataclass
class TensorPlan:
    """What happens to one output name."""

    name: str
    action: str  # keep | merge | exclude | absent
    source: int | None = None  # keep: model index, -1 = base
    strategy: str | None = None  # key into MergePlan.strategies
    info: TensorInfo | None = None  # the output tensor (dtype = model 0's for merges)
    reason: str = ""
    zero: bool = False  # merge-owned but unchanged everywhere: counts as zero task vectors


@dataclass
class MergePlan:
    tensors: list[TensorPlan]
    strategies: dict[str, Strategy]
    n_models: int
    max_block_bytes: int

    @property
    def outputs(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.action in {"keep", "merge"} and t.info is not None]

    def merged_bytes(self) -> int:
        return sum(t.info.nbytes for t in self.tensors if t.action == "merge" and t.info is not None)

    def peak_formula(self) -> str:
        m = self.n_models
        used = [self.strategies[t.strategy] for t in self.tensors if t.action == "merge" and t.strategy]
        block = max([min(self.max_block_bytes, s.chunk_bytes or self.max_block_bytes) for s in used]
                    or [self.max_block_bytes])
        whole = [t for t in self.tensors if t.action == "merge" and t.strategy and t.info is not None
                 and not self.strategies[t.strategy].row_separable]
        sets = _cpus() + 1 if _cpus() > 1 else 1  # helper threads and the caller each hold a set at most
        text = (f"peak ≈ (M+1) × chunk × ~3 × sets (float32 chunks, raw reads, temporaries; a set per thread "
                f"holding one) = ({m}+1) × {block / 1e6:.1f} MB × 3 × {sets} "
                f"≈ {(m + 1) * block * 3 * sets / 1e6:.1f} MB")
        if whole:
            largest = max(t.info.numel * 4 for t in whole)  # type: ignore[union-attr]
            text += f"; whole-tensor strategies: (M+1) × {largest / 1e6:.1f} MB"
        return text

    def summary_lines(self) -> list[str]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            key = t.action if t.action != "merge" else f"merge:{t.strategy}"
            counts[key] = counts.get(key, 0) + 1
        lines = [f"{len(self.tensors)} tensors: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))]
        lines.append(f"data to merge: {self.merged_bytes() / 1e6:.1f} MB; {self.peak_formula()}")
        return lines


@dataclass
class MergeResult:
    plan: MergePlan
    report: dict[str, Any]


def _same(a: TensorInfo | None, b: TensorInfo | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.same_content(b)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def plan_merge(models: list[Source], base: Source | None, options: MergeOptions,
               stats: StatsAccess | None = None) -> MergePlan:
    """Decide every tensor from metadata alone; raise ThetaError for anything that cannot merge."""
    if len(models) < 2:
        raise ThetaError("a merge needs at least two models")
    if options.shortcuts not in {"git", "exact"}:
        raise ThetaError(f"shortcuts must be 'git' or 'exact', not {options.shortcuts!r}")
    stats = stats or StatsAccess()
    n = len(models)
    labels = options.labels or (["ours", "theirs"] if n == 2 else [f"model {i}" for i in range(n)])
    instances: dict[str, Strategy] = {}

    def strategy_for(name: str, params: dict[str, Any]) -> str:
        cls = strategies.get(name)
        key = f"{cls.name}{sorted(params.items())!r}"
        if key not in instances:
            instances[key] = cls(params, n)
        return key

    default_key = strategy_for(options.strategy, options.params)
    for rule in options.rules:
        if rule.action == "keep" and rule.keep is not None and rule.keep >= n:
            raise ThetaError(f"merge rule {rule.pattern!r} keeps model {rule.keep}, but there are {n} models")
        if rule.action == "merge":
            strategy_for(rule.strategy or options.strategy, rule.params)

    order: list[str] = []
    seen: set[str] = set()
    for src in [*models, *([base] if base else [])]:
        for name in src.names():
            if name not in seen:
                seen.add(name)
                order.append(name)

    plans: list[TensorPlan] = []
    for name in order:
        infos = [m.info(name) for m in models]
        binfo = base.info(name) if base else None
        rule = first_match(options.rules, name)
        if rule is not None and rule.action == "exclude":
            plans.append(TensorPlan(name, "exclude", reason=f"rule {rule.pattern!r}"))
            continue
        if rule is not None and rule.action == "keep":
            idx = rule.keep if rule.keep is not None else 0
            if idx == -1 and base is None:
                raise ThetaError(f"merge rule {rule.pattern!r} keeps the base, but there is no base model")
            info = binfo if idx == -1 else infos[idx]
            plans.append(TensorPlan(name, "keep" if info else "absent", idx, info=info,
                                    reason=f"rule {rule.pattern!r} -> {rule.describe()}"))
            continue
        key = default_key if rule is None else strategy_for(rule.strategy or options.strategy, rule.params)
        strat = instances[key]
        if base is not None and all(_same(i, binfo) for i in infos):
            plans.append(TensorPlan(name, "keep" if binfo else "absent", -1, key, binfo,
                                    "unchanged on every side", zero=binfo is not None and binfo.is_float))
            continue
        if options.shortcuts == "git" and base is not None:
            changed = [i for i, info in enumerate(infos) if not _same(info, binfo)]
            first = infos[changed[0]]
            if all(_same(infos[i], first) for i in changed):
                who = ", ".join(labels[i] for i in changed)
                what = "deleted" if first is None else "changed"
                how = "only" if len(changed) == 1 else "identically"
                plans.append(TensorPlan(name, "keep" if first else "absent", changed[0], key, first,
                                        f"{what} {how} in {who}"))
                continue
        if base is None and all(infos[0] is not None and _same(i, infos[0]) for i in infos):
            plans.append(TensorPlan(name, "keep", 0, key, infos[0], "identical in every model"))
            continue
        fix = (f"resolve it with a rule, e.g. --rule '^{_escape(name)}$=ours' (or theirs, base, exclude)")
        missing = [labels[i] for i, info in enumerate(infos) if info is None]
        if missing:
            present = [labels[i] for i, info in enumerate(infos) if info is not None]
            raise ThetaError(f"tensor {name!r}: missing in {', '.join(missing)} but changed in "
                             f"{', '.join(present)}: cannot merge; {fix}")
        shapes = {info.shape for info in infos if info}
        if len(shapes) > 1:
            detail = ", ".join(f"{_shape_text(info.shape)} in {labels[i]}" for i, info in enumerate(infos) if info)
            raise ThetaError(f"tensor {name!r}: shapes differ ({detail}): cannot merge; {fix}")
        non_float = [f"{info.dtype} in {labels[i]}" for i, info in enumerate(infos) if info and not info.is_float]
        if non_float:
            raise ThetaError(f"tensor {name!r}: {', '.join(non_float)} is not a floating-point tensor, and it "
                             f"differs between models: cannot average it; {fix}")
        if strat.needs_base:
            if binfo is None:
                raise ThetaError(f"tensor {name!r}: strategy {strat.name} needs the base version, but the base "
                                 f"{'is not given' if base is None else 'has no such tensor'}; "
                                 f"use a strategy without a base (average) for it or {fix}")
            if binfo.shape != infos[0].shape:  # type: ignore[union-attr]
                raise ThetaError(f"tensor {name!r}: shape {_shape_text(binfo.shape)} in the base vs "
                                 f"{_shape_text(infos[0].shape)} in the models: cannot compute task vectors; "  # type: ignore[union-attr]
                                 f"{fix}")
            if not binfo.is_float:
                raise ThetaError(f"tensor {name!r}: base dtype {binfo.dtype} is not floating point; {fix}")
        if options.check_stats:
            strat.check_tensor(name, list(infos[0].shape), stats)  # type: ignore[union-attr]
        out = infos[0]
        plans.append(TensorPlan(name, "merge", None, key, TensorInfo(name, out.dtype, out.shape, None),  # type: ignore[union-attr]
                                "changed on several sides"))
    return MergePlan(plans, instances, n, options.max_block_bytes)


def _escape(name: str) -> str:
    return re.escape(name).replace("'", "\\'")


def chunk_ranges(info: TensorInfo, sources: list[Any], extra_bounds: list[int], max_block_bytes: int,
                 whole: bool) -> list[tuple[int, int]]:
    """Row ranges: never across a stored block of any input or an output block; ≤ max_block_bytes fp32."""
    rows = info.rows
    if whole or rows <= 1:
        return [(0, rows)]
    bounds = {0, rows, *extra_bounds}
    for src in sources:
        bounds.update(src.boundaries(info.name))
    per = max(1, max_block_bytes // max(info.row_elems * 4, 1))
    cuts = sorted(b for b in bounds if 0 <= b <= rows)
    out: list[tuple[int, int]] = []
    for lo, hi in zip(cuts, cuts[1:]):
        for start in range(lo, hi, per):
            out.append((start, min(hi, start + per)))
    return out


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

    def _inputs(self, strat: Strategy) -> list[Source]:
        """The sources a strategy reads: the models, then the base if it needs one."""
        return [*self.models, *([self.base] if strat.needs_base and self.base is not None else [])]

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
        base = self.base if strat.needs_base else None
        whole = kind == "torch" and not strat.separable(tp.name, list(info.shape), self.stats)
        streaming = bool(strat.chunk_bytes) and not whole
        budget = min(self.plan.max_block_bytes, strat.chunk_bytes) if streaming else self.plan.max_block_bytes
        ranges = chunk_ranges(info, self._inputs(strat), extra_bounds, budget, whole)
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
        turns = {id(src): _InOrder() for src in self._inputs(strat)
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
        two_cpus = _cpus() >= 2
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

            self._executor = ThreadPoolExecutor(max(2, _cpus() - 1), thread_name_prefix="merge-helper",
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
        infos = [src.info(tp.name) for src in self._inputs(strat)]
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
        return hasattr(sink, "file_span") and all(hasattr(src, "file_span") for src in self._inputs(strat))

    def _merge_in_files(self, tp: TensorPlan, strat: Strategy, spec: fused.LinComb, sink: Any) -> None:
        """One tensor by the kernel's file loop (fused.run_files): no Python per chunk. Measured on the 400M
        bf16 model (in-process): 0.33-0.38 s for an average of two inputs against 0.60-0.62 s with the same
        kernel fed chunk by chunk from Python (docs/merge.md). A large tensor is cut into one element range
        per thread (the caller's thread runs the first): reads, merging and writes of the ranges run in
        parallel."""
        info = tp.info
        assert info is not None
        base = self.base if strat.needs_base else None
        out_fd, out_offset, out_what = sink.file_span(tp.name)
        n = info.numel
        step = max(1, min(FILE_STEP_ELEMS, self.plan.max_block_bytes // 4))
        threads = _cpus() if self.options.prefetch is not False else 1
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
        self.bytes_read += len(self._inputs(strat)) * 4 * n

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
            for src in self._inputs(strat):
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

    def run_passes(self, strat: Strategy, owned: list[TensorPlan]) -> None:
        with intra_op_threads(strat):
            self._run_passes(strat, owned)

    def _run_passes(self, strat: Strategy, owned: list[TensorPlan]) -> None:
        for index in range(strat.n_passes):
            strat.begin_pass(index)
            for tp in owned:
                if tp.zero:
                    strat.observe_zero(index, tp.name, tp.info.numel)  # type: ignore[union-attr]
                elif tp.action == "merge":
                    for chunk in self.chunks(tp, strat, [], {}):
                        strat.observe(index, chunk)
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


def merge_models(models: list[Source], base: Source | None, sink: Sink, options: MergeOptions | None = None,
                 stats: StatsAccess | None = None, plan: MergePlan | None = None) -> MergeResult:
    """Merge `models` (model 0 = ours/target) against `base` into `sink`; returns the plan and report."""
    from gittheta_merge.progress import Progress

    options = options or MergeOptions()
    stats = stats or StatsAccess()
    plan = plan or plan_merge(models, base, options, stats)
    if hasattr(sink, "require_space"):  # before minutes of merging, not after
        sink.require_space(plan.merged_bytes())
    runner = _Runner(models, base, plan, options, stats)
    use_numpy = runner.uses_numpy()  # then torch is never imported
    started = time.monotonic()
    try:
        for key, strat in plan.strategies.items():
            owned = [t for t in plan.tensors if t.strategy == key and (t.action == "merge" or t.zero)]
            if owned:
                strat.prepare([(t.name, list(t.info.shape)) for t in owned], stats)  # type: ignore[union-attr]
            if strat.n_passes and strat.pass_scope == "model" and any(t.action == "merge" for t in owned):
                runner.run_passes(strat, owned)
    except BaseException:
        runner.close()
        raise
    passes_s = time.monotonic() - started

    outputs = plan.outputs
    sink.start([t.info for t in outputs])  # type: ignore[misc]
    bar = Progress("git-theta merge", len(outputs), plan.merged_bytes(), enabled=options.progress)
    labels = options.labels or []
    reports: list[dict[str, Any]] = []
    done_bytes = 0
    merged_count = 0
    try:
        for i, tp in enumerate(outputs):
            assert tp.info is not None
            t0 = time.monotonic()
            entry: dict[str, Any] = {"name": tp.name, "action": tp.action, "reason": tp.reason}
            if tp.action == "keep":
                index = tp.source or 0
                if index == -1:
                    src, entry["source"] = base, "base"
                else:
                    src, entry["source"] = models[index], labels[index] if index < len(labels) else tp.source
                sink.keep(tp.name, src, tp.info)
            else:
                strat = plan.strategies[tp.strategy]  # type: ignore[index]
                entry["strategy"] = strat.name
                if strat.n_passes and strat.pass_scope == "tensor":
                    runner.run_passes(strat, [tp])
                runner.merge_tensor(tp, strat, sink, entry, use_numpy)
                merged_count += 1
                done_bytes += tp.info.nbytes
                elements = entry.pop("elements", None)
                if elements:
                    if "kept" in entry:
                        entry["kept_fraction"] = entry.pop("kept") / elements
                    if "sign_conflicts" in entry:
                        entry["sign_conflict_rate"] = entry.pop("sign_conflicts") / elements
                if strat.pass_scope == "tensor":
                    entry.update(strat.summary())
            entry["seconds"] = round(time.monotonic() - t0, 6)
            reports.append(entry)
            bar.update(i + 1, done_bytes)
        sink.finish()
    finally:
        bar.close()
        runner.close()
    kernels = "torch"  # what merged the tensors: torch, numpy, the compiled kernel, or it and numpy
    if use_numpy:
        kernels = "numpy" if not runner.fused_tensors else "compiled" if runner.fused_tensors == merged_count \
            else "compiled+numpy"
    for tp in plan.tensors:
        if tp.action in {"exclude", "absent"}:
            reports.append({"name": tp.name, "action": tp.action, "reason": tp.reason})
    report = {
        "n_models": len(models),
        "labels": options.labels,
        "strategy": options.strategy,
        "params": dict(options.params),
        "rules": [r.pattern + "=" + r.describe() for r in options.rules],
        "max_block_bytes": plan.max_block_bytes,
        "peak_formula": plan.peak_formula(),
        "bytes_read_fp32": runner.bytes_read,
        "kernels": kernels,
        "seconds": round(time.monotonic() - started, 6),
        "statistics_passes_seconds": round(passes_s, 6),
        "strategies": {s.name: summ for s in plan.strategies.values()
                       if s.pass_scope == "model" and (summ := s.summary())},
        "tensors": reports,
    }
    return MergeResult(plan, report)


def summary_text(report: dict[str, Any]) -> str:
    """A short human summary of a merge report."""
    actions: dict[str, int] = {}
    for t in report["tensors"]:
        key = t["action"] if t["action"] != "merge" else f"merged ({t.get('strategy')})"
        actions[key] = actions.get(key, 0) + 1
    lines = [f"merged {report['n_models']} models in {report['seconds']:.2f} s: "
             + ", ".join(f"{v} {k}" for k, v in sorted(actions.items()))]
    for name, summ in report.get("strategies", {}).items():
        if "thresholds" in summ:
            lines.append(f"{name}: thresholds {', '.join(f'{t:.4g}' for t in summ['thresholds'])}, "
                         f"majority sign {summ['majority_sign']:+.0f}")
    return "\n".join(lines)
