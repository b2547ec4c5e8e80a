"""`torchrun … -m gittheta_merge merge A B C`: one merge split over the ranks of a torchrun job.

Every rank plans the same merge from metadata (deterministic), then produces only its share of the tensors: the
tensors to merge are dealt out by bytes (largest first, each to the least-loaded rank), so each rank reads only its
tensors' objects. Whole-model quantities (TIES' per-task thresholds and majority sign) come from integer histograms
and counts added with all_reduce, so every rank finds exactly the values one process finds and each tensor is
merged by the same code on the same inputs: the merged metadata (and every object) is byte-identical to a
single-process merge. Rank 0 gathers the tensor entries (oids) as JSON, writes the metadata and makes the merge
commit; the others only write objects.

Storage layouts, detected at start (rank 0 leaves a probe file in its object store; who sees it shares it):
- shared: one repository on a shared filesystem (or one machine): every rank writes its objects into it;
- share nothing but the git-lfs remote: each rank has its own clone; a rank fetches exactly the objects its tensors
  need, and the other ranks upload the objects they made (`git lfs push --object-id`) before rank 0 commits, so
  the merge commit's objects are on the remote when it exists (rank 0's own objects travel with its next push).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gittheta_merge.distributed import Group, RankFailed
from gittheta_merge.merge.plan import MergePlan, MergeResult
from gittheta_merge.storage.metadata import Metadata, TensorEntry


def balance(plan: MergePlan, world: int, models: list[Any], base: Any = None) -> dict[str, int]:
    """Owner rank of every output that reads data: merged tensors, and kept ones converted to another dtype (whose
    bytes are copied). Largest first to the least-loaded rank (ties: the lower rank), so the ranks' bytes differ by
    at most one tensor. Outputs that read nothing (a kept tensor reuses its oids) belong to rank 0."""
    work = []
    for i, tp in enumerate(plan.outputs):
        assert tp.info is not None
        if tp.action == "merge":
            work.append((tp.info.nbytes * (plan.n_models + 1), i, tp.name))
        elif tp.source is not None:
            src = base if tp.source == -1 else models[tp.source]
            if src is not None and src.info(tp.name).dtype != tp.info.dtype:
                work.append((tp.info.nbytes, i, tp.name))
    load = [0] * world
    owner: dict[str, int] = {}
    for size, _, name in sorted(work, key=lambda w: (-w[0], w[1])):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += size
    return owner


class Part:
    """This rank's share of one merge (see the module docstring); handed to the engine as `part`, which calls
    `start` with the plan, then `owns` per tensor and `reduce_pass` per whole-model pass."""

    def __init__(self, group: Group, shared: bool, repo: Any = None, remote: str | None = None) -> None:
        self.group = group
        self.rank = group.rank
        self.shared = shared
        self.repo = repo  # this rank's repository (sharing nothing: its own clone) and the remote objects travel by
        self.remote = remote
        self.owner: dict[str, int] = {}
        self.started = time.monotonic()

    def start(self, plan: MergePlan, models: list[Any], base: Any) -> None:
        """Deal out the tensors; sharing nothing, fetch exactly the objects this rank's tensors read."""
        self.owner = balance(plan, self.group.world, models, base)
        if self.shared:
            return
        from gittheta_merge.storage.transfer import Needed, fetch_objects

        wanted: dict[str, Needed] = {}
        for name, rank in self.owner.items():
            if rank != self.rank:
                continue
            for src in [*models, *([base] if base is not None else [])]:
                if src.info(name) is None:
                    continue
                entry = src.entry(name)
                for (oid, _), size in zip(entry.blocks, entry.block_sizes()):
                    wanted.setdefault(oid, Needed(oid, size, f"{src.label}tensor {name!r}"))
        fetch_objects(self.repo, list(wanted.values()), self.remote, context=f" (rank {self.rank}'s share)")

    def owns(self, name: str) -> bool:
        return self.owner.get(name, 0) == self.rank

    def reduce_pass(self, strat: Any, index: int) -> None:
        strat.reduce_pass(index, self.group.all_reduce_)

    @contextmanager
    def peer_failures(self) -> Iterator[None]:
        """A collective broken by another rank's death (gloo/nccl report a closed connection or a timeout) becomes
        one line saying so; that rank's own error is printed above by torchrun."""
        try:
            yield
        except RuntimeError as exc:
            if type(exc).__module__.startswith("torch") or "gloo" in str(exc).lower():
                raise RankFailed(f"rank {self.rank}: another rank of this merge stopped ({str(exc).splitlines()[0]}); "
                                 "nothing was committed") from exc
            raise

    def finish(self, sink: Any, result: MergeResult) -> None:
        """After this rank's share: upload its new objects when the ranks share nothing but the remote (rank 0's
        stay local until its push), then `assemble`."""
        pushed = 0
        if not self.shared and self.rank != 0:
            from gittheta_merge.storage.transfer import push_objects

            oids = sorted({oid for e in sink.entries if e.name in self.owner for oid in e.oids})
            pushed = push_objects(self.repo, self.remote, oids)
        self.assemble(sink, result, pushed)

    def assemble(self, sink: Any, result: MergeResult, pushed: int) -> None:
        """Every rank's tensor entries and report lines gathered (JSON); the sink gets all entries in output order
        and the report the per-tensor rank and a line per rank (tensors, bytes, seconds, objects uploaded)."""
        plan, report = result.plan, result.report
        sizes = {t.name: t.info.nbytes for t in plan.outputs if t.info is not None}
        mine = {
            "entries": [e.to_json() for e in sink.entries],
            "tensors": [t for t in report["tensors"] if t["action"] in {"keep", "merge"}],
            "seconds": round(time.monotonic() - self.started, 6),
            "bytes_read_fp32": report["bytes_read_fp32"],
            "merged_bytes": sum(sizes[t["name"]] for t in report["tensors"] if t["name"] in self.owner),
            "objects_uploaded": pushed,
        }
        everyone = self.group.all_gather_json(mine)
        entries: dict[str, TensorEntry] = {}
        lines: dict[str, dict[str, Any]] = {}
        for rank, part in enumerate(everyone):
            for raw in part["entries"]:
                entry = TensorEntry.from_json(raw, f"rank {rank}'s merged tensors")
                entries[entry.name] = entry
            for line in part["tensors"]:
                lines[line["name"]] = {**line, "rank": rank}
        missing = [t.name for t in plan.outputs if t.name not in entries]
        if missing:
            raise RuntimeError(f"no rank produced {missing[:5]} (internal error)")
        sink.entries = [entries[t.name] for t in plan.outputs]
        others = [t for t in report["tensors"] if t["action"] not in {"keep", "merge"}]
        report["tensors"] = [lines[t.name] for t in plan.outputs] + others
        report["bytes_read_fp32"] = sum(p["bytes_read_fp32"] for p in everyone)
        report["seconds"] = max(p["seconds"] for p in everyone)
        report["ranks"] = [{"rank": r, "tensors": len(p["tensors"]), "merged_bytes": p["merged_bytes"],
                            "bytes_read_fp32": p["bytes_read_fp32"], "seconds": p["seconds"],
                            "objects_uploaded": p["objects_uploaded"]} for r, p in enumerate(everyone)]
        report["storage"] = "shared" if self.shared else "each rank its own clone and the git-lfs remote"


def store_is_shared(group: Group, lfs_dir: Path) -> bool:
    """Whether every rank's object store is rank 0's (one repository on a shared filesystem): rank 0 writes a probe
    file there and every rank looks for it in its own store."""
    token = group.all_gather_json(secrets.token_hex(8) if group.rank == 0 else None)[0]
    probe = lfs_dir / f"theta-probe-{token}"
    if group.rank == 0:
        lfs_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
    group.all_gather_json(None)  # written before anyone looks
    seen = group.all_gather_json(probe.exists())
    if group.rank == 0:
        probe.unlink(missing_ok=True)
    return all(seen)


def rank_summary(report: dict[str, Any]) -> str:
    """One line per rank of a distributed merge, for the command's output."""
    ranks = report.get("ranks")
    if not ranks:
        return ""
    parts = [f"rank {r['rank']}: {r['tensors']} tensors, {r['merged_bytes'] / 1e6:,.1f} MB merged, "
             f"{r['seconds']:.2f} s" + (f", {r['objects_uploaded']} objects uploaded" if r["objects_uploaded"] else "")
             for r in ranks]
    return f"{len(ranks)} ranks ({report.get('storage')}): " + "; ".join(parts)


def fetch_statistics(repo: Any, files: list[dict[str, Metadata]]) -> None:
    """Sharing nothing: the statistic blobs (and stored headers) the merged files carry, fetched from the remote,
    because every rank's planning checks them (their shapes, their staleness)."""
    from gittheta_merge.storage.transfer import Needed, fetch_objects

    wanted: dict[str, Needed] = {}
    for per_path in files:
        for path, meta in per_path.items():
            for oid, size in meta.iter_extra_objects():
                wanted.setdefault(oid, Needed(oid, size, f"{path}: statistics or stored header"))
    fetch_objects(repo, list(wanted.values()))
