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

import time
from typing import Any

from gittheta_merge.merge.plan import MergeOptions, MergePlan, MergeResult, Sink, Source, plan_merge
from gittheta_merge.merge.runner import _Runner
from gittheta_merge.merge.sources import TensorInfo
from gittheta_merge.merge.strategies.base import StatsAccess


def merge_models(models: list[Source], base: Source | None, sink: Sink, options: MergeOptions | None = None,
                 stats: StatsAccess | None = None, plan: MergePlan | None = None, part: Any = None) -> MergeResult:
    """Merge `models` (model 0 = ours/target) against `base` into `sink`; returns the plan and report.

    `part` (merge/distributed.py, a merge over several torchrun ranks): this rank produces only the outputs
    `part.owns(name)`, observes only those in whole-model passes, and `part.reduce_pass` adds the ranks' pass state
    before each pass ends; the sink then holds this rank's tensors, in output order."""
    from gittheta_merge.progress import Progress

    options = options or MergeOptions()
    stats = stats or StatsAccess()
    plan = plan or plan_merge(models, base, options, stats)
    if part is not None:
        part.start(plan, models, base)
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
                if part is None:
                    runner.run_passes(strat, owned)
                else:  # every rank runs the passes (collectives), over its own tensors
                    runner.run_passes(strat, [t for t in owned if part.owns(t.name)], part.reduce_pass)
    except BaseException:
        runner.close()
        raise
    passes_s = time.monotonic() - started

    outputs = plan.outputs if part is None else [t for t in plan.outputs if part.owns(t.name)]
    sink.start([t.info for t in outputs])  # type: ignore[misc]
    total_bytes = sum(t.info.nbytes for t in outputs if t.action == "merge")  # type: ignore[union-attr]
    bar = Progress("git-theta merge", len(outputs), total_bytes, enabled=options.progress,
                   rank=(part.rank, part.group.world) if part is not None else None)
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
                if src.info(tp.name).dtype != tp.info.dtype:  # out_dtype: converted as it is copied
                    copy_converted(sink, src, tp.info, options.max_block_bytes)
                else:
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


def copy_converted(sink: Any, src: Any, info: TensorInfo, max_block_bytes: int) -> None:
    """A kept tensor written in another floating-point dtype (out_dtype), a row chunk at a time."""
    from gittheta_merge import dtypes

    torch_dtype = dtypes.to_torch(info.dtype)
    bounds = sink.begin(info)
    per = max(1, max_block_bytes // max(info.row_elems * 4, 1))
    for lo, hi in zip(bounds, bounds[1:]):
        for start in range(lo, hi, per):
            sink.write(src.read_rows(info.name, start, min(hi, start + per)).to(torch_dtype))
    sink.end()
