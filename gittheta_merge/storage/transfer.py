"""Moving objects to and from remotes, with git-lfs as the transport.

git-lfs is what the Hugging Face Hub, GitHub and GitLab speak, and our objects already sit in its
local layout, so we reuse it in batches instead of reimplementing its protocols:
- upload: `git lfs push --object-id <remote> <oid>…` (a few hundred oids per process);
- download: we write a throwaway tree of git-lfs pointer files naming the missing oids and run
  `git lfs fetch <remote> <that commit>` once, which downloads them in one batch.
What to push is derived from the commits being pushed (the metadata files git can reach from them),
never from a local side-record, so it works after `git merge`, in fresh clones, for force-pushes and
several refs at once. Every object received is re-hashed before use.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gittheta_merge.errors import MissingError, ThetaError, UsageError, require_space
from gittheta_merge.storage.gitutil import Repo
from gittheta_merge.storage.maintenance import iter_referencing_blobs
from gittheta_merge.storage.metadata import Metadata
from gittheta_merge.storage.store import CorruptObject, ObjectStore

ZERO = "0" * 40
PUSH_BATCH = 400
LFS_MISSING = (
    "git-lfs is not installed, and tensor objects travel over git-lfs. Install it "
    "(Debian/Ubuntu: apt-get install git-lfs; macOS: brew install git-lfs; others: https://git-lfs.com), "
    "then retry. Local work does not need it"
)
# what git-lfs prints when the LFS server refuses who we are (HTTP 401/403): the fix is the user's credentials
AUTH_REFUSED = ("401", "403", "Authentication required", "Authorization error", "Forbidden", "credentials for")


def run_lfs(repo: Repo, args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `git lfs ARGS…` with its messages (and progress bar) passed through to our stderr as they come, and
    return (exit code, the last of those messages) so a failure can be explained in one line."""
    proc = subprocess.Popen(["git", "lfs", *args], cwd=repo.root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    assert proc.stderr is not None
    tail = b""
    out = getattr(sys.stderr, "buffer", None)
    while chunk := proc.stderr.read1(65536):  # type: ignore[attr-defined]
        if out is not None:
            out.write(chunk)
            out.flush()
        tail = (tail + chunk)[-16384:]
    return proc.wait(), tail.decode(errors="replace")


def lfs_failure(action: str, remote: str, rc: int, messages: str) -> ThetaError:
    """One line for a failed git-lfs transfer: the server refusing our credentials (a UsageError) names that fix."""
    if any(marker in messages for marker in AUTH_REFUSED):
        return UsageError(f"{action} {remote}: the LFS server refused the credentials (git lfs exited {rc}). "
                          f"Check the token or password for its URL (git config lfs.url / remote.{remote}.lfsurl, "
                          "or your git credential helper), then retry")
    return ThetaError(f"{action} {remote} failed (git lfs exited {rc}); see the messages above")


def has_git_lfs() -> bool:
    return shutil.which("git-lfs") is not None


def require_git_lfs() -> None:
    if not has_git_lfs():
        raise UsageError(LFS_MISSING)


def default_remote(repo: Repo) -> str:
    """lfs.remote / theta.remote, the current branch's remote, or the only/`origin` remote."""
    for key in ("theta.remote", "lfs.remote"):
        value = repo.config_get(key)
        if value:
            return value
    branch = repo.git("symbolic-ref", "-q", "--short", "HEAD", check=False).decode().strip()
    if branch:
        value = repo.config_get(f"branch.{branch}.remote")
        if value:
            return value
    remotes = repo.git("remote").decode().split()
    if "origin" in remotes:
        return "origin"
    if len(remotes) == 1:
        return remotes[0]
    raise UsageError("no remote to fetch tensor objects from: add one (git remote add origin URL) "
                     "or set git config theta.remote NAME")


@dataclass
class Needed:
    """An object some metadata file needs, and where (for error messages)."""

    oid: str
    size: int
    where: str


def needs_of(meta: Metadata, where: str, suffix: str = "") -> Iterator[Needed]:
    """The objects one metadata file needs, labelled for error messages ("path: tensor 'x' at rev")."""
    for oid, size, what in meta.iter_objects():
        yield Needed(oid, size, f"{where}: {what}{suffix}" if what else f"{where}{suffix}")


def needed_objects(repo: Repo, rev_args: list[str]) -> dict[str, Needed]:
    """Objects referenced by the metadata files reachable through `git rev-list <rev_args>`."""
    out: dict[str, Needed] = {}
    for ref in iter_referencing_blobs(repo, rev_args):
        if ref.meta is not None:
            for need in needs_of(ref.meta, ref.path):
                out.setdefault(need.oid, need)
    return out


def _exists(repo: Repo, sha: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{sha}^{{commit}}"], cwd=repo.root,
                          capture_output=True).returncode == 0


def objects_to_push(repo: Repo, remote: str, updates: list[tuple[str, str, str, str]]) -> dict[str, Needed]:
    """Objects referenced by commits being pushed that the remote's known refs do not already reach."""
    include = [local for _, local, _, _ in updates if local != ZERO]
    if not include:
        return {}
    exclude = [remote_sha for _, _, _, remote_sha in updates if remote_sha != ZERO and _exists(repo, remote_sha)]
    args = [*include, "--not", *exclude]
    if not remote.startswith(("/", ".")) and "://" not in remote and ":" not in remote:
        args.append(f"--remotes={remote}")
    return needed_objects(repo, args)


def push_objects(repo: Repo, remote: str, oids: list[str]) -> int:
    """Upload objects with git-lfs in batches; returns how many were offered."""
    if not oids:
        return 0
    require_git_lfs()
    store = ObjectStore.for_repo(repo)
    missing = [o for o in oids if not store.has(o)]
    if missing:
        raise MissingError(
            f"cannot push: {len(missing)} tensor object(s) referenced by the pushed commits are not in the "
            f"local store (e.g. {missing[0][:12]}…); run `git theta pull-objects` first, or `git theta fsck`"
        )
    for start in range(0, len(oids), PUSH_BATCH):
        batch = oids[start : start + PUSH_BATCH]
        rc, messages = run_lfs(repo, ["push", "--object-id", remote, *batch])
        if rc != 0:
            raise lfs_failure("uploading tensor objects to", remote, rc, messages)
    return len(oids)


def fetch_objects(repo: Repo, wanted: list[Needed], remote: str | None = None, context: str = "") -> int:
    """Download missing objects in one git-lfs batch and verify each by hash; returns how many."""
    store = ObjectStore.for_repo(repo)
    missing = [n for n in wanted if not store.has(n.oid)]
    if not missing:
        return 0
    require_git_lfs()
    remote = remote or default_remote(repo)
    with store.guard.session(eager=True):  # gc waits while git-lfs writes objects and we verify them
        return _fetch(repo, store, missing, remote, context)


def _fetch(repo: Repo, store: ObjectStore, missing: list[Needed], remote: str, context: str) -> int:
    require_space(store.lfs_dir, sum(n.size for n in missing), f"downloading {len(missing)} object(s) from {remote}")
    for need in missing:
        store.guard.record(need.oid)
    with tempfile.TemporaryDirectory(prefix="theta-fetch-") as tmp:
        paths = []
        for i, need in enumerate(missing):
            path = Path(tmp) / str(i)
            path.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{need.oid}\nsize {need.size}\n")
            paths.append(str(path))
        blobs = repo.git("hash-object", "-w", "--stdin-paths", input="\n".join(paths).encode()).decode().split()
    tree_input = "".join(f"100644 blob {blob}\t{i}\n" for i, blob in enumerate(blobs))
    tree = repo.git("mktree", input=tree_input.encode()).decode().strip()
    identity = {f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
                for what, value in (("NAME", "gittheta-merge"), ("EMAIL", "gittheta-merge@localhost"),
                                    ("DATE", "1970-01-01T00:00:00Z"))}  # works with no user identity set
    commit = repo.git("commit-tree", tree, "-m", "gittheta-merge object fetch", env=identity).decode().strip()
    env = {**os.environ, "GIT_TERMINAL_PROMPT": os.environ.get("GIT_TERMINAL_PROMPT", "0")}
    total = sum(n.size for n in missing)
    sys.stderr.write(f"git-theta: downloading {len(missing)} tensor object(s), {total / 1e6:,.1f} MB "
                     f"from {remote}\n")
    rc, messages = run_lfs(repo, ["fetch", remote, commit], env)  # git-lfs draws its own progress bar
    fetched = 0
    problems: list[str] = []
    for need in missing:
        if not store.has(need.oid):
            problems.append(f"missing on {remote}: {need.where} (object {need.oid[:12]}…){context}")
            continue
        if not store.verify(need.oid):
            store.delete(need.oid)
            raise CorruptObject(
                f"object {need.oid[:12]}… received from {remote} is corrupt (sha256 mismatch): "
                f"{need.where}{context}. The remote's copy is damaged; re-push it from a clone that has it"
            )
        fetched += 1
    if problems:
        if rc and any(marker in messages for marker in AUTH_REFUSED):
            raise lfs_failure("downloading tensor objects from", remote, rc, messages)
        hint = f" (git lfs fetch exited {rc}; see its messages above)" if rc else ""
        raise MissingError(f"{len(problems)} object(s) could not be fetched{hint}:\n  " + "\n  ".join(problems[:10]))
    return fetched


def pre_push(repo: Repo, remote: str, url: str, stdin_data: bytes) -> int:
    """The pre-push hook: upload our objects, then chain to a saved local hook and to git-lfs."""
    updates = []
    for line in stdin_data.decode().splitlines():
        parts = line.split()
        if len(parts) == 4:
            updates.append((parts[0], parts[1], parts[2], parts[3]))
    needed = objects_to_push(repo, remote, updates)
    if needed:
        target = remote if remote else url
        sys.stderr.write(f"git-theta: uploading {len(needed)} tensor object(s) to {target}\n")
        push_objects(repo, target, sorted(needed))
    from gittheta_merge.storage.tracking import hooks_dir

    local = hooks_dir(repo) / "pre-push.local"
    if local.exists() and os.access(local, os.X_OK):
        rc = subprocess.run([str(local), remote, url], cwd=repo.root, input=stdin_data).returncode
        if rc != 0:
            return rc
    if has_git_lfs():
        rc = subprocess.run(["git", "lfs", "pre-push", remote, url], cwd=repo.root, input=stdin_data).returncode
        if rc != 0:
            return rc
    return 0
