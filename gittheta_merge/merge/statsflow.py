"""Statistics flowing from git into merges, and out of them again.

Why this module exists: Fisher, RegMean and MaTS need per-model statistics. Since the checkpoint's
metadata references its statistic blobs (stats/attach.py), a merge handed ours/theirs metadata can find
them itself; the user should never have to pass `--stats` for branches that carry them. Three jobs:

1. `StatFile`: read a statistic blob lazily, resolving weight names through the blob's sharing map
   (the computation stores one Gram per distinct input: q/k/v point to one key; tied weights to one
   Fisher), so strategies can keep asking "the gram of `layers.0.k_proj.weight`".
2. `resolve_statistics`: decide, from metadata alone, which kinds the planned merge really needs (a
   merge of one-sided changes needs none), refuse stale blobs unless allowed, and turn a missing blob
   into either an error naming the branch and the command that computes it, or the fallback strategy
   the user configured (`theta.merge.missingStats = average`).
3. `derive_statistics`: give the merged model the statistics that make later merges exact. RegMean's
   solution depends on the Grams only through their sum and Fisher merging on the (floored, weighted)
   Fishers only through their sum, so the merged model's statistic is that sum, and merging A+B and
   then C with it equals the 3-way merge. Blocks without statistics (RegMean averages biases / norms)
   stay exact too, because the derived blob records how many models it stands for (`merged_models`) and
   the average then weighs the merged model by that count.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gittheta_merge.errors import InputError, MissingError, UsageError
from gittheta_merge.merge.sources import SafetensorsSource, TensorInfo
from gittheta_merge.merge.strategies.base import StatsAccess

DERIVABLE = {"regmean": "gram", "fisher": "fisher"}


class StatFile:
    """A statistic safetensors file exposing every weight name it covers, shared keys included."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.src = SafetensorsSource(path)
        from gittheta_merge.stats.blobs import provenance_in  # a strategy that reads statistics imports torch anyway

        self.provenance: dict[str, Any] = provenance_in(self.src.file_metadata or {})
        sharing = self.provenance.get("sharing")
        self.sharing: dict[str, str] = dict(sharing) if isinstance(sharing, dict) else {}

    @property
    def merged_models(self) -> int:
        """How many models this statistic stands for (1 unless derived by a merge)."""
        try:
            return max(1, int(self.provenance.get("merged_models", 1)))
        except (TypeError, ValueError):
            return 1

    def count(self, name: str) -> int | None:
        """The number of terms in the sum stored for `name` (tokens for a Gram, examples for a Fisher), from the
        provenance's `counts`; None where the file does not say (a plain safetensors file, not a statistic blob)."""
        key = self.resolve(name)
        counts = self.provenance.get("counts")
        value = counts.get(key) if isinstance(counts, dict) and key is not None else None
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    def keys(self) -> list[str]:
        return self.src.names()

    def resolve(self, name: str) -> str | None:
        if self.src.info(name) is not None:
            return name
        key = self.sharing.get(name)
        return key if key is not None and self.src.info(key) is not None else None

    def info(self, name: str) -> TensorInfo | None:
        key = self.resolve(name)
        return None if key is None else self.src.info(key)

    def read_rows(self, name: str, start: int, end: int) -> Any:
        key = self.resolve(name)
        if key is None:
            raise MissingError(f"{self.path}: no statistic for {name!r}")
        return self.src.read_rows(key, start, end)


@dataclass
class StatsResolution:
    """What `resolve_statistics` decided, for the report and for deriving the merged model's statistics."""

    access: StatsAccess
    strategy: str
    params: dict[str, Any]
    fallback: str | None = None  # why the configured strategy was replaced, if it was
    used: dict[str, list[str]] = field(default_factory=dict)  # kind -> per-model "where (oid)"

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"used": self.used}
        if self.fallback:
            out["fallback"] = self.fallback
        return out


def needed_kinds(models: list[Any], base: Any, options: Any) -> set[str]:
    """Statistic kinds the merge really needs: those of strategies owning at least one tensor to merge.

    Plans with the statistics checks off (metadata only, no data), so a driver merge whose changes are
    all one-sided asks for nothing, whatever the configured strategy.
    """
    from dataclasses import replace

    from gittheta_merge.merge.plan import plan_merge

    probe = replace(options, check_stats=False)
    plan = plan_merge(models, base, probe, StatsAccess())
    kinds: set[str] = set()
    for tp in plan.tensors:
        if tp.action == "merge" and tp.strategy:
            kinds.update(plan.strategies[tp.strategy].stat_kinds())
    return kinds


def _attached(store: Any, meta: Any, kind: str, where: str, allow_stale: bool, hint_path: str) -> Path | None:
    """The blob file of an attached statistic; None when absent; ThetaError when stale (unless allowed)."""
    from gittheta_merge.stats import attach

    entry = meta.stats.get(kind)
    if not isinstance(entry, dict) or "oid" not in entry:
        return None
    if attach.is_stale(meta, kind) and not allow_stale:
        raise InputError(
            f"{where}: its {kind} statistics were computed on different weights (stale): the weights changed "
            "after `git theta stats compute`. Recompute them there "
            f"({attach.COMPUTE_HINT.format(path=hint_path, kind=kind)}), or pass --allow-stale-stats "
            "(git config theta.merge.allowStaleStats true) to use them anyway")
    return attach.blob_path(store, meta, kind, where, allow_stale=True)


def resolve_statistics(metas: list[Any], labels: list[str], path: str, store: Any, options: Any,
                       models: list[Any], base: Any, explicit: StatsAccess | None = None,
                       allow_stale: bool = False, missing: str = "error") -> StatsResolution:
    """Statistics for a merge of tracked checkpoints: explicit files first, then each side's attached blobs.

    `missing` is "error" or the name of a data-free strategy used for the whole file instead.
    """
    from gittheta_merge.merge import strategies

    access = StatsAccess(dict(explicit.sources) if explicit else {})
    res = StatsResolution(access, options.strategy, dict(options.params))
    kinds = needed_kinds(models, base, options)
    absent: list[tuple[str, str]] = []
    for kind in sorted(kinds):
        if access.has_kind(kind):
            res.used[kind] = ["explicit file"] * len(metas)
            continue
        files: list[Any] = []
        used: list[str] = []
        for meta, label in zip(metas, labels):
            where = f"{path} on {label}"
            blob = _attached(store, meta, kind, where, allow_stale, path)
            if blob is None:
                absent.append((label, kind))
                files.append(None)
                used.append("none")
            else:
                files.append(StatFile(blob))
                used.append(f"{label} ({meta.stats[kind]['oid'][:12]})")
        access.sources[kind] = files
        res.used[kind] = used
    if absent:
        who = "; ".join(f"{label} has no {kind} statistics" for label, kind in absent)
        if missing and missing != "error":
            fallback = strategies.get(missing)
            if fallback({}, len(metas)).stat_kinds():
                raise UsageError(f"theta.merge.missingStats = {missing}: the fallback must be a data-free strategy "
                                 "(e.g. average, task_arithmetic, ties)")
            res.fallback = f"{who}: merged with {missing} instead of {options.strategy} (theta.merge.missingStats)"
            res.strategy, res.params = missing, {}
            for kind in kinds:
                access.sources.pop(kind, None)
            return res
        from gittheta_merge.stats.attach import COMPUTE_HINT

        first_label, first_kind = absent[0]
        raise MissingError(
            f"{path}: {who}. Compute them on that branch: `git checkout {first_label.split(' ')[0]} && "
            f"{COMPUTE_HINT.format(path=path, kind=first_kind)} && git commit`, then merge again; or pass them "
            f"as files (--stats {first_kind}=FILE,FILE), or choose "
            "a fallback: `git config theta.merge.missingStats average` (or missing_stats in .gittheta.toml)")
    return res


def model_counts(access: StatsAccess, kind: str, n: int) -> list[int]:
    """How many original models each input stands for, from derived statistics (1 for plain ones)."""
    srcs = access.sources.get(kind, [])
    return [int(getattr(srcs[i], "merged_models", 1)) if i < len(srcs) and srcs[i] is not None else 1
            for i in range(n)]


def derive_statistics(merged: Any, metas: list[Any], labels: list[str], plan: Any, access: StatsAccess,
                      strategy: Any, store: Any) -> dict[str, Any] | None:
    """Attach to `merged` the summed statistic of a RegMean / Fisher merge; returns its stats entry or None.

    RegMean: sum_i M c_i G_i (the raw Grams; the alpha shrink is linear, so shrinking the sum equals summing
    the shrunk). Fisher: sum_i c_i' F~_i with the floors the merge applied (c_i' includes the global
    normalisation if on; the sum is then not exact for a later merge, which renormalises). Token / example
    counts are summed. Exactness fails for tensors one side kept as is (one-sided changes): they are listed.
    """
    kind = DERIVABLE.get(strategy.name)
    if kind is None or not access.has_kind(kind):
        return None  # before importing torch: a merge on the numpy path never needs it
    import torch

    from gittheta_merge import dtypes
    from gittheta_merge.merge.sinks import SafetensorsSink
    from gittheta_merge.stats.blobs import FORMAT, METADATA_KEY

    files = access.sources.get(kind, [])
    if len(files) != len(metas) or any(not isinstance(f, StatFile) for f in files):
        return None  # plain tensors without names/provenance: nothing sound to derive from
    n = len(files)
    counts_in = model_counts(access, kind, n)
    if kind == "gram":
        coeffs = [n * c for c in strategy.coefficients()]
        floor = None
    else:
        coeffs = [c / nm for c, nm in zip(strategy.model_weights(), strategy.norms)]
        floor = strategy.params["floor"]
    infos = []  # the keys every input has, with one shape
    for k in files[0].keys():
        found = [f.info(k) for f in files]
        if all(i is not None for i in found) and len({i.shape for i in found}) == 1:  # type: ignore[union-attr]
            infos.append(found[0])
    keys = [i.name for i in infos]  # type: ignore[union-attr]
    if not keys:
        return None
    prov0 = files[0].provenance
    counts: dict[str, int] = {}
    for k in keys:
        total = 0
        for f in files:
            c = (f.provenance.get("counts") or {}).get(f.resolve(k) or "")
            total += int(c) if isinstance(c, (int, float)) else 0
        counts[k] = total
    sharing = {w: key for w, key in files[0].sharing.items() if key in counts}
    stat_names = set(keys) | set(sharing)
    inexact = sorted(tp.name for tp in plan.tensors if tp.name in stat_names and tp.action == "keep"
                     and tp.source is not None and tp.source >= 0)
    exact = not inexact and not (kind in ("fisher", "gram") and strategy.params.get("normalize"))
    provenance: dict[str, Any] = {
        "derived": "sum",
        "kind": kind,
        "merged_by": strategy.name,
        "coefficients": coeffs,
        "inputs": [{"label": lab, "oid": m.stats.get(kind, {}).get("oid"),
                    "merged_models": c} for lab, m, c in zip(labels, metas, counts_in)],
        "merged_models": sum(counts_in),
        "counts": counts,
        "sharing": sharing,
        "exact": exact,
    }
    if floor is not None:
        provenance["floor"] = {"value": floor, "favor_target": strategy.params["favor_target"]}
    if inexact:
        provenance["inexact_tensors"] = inexact[:50]
        provenance["inexact_reason"] = "kept from one side (one-sided change), not merged with these statistics"
    for key in ("n_examples", "tokens"):
        vals = [f.provenance.get(key) for f in files]
        if all(isinstance(v, (int, float)) for v in vals):
            provenance[key] = sum(vals)  # type: ignore[arg-type]
    for key in ("task", "label_policy", "masking", "normalisation", "diagonal_only"):
        if key in prov0:
            provenance[key] = prov0[key]
    meta_text = {"format": FORMAT, "kind": kind,
                 METADATA_KEY: json.dumps(provenance, sort_keys=True, separators=(",", ":"))}
    store.tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=store.tmp_dir, prefix="derived-stats-", suffix=".safetensors")
    os.close(fd)
    sink = SafetensorsSink(tmp, meta_text)
    try:
        sink.start(infos)  # type: ignore[arg-type]
        for info in infos:
            assert info is not None
            total = None
            for i, (f, c) in enumerate(zip(files, coeffs)):
                t = f.read_rows(info.name, 0, info.rows).to(torch.float64)
                if floor is not None and (i == 0 or not strategy.params["favor_target"]):
                    t = torch.clamp(t, min=floor)
                total = c * t if total is None else total + c * t
            sink.write(total.to(dtypes.to_torch(info.dtype)))  # type: ignore[union-attr]
        sink.finish()
        size = os.path.getsize(sink.path)
        with open(sink.path, "rb") as fh:
            oid, _ = store.put_stream(fh, size)
    finally:
        sink.abort()
        if os.path.exists(tmp):
            os.unlink(tmp)
    summary = {k: provenance[k] for k in ("derived", "merged_by", "merged_models", "exact", "n_examples", "tokens")
               if k in provenance}
    entry = {"oid": oid, "size": size, "weights": merged.weights_digest(), "provenance": summary}
    merged.extra["stats"] = {kind: entry}
    return entry
