"""Statistic blobs versioned next to the weights they were computed on.

A statistic (Fisher diagonal, Gram matrices, K-FAC factors) is a safetensors file keyed by weight name,
stored as an object in the same store as the tensors. The checkpoint's own metadata file references it
under "stats" together with the digest of the exact weights it describes, so:
- a merge driver handed ours/theirs metadata finds both sides' statistics with no extra lookup;
- push/fetch/clone/gc move and keep them like tensors (the object walk is generic over oids);
- once the weights change (`git add` of new weights keeps the reference, see filter.carry_over_stats),
  the recorded digest no longer matches and the statistics are reported stale; merges refuse them
  unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gittheta_merge.errors import InputError, MissingError, UsageError
from gittheta_merge.stats.blobs import blob_header, provenance_in
from gittheta_merge.storage.gitutil import Repo
from gittheta_merge.storage.metadata import Metadata
from gittheta_merge.storage.revisions import INDEX, read_metadata
from gittheta_merge.storage.store import ObjectStore

COMPUTE_HINT = "git theta stats compute {path} --kind {kind} --data DATA.jsonl"


@dataclass
class StatInfo:
    """One attached statistic, as `git theta stats ls` shows it."""

    path: str
    kind: str
    oid: str
    size: int
    stale: bool
    provenance: dict[str, Any]


def check_staged(repo: Repo, path: str) -> None:
    """Statistics must describe exactly the staged weights: refuse while the file has unstaged changes."""
    if repo.git("diff", "--name-only", "--", path).strip():
        raise UsageError(f"{path} has changes that are not staged: `git add {path}` first, so the statistics "
                         "are tied to the exact weights they were computed on")


def attach(repo: Repo, paths: Iterable[str], kind: str, blob: Path, provenance: dict[str, Any],
           blob_where: str = "statistics") -> Iterator[StatInfo]:
    """Reference a statistic blob (a safetensors file) from the staged metadata of each path (one StatInfo per
    path, as it is staged). The blob is streamed, never held in memory; it is validated once and stored
    (hashed) once, however many checkpoints share it."""
    if not kind or not kind.replace("_", "").replace("-", "").isalnum():
        raise UsageError(f"invalid statistics kind {kind!r}")
    size = blob.stat().st_size
    with open(blob, "rb") as fh:
        tensor_names, file_meta = blob_header(fh, size, blob_where)
    names = set(tensor_names) | set(provenance_in(file_meta).get("sharing") or {})
    oid = ""
    for path in paths:
        meta = read_metadata(repo, INDEX, path)
        if meta is None:
            raise UsageError(f"{path} is not a tracked checkpoint in the index: `git theta track` and `git add` it "
                             "first")
        check_staged(repo, path)
        if not names & {t.name for t in meta.tensors}:
            raise InputError(f"{blob_where}: none of its tensor names matches a tensor of {path} "
                             "(statistics are keyed by weight name)")
        if not oid:
            with open(blob, "rb") as fh:
                oid, _ = ObjectStore.for_repo(repo).put_stream(fh, size)
        entry = {"oid": oid, "size": size, "weights": meta.weights_digest(), "provenance": provenance}
        stats = dict(meta.stats)
        stats[kind] = entry
        meta.extra["stats"] = dict(sorted(stats.items()))
        _stage(repo, path, meta)
        yield StatInfo(path, kind, oid, size, False, provenance)


def detach(repo: Repo, path: str, kind: str) -> None:
    meta = read_metadata(repo, INDEX, path)
    if meta is None or kind not in meta.stats:
        raise MissingError(f"{path} has no {kind} statistics staged")
    stats = dict(meta.stats)
    del stats[kind]
    if stats:
        meta.extra["stats"] = stats
    else:
        meta.extra.pop("stats", None)
    _stage(repo, path, meta)


def _stage(repo: Repo, path: str, meta: Metadata) -> None:
    blob_id = repo.git("hash-object", "-w", "--stdin", input=meta.to_bytes()).decode().strip()
    mode = repo.git("ls-files", "-s", "--", path).decode().split()[0]
    repo.git("update-index", "--cacheinfo", f"{mode},{blob_id},{path}")


def is_stale(meta: Metadata, kind: str) -> bool:
    return meta.stats.get(kind, {}).get("weights") != meta.weights_digest()


def list_stats(path: str, meta: Metadata) -> list[StatInfo]:
    digest = meta.weights_digest()  # what is_stale compares with, computed once for every kind
    return [StatInfo(path, kind, str(entry.get("oid", "")), int(entry.get("size", 0)), entry.get("weights") != digest,
                     entry.get("provenance") or {})
            for kind, entry in meta.stats.items() if isinstance(entry, dict)]


def blob_path(store: ObjectStore, meta: Metadata, kind: str, where: str, allow_stale: bool = False) -> Path:
    """The on-disk safetensors file of an attached statistic, for lazy per-tensor reads in a merge."""
    entry = meta.stats.get(kind)
    if not isinstance(entry, dict) or "oid" not in entry:
        raise MissingError(f"{where} has no {kind} statistics; compute them on that branch with "
                         + COMPUTE_HINT.format(path=where.split(' ')[0], kind=kind)
                         + " and commit, or choose a data-free strategy")
    if is_stale(meta, kind) and not allow_stale:
        raise InputError(f"{where}: the {kind} statistics were computed on different weights (stale); "
                         "recompute them, or pass --allow-stale-stats to use them anyway")
    size = entry.get("size")
    if not isinstance(size, int):
        raise InputError(f"{where}: invalid {kind} statistics entry")
    oid = entry["oid"]
    if not store.has(oid):
        raise MissingError(f"{where}: the {kind} statistics object is not local; run `git theta pull-objects`")
    with store.open(oid, size, f"{where}: {kind} statistics: "):
        pass
    return store.path(oid)


def describe(info: StatInfo) -> str:
    prov = info.provenance
    bits = [f"{k}={prov[k]}" for k in ("task", "n_examples", "tokens", "label_policy", "dtype") if k in prov]
    state = "STALE" if info.stale else "fresh"
    return f"{info.path}  {info.kind:8s} {state:5s}  {info.size / 1e6:,.1f} MB  {info.oid[:12]}  {' '.join(bits)}"


def provenance_from_blob(blob: Path, where: str = "statistics") -> dict[str, Any]:
    """The provenance recorded in a statistic blob (a validated safetensors file; its header only), {} if none."""
    with open(blob, "rb") as fh:
        return provenance_in(blob_header(fh, blob.stat().st_size, where)[1])
