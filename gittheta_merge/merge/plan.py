"""Planning a merge from metadata alone: what happens to each tensor (keep a side, leave out, merge with a
strategy), checks of presence, shapes and dtypes before any byte is read, and the row chunks a tensor is cut
into. See engine.py for the whole flow."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from gittheta_merge.constants import MAX_MERGE_ROW_BYTES, MERGE_CHUNK_BYTES
from gittheta_merge.errors import InputError, MissingError, UsageError, human_bytes
from gittheta_merge.merge import strategies
from gittheta_merge.merge.rules import Rule, first_match
from gittheta_merge.merge.sources import TensorInfo
from gittheta_merge.merge.strategies.base import StatsAccess, Strategy


def worker_threads() -> int:
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
    # the dtype every floating-point output tensor is written in (mergekit's out_dtype; safetensors code such as
    # BF16); None: each tensor keeps its inputs' dtype. Kept tensors of another dtype are converted as they are copied
    out_dtype: str | None = None


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
        # a chunk is rows of one tensor: never more than the largest merged tensor in float32
        largest = max([t.info.numel * 4 for t in self.tensors if t.action == "merge" and t.info is not None] or [0])
        block = min(block, largest) if largest else block
        whole = [t for t in self.tensors if t.action == "merge" and t.strategy and t.info is not None
                 and not self.strategies[t.strategy].row_separable]
        sets = worker_threads() + 1 if worker_threads() > 1 else 1  # helpers and the caller: a set each at most
        text = (f"peak ≈ (M+1) × chunk × ~3 × sets (float32 chunks, raw reads, temporaries; a set per thread "
                f"holding one) = ({m}+1) × {block / 1e6:.1f} MB × 3 × {sets} "
                f"≈ {(m + 1) * block * 3 * sets / 1e6:.1f} MB")
        if whole:
            worst = max(whole, key=lambda t: t.info.numel * self.strategies[t.strategy].whole_tensor_copies())
            strat = self.strategies[worst.strategy]  # type: ignore[index]
            copies, size = strat.whole_tensor_copies(), worst.info.numel * 4  # type: ignore[union-attr]
            text += (f"; whole tensors ({strat.name}, e.g. {worst.name!r}): {copies} float32 copies × "
                     f"{size / 1e6:.1f} MB ≈ {copies * size / 1e6:.1f} MB")
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
    if len(models) < 2 and (base is None or not models):
        raise UsageError("a merge needs at least two models, or one model and a base (task arithmetic of one "
                         "fine-tune, as a mergekit configuration may ask)")
    if options.shortcuts not in {"git", "exact"}:
        raise UsageError(f"shortcuts must be 'git' or 'exact', not {options.shortcuts!r}")
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
            raise UsageError(f"merge rule {rule.pattern!r} keeps model {rule.keep}, but there are {n} models")
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
                raise UsageError(f"merge rule {rule.pattern!r} keeps the base, but there is no base model")
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
            raise InputError(f"tensor {name!r}: missing in {', '.join(missing)} but changed in "
                             f"{', '.join(present)}: cannot merge; {fix}")
        shapes = {info.shape for info in infos if info}
        if len(shapes) > 1:
            detail = ", ".join(f"{_shape_text(info.shape)} in {labels[i]}" for i, info in enumerate(infos) if info)
            raise InputError(f"tensor {name!r}: shapes differ ({detail}): cannot merge; {fix}")
        non_float = [f"{info.dtype} in {labels[i]}" for i, info in enumerate(infos) if info and not info.is_float]
        if non_float:
            raise InputError(f"tensor {name!r}: {', '.join(non_float)} is not a floating-point tensor, and it "
                             f"differs between models: cannot average it; {fix}")
        if strat.needs_base:
            if binfo is None:
                raise MissingError(f"tensor {name!r}: strategy {strat.name} needs the base version, but the base "
                                 f"{'is not given' if base is None else 'has no such tensor'}; "
                                 f"use a strategy without a base (average) for it or {fix}")
            if binfo.shape != infos[0].shape:  # type: ignore[union-attr]
                raise InputError(f"tensor {name!r}: shape {_shape_text(binfo.shape)} in the base vs "
                                 f"{_shape_text(infos[0].shape)} in the models: cannot compute task vectors; "  # type: ignore[union-attr]
                                 f"{fix}")
            if not binfo.is_float:
                raise InputError(f"tensor {name!r}: base dtype {binfo.dtype} is not floating point; {fix}")
        row_fp32 = infos[0].row_elems * 4  # type: ignore[union-attr]
        if row_fp32 > MAX_MERGE_ROW_BYTES:
            raise InputError(f"tensor {name!r}: one row of shape {_shape_text(infos[0].shape)} is "  # type: ignore[union-attr]
                             f"{human_bytes(row_fp32)} in float32, more than a merge holds at once "
                             f"({human_bytes(MAX_MERGE_ROW_BYTES)}): cannot merge it; {fix}")
        if options.check_stats:
            strat.check_tensor(name, list(infos[0].shape), stats)  # type: ignore[union-attr]
        out = infos[0]
        plans.append(TensorPlan(name, "merge", None, key, TensorInfo(name, out.dtype, out.shape, None),  # type: ignore[union-attr]
                                "changed on several sides"))
    if options.out_dtype:
        for tp in plans:
            if tp.info is not None and tp.info.is_float and tp.info.dtype != options.out_dtype:
                tp.info = TensorInfo(tp.name, options.out_dtype, tp.info.shape, None)
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

