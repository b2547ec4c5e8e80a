"""Walking the metadata files git holds, and the store maintenance built on it: fsck and gc.

What is reachable is derived from git itself (all refs, reflogs, the index), never from a local
side-record, so it is right after clones, rebases, merges and force-pushes. The walk is generic over
every oid a metadata file references (tensors today, statistic blobs later) and also keeps objects of
plain git-lfs pointer files, which share the store.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gittheta_merge.errors import ThetaError
from gittheta_merge.progress import Progress
from gittheta_merge.storage.gitutil import CatFile, Repo
from gittheta_merge.storage.metadata import MAX_METADATA_BYTES, Metadata, is_metadata
from gittheta_merge.storage.store import ObjectStore

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
    spared_pending: int = 0  # written by a running command (or for a git that has not written its index yet)
    tmp_removed: int = 0  # temp files of killed writers
    tmp_bytes: int = 0


def gc(repo: Repo, store: ObjectStore | None = None, grace_seconds: float = 3600,
       dry_run: bool = False, wait: bool = True) -> GcReport:
    """Delete objects nothing in history, the reflogs or the index refers to, and temp files of killed writers.

    Runs under the store's exclusive lock (storelock.GcLock): writers of objects finish first (or, with
    wait=False, gc refuses and names them), and objects a writer handed to a git that has not yet written its
    index are spared. Objects younger than the grace period are kept too (a writer without the lock: an older
    version of this tool, or a filesystem without flock).
    """
    from gittheta_merge.storage.storelock import GcLock

    store = store or ObjectStore.for_repo(repo)
    report = GcReport()
    with GcLock(store.lfs_dir, wait=wait) as lock:
        needed = reachable_oids(repo)
        cutoff = time.time() - grace_seconds
        for oid in list(store.iter_oids()):
            if oid in needed:
                report.kept += 1
                continue
            if oid in lock.protected:
                report.spared_pending += 1
                continue
            try:
                stat = store.path(oid).stat()
            except FileNotFoundError:
                continue
            if stat.st_mtime > cutoff:
                report.spared_recent += 1
                continue
            report.removed += 1
            report.removed_bytes += stat.st_size
            if not dry_run:
                store.delete(oid)
        for folder in (store.tmp_dir, repo.common_dir / "theta" / "tmp"):  # objects' and the filter's scratch
            count, size = remove_stale_temp(folder, grace_seconds, dry_run)
            report.tmp_removed += count
            report.tmp_bytes += size
    return report


TEMP_PREFIXES = ("theta-", "derived-stats-", "stats-")  # how our writers name their temp files and folders


def remove_stale_temp(folder: Path, older_than_s: float, dry_run: bool = False) -> tuple[int, int]:
    """Remove temp files and folders our killed writers left; returns (count, bytes). git-lfs's own temp files
    (in lfs/tmp too) are left to git-lfs. Called under gc's lock, so no writer of ours is mid-file; the age
    limit still protects a writer that runs without the lock (an older version, a filesystem without flock)."""
    if not folder.is_dir():
        return 0, 0
    cutoff = time.time() - older_than_s
    removed = size = 0
    for entry in folder.iterdir():
        if not entry.name.startswith(TEMP_PREFIXES):
            continue
        try:
            stat = entry.lstat()
        except FileNotFoundError:
            continue
        if older_than_s > 0 and stat.st_mtime >= cutoff:
            continue
        if entry.is_dir() and not entry.is_symlink():
            size += sum(p.lstat().st_size for p in entry.rglob("*") if p.is_file())
            if not dry_run:
                shutil.rmtree(entry, ignore_errors=True)
        else:
            size += stat.st_size
            if not dry_run:
                entry.unlink(missing_ok=True)
        removed += 1
    return removed, size
