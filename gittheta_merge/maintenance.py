"""Walking the metadata files git holds, and the store maintenance built on it: fsck and gc.

What is reachable is derived from git itself (all refs, reflogs, the index), never from a local
side-record, so it is right after clones, rebases, merges and force-pushes. The walk is generic over
every oid a metadata file references (tensors today, statistic blobs later) and also keeps objects of
plain git-lfs pointer files, which share the store.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from gittheta_merge.errors import ThetaError
from gittheta_merge.gitutil import CatFile, Repo
from gittheta_merge.metadata import MAX_METADATA_BYTES, Metadata, is_metadata
from gittheta_merge.progress import Progress
from gittheta_merge.store import ObjectStore

_LFS_POINTER = re.compile(rb"^version https://git-lfs\.github\.com/spec/v1\noid sha256:([0-9a-f]{64})\n", re.M)


@dataclass
class Reference:
    """Where a git blob that references objects was found (for error messages)."""

    blob: str
    path: str
    meta: Metadata | None = None
    lfs_oid: str | None = None


def iter_referencing_blobs(repo: Repo, rev_args: list[str]) -> Iterator[Reference]:
    """Every metadata file / git-lfs pointer reachable from `git rev-list --objects <rev_args>`."""
    lister = subprocess.Popen(
        ["git", "rev-list", "--objects", f"--filter=blob:limit={MAX_METADATA_BYTES}", *rev_args],
        cwd=repo.root, stdout=subprocess.PIPE,
    )
    checker = subprocess.run(
        ["git", "cat-file", "--batch-check=%(objecttype) %(objectname) %(objectsize) %(rest)"],
        cwd=repo.root, stdin=lister.stdout, capture_output=True, check=False,
    )
    lister.wait()
    if lister.returncode != 0:
        raise ThetaError(f"git rev-list {' '.join(rev_args)} failed")
    seen: set[str] = set()
    candidates: list[tuple[str, str]] = []
    for line in checker.stdout.decode(errors="replace").splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 3 or parts[0] != "blob" or parts[1] in seen:
            continue
        seen.add(parts[1])
        if int(parts[2]) <= MAX_METADATA_BYTES:
            candidates.append((parts[1], parts[3] if len(parts) > 3 else ""))
    with CatFile(repo) as cat:
        for blob, path in candidates:
            got = cat.read(blob)
            if got is None:
                continue
            data = got[1]
            if is_metadata(data[:64]):
                yield Reference(blob, path, meta=Metadata.from_bytes(data, f"{path} (blob {blob[:10]})"))
            elif data.startswith(b"version https://git-lfs"):
                match = _LFS_POINTER.search(data)
                if match:
                    yield Reference(blob, path, lfs_oid=match.group(1).decode())


def all_history_args() -> list[str]:
    return ["--all", "--reflog", "--indexed-objects"]


def reachable_oids(repo: Repo, rev_args: list[str] | None = None) -> dict[str, str]:
    """oid → a description of one place that needs it, over `rev_args` (default: all history)."""
    needed: dict[str, str] = {}
    for ref in iter_referencing_blobs(repo, rev_args or all_history_args()):
        if ref.meta is not None:
            for oid, _, what in ref.meta.iter_objects():
                needed.setdefault(oid, f"{ref.path}: {what}" if what else ref.path)
            for oid in ref.meta.iter_oids():  # unsized oid-valued extras, if any
                needed.setdefault(oid, ref.path)
        elif ref.lfs_oid:
            needed.setdefault(ref.lfs_oid, f"{ref.path} (git-lfs file)")
    return needed


@dataclass
class FsckReport:
    checked: int = 0
    corrupt: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)  # needed, not local, not on any remote-tracking ref
    not_downloaded: dict[str, str] = field(default_factory=dict)  # needed by commits a remote has

    @property
    def ok(self) -> bool:
        """Objects not downloaded yet are no fault: a clone fetches a commit's objects when it is checked out."""
        return not self.corrupt and not self.missing


def fsck(repo: Repo, store: ObjectStore | None = None) -> FsckReport:
    """Re-hash every stored object and check every reachable reference has its object.

    An absent object that a commit on a remote-tracking branch needs is reported as not downloaded, not as
    missing: a clone downloads objects lazily (on checkout, or `git theta pull-objects`), and the pre-push
    hook uploaded them with those commits. It is checked against what this clone knows of the remote, not
    over the network."""
    store = store or ObjectStore.for_repo(repo)
    report = FsckReport()
    sizes = {oid: store.size(oid) for oid in store.iter_oids()}
    bar = Progress("git-theta fsck", len(sizes), sum(sizes.values()))
    done = 0
    for oid, size in sizes.items():
        if not store.verify(oid):
            report.corrupt.append(oid)
        report.checked += 1
        done += size
        bar.update(report.checked, done)
    bar.close()
    absent = {oid: where for oid, where in reachable_oids(repo).items() if not store.has(oid)}
    on_remotes = reachable_oids(repo, ["--remotes"]) if absent else {}
    for oid, where in absent.items():
        if oid in on_remotes:
            report.not_downloaded[oid] = on_remotes[oid]
        else:
            report.missing[oid] = where
    return report


@dataclass
class GcReport:
    kept: int = 0
    removed: int = 0
    removed_bytes: int = 0
    spared_recent: int = 0


def gc(repo: Repo, store: ObjectStore | None = None, grace_seconds: float = 3600,
       dry_run: bool = False) -> GcReport:
    """Delete objects nothing in history, the reflogs or the index refers to.

    Objects younger than the grace period are kept: a concurrent `git add` may have written them
    before the index that will reference them.
    """
    store = store or ObjectStore.for_repo(repo)
    needed = reachable_oids(repo)
    report = GcReport()
    cutoff = time.time() - grace_seconds
    for oid in list(store.iter_oids()):
        if oid in needed:
            report.kept += 1
            continue
        path = store.path(oid)
        stat = path.stat()
        if stat.st_mtime > cutoff:
            report.spared_recent += 1
            continue
        report.removed += 1
        report.removed_bytes += stat.st_size
        if not dry_run:
            store.delete(oid)
    if not dry_run:
        store.clean_tmp(grace_seconds)
    return report
