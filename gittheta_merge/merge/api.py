"""The Python API: merge plain safetensors checkpoints outside git, or git-theta metadata + a store.

    from gittheta_merge.merge.api import merge_files
    report = merge_files(["a.safetensors", "b.safetensors"], "merged.safetensors",
                         base="base.safetensors", strategy="ties", params={"density": 0.2})

Files are read lazily (positioned reads of the rows in each chunk), so memory stays at a few chunks
whatever the model size; the output is written header-first and renamed into place only when complete.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gittheta_merge.constants import BLOCK_BYTES
from gittheta_merge.errors import UsageError
from gittheta_merge.merge.engine import merge_models
from gittheta_merge.merge.plan import MergeOptions, MergePlan, MergeResult, plan_merge
from gittheta_merge.merge.rules import Rule, parse_rule
from gittheta_merge.merge.sinks import SafetensorsSink, ShardedSafetensorsSink, StoreSink
from gittheta_merge.merge.sources import StoreSource, open_checkpoint
from gittheta_merge.merge.statsflow import StatFile
from gittheta_merge.merge.strategies.base import StatsAccess
from gittheta_merge.storage.metadata import Metadata
from gittheta_merge.storage.store import ObjectStore

PathLike = str | Path


def load_stats(stats: dict[str, Sequence[PathLike | None]] | None, n_models: int) -> StatsAccess:
    """Statistic files per kind ('fisher', 'gram', 'kfac'; 'grad_gram' is accepted for 'kfac'), one per model
    (None = none for it).

    Read through StatFile, so blobs written by `git theta stats compute` (one Gram per distinct input plus a
    sharing map in the provenance) work as files too, as do plain files keyed by weight name."""
    access = StatsAccess()
    for kind, paths in (stats or {}).items():
        kind = "kfac" if kind == "grad_gram" else kind  # the name MaTS' code uses
        paths = list(paths)
        if len(paths) != n_models:
            raise UsageError(f"{kind} statistics: {len(paths)} files for {n_models} models "
                             "(give one per model, in the same order)")
        access.sources[kind] = [StatFile(p) if p else None for p in paths]
    return access


SHARD_BYTES = 5_000_000_000  # a directory output's shard size: mergekit's default (--out-shard-size 5B)


def _options(strategy: str, params: dict[str, Any] | None, rules: Sequence[Rule | str] | None,
             **kwargs: Any) -> MergeOptions:
    parsed = [r if isinstance(r, Rule) else parse_rule(r) for r in (rules or [])]
    return MergeOptions(strategy=strategy, params=dict(params or {}), rules=parsed, **kwargs)


def plan_files(models: Sequence[PathLike], base: PathLike | None = None, strategy: str = "average",
               params: dict[str, Any] | None = None, rules: Sequence[Rule | str] | None = None,
               stats: dict[str, Sequence[PathLike | None]] | None = None, **kwargs: Any) -> MergePlan:
    """Validate a merge of files and return its plan without reading any tensor data."""
    sources = [open_checkpoint(p) for p in models]
    base_src = open_checkpoint(base) if base else None
    options = _options(strategy, params, rules, **kwargs)
    return plan_merge(sources, base_src, options, load_stats(stats, len(sources)))


def merge_files(models: Sequence[PathLike], output: PathLike, base: PathLike | None = None,
                strategy: str = "average", params: dict[str, Any] | None = None,
                rules: Sequence[Rule | str] | None = None,
                stats: dict[str, Sequence[PathLike | None]] | None = None,
                report_path: PathLike | None = None, shard_bytes: int | None = None,
                **kwargs: Any) -> dict[str, Any]:
    """Merge safetensors checkpoints (files, or model directories, sharded or not) into `output`; returns the merge
    report (also written to report_path). An output ending in .safetensors is one file; any other is a directory
    that gets model.safetensors, or shards of at most `shard_bytes` (default 5 GB) and their index.

    kwargs go to MergeOptions (max_block_bytes, shortcuts, device, labels, progress). Files carry no
    content identities, so only rules and strategies decide; every tensor present in all models is merged.
    """
    sources = [open_checkpoint(p) for p in models]
    base_src = open_checkpoint(base) if base else None
    options = _options(strategy, params, rules, **kwargs)
    return merge_into_file(sources, base_src, output, options, load_stats(stats, len(sources)), report_path,
                           shard_bytes, sources[0].file_metadata)


def merge_into_file(sources: Sequence[Any], base: Any, output: PathLike, options: MergeOptions,
                    stats: StatsAccess | None = None, report_path: PathLike | None = None,
                    shard_bytes: int | None = None, file_metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the engine into a .safetensors file, or a directory of shards (model.safetensors when one fits); a failed
    merge leaves no partial output. Returns the report (also written to report_path)."""
    if str(output).endswith(".safetensors"):
        sink: Any = SafetensorsSink(output, file_metadata)
    else:
        sink = ShardedSafetensorsSink(output, shard_bytes or SHARD_BYTES, file_metadata)
    try:
        result = merge_models(list(sources), base, sink, options, stats)
    except BaseException:
        sink.abort()
        raise
    if report_path:
        Path(report_path).write_text(json.dumps(result.report, indent=1))
    return result.report


def merge_metadata(models: Sequence[Metadata], base: Metadata | None, store: ObjectStore,
                   options: MergeOptions | None = None, stats: StatsAccess | None = None,
                   block_bytes: int = BLOCK_BYTES, part: Any = None) -> tuple[Metadata, MergeResult]:
    """Merge tracked checkpoints (metadata + objects in `store`); new objects go to the same store. With `part`
    (merge/distributed.py) this rank merges its share and every rank gets the whole merged metadata."""
    options = options or MergeOptions()
    labels = options.labels or []
    sources = [StoreSource(m, store, f"{labels[i]}: " if i < len(labels) else "") for i, m in enumerate(models)]
    base_src = StoreSource(base, store, "base: ") if base is not None else None
    sink = StoreSink(store, block_bytes)
    result = merge_models(sources, base_src, sink, options, stats, part=part)
    if part is not None:
        part.finish(sink, result)
    return sink.metadata(models[0]), result
