"""`git theta gc --prune now` beside commands that store objects loses nothing (issue: a concurrent gc deleted 50
objects of a version being added, and the later checkout deleted the only copy), and gc cleans what killed
commands left. Each command is held at a named pause point (tests/inject/sitecustomize.py), not raced by a timer."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import git, init_repo, pause_env, random_state, store_objects
from safetensors.torch import load_file, save_file

from gittheta_merge.storage.storelock import PENDING_DIR

GIT_THETA = [sys.executable, "-m", "gittheta_merge"]


class Paused:
    """A command started with GITTHETA_TEST_PAUSE; `.pid` is the process waiting at the point."""

    def __init__(self, args: list[str], cwd: Path, point: str, tmp: Path, count: int = 1) -> None:
        self.pidfile = tmp / f"pause-{point}"
        env = pause_env(point, self.pidfile, count)
        self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        deadline = time.monotonic() + 120
        while not self.pidfile.exists():
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise AssertionError(f"{args} ended before {point}: {out.decode()} {err.decode()}")
            assert time.monotonic() < deadline, f"{args} never reached {point}"
            time.sleep(0.02)
        self.pid = int(self.pidfile.read_text())

    def resume(self) -> tuple[int, str]:
        Path(str(self.pidfile) + ".go").touch()
        out, err = self.proc.communicate(timeout=300)
        return self.proc.returncode, out.decode() + err.decode()


def gc_beside(repo: Path, paused: Paused) -> str:
    """gc --no-wait refuses and names the writer; a waiting gc runs once the writer is done; returns its output."""
    refused = subprocess.run(GIT_THETA + ["gc", "--prune", "now", "--no-wait"], cwd=repo, capture_output=True,
                             text=True)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"pid {paused.pid}" in refused.stderr and "gc did nothing" in refused.stderr
    assert "Traceback" not in refused.stderr
    waiting = subprocess.Popen(GIT_THETA + ["gc", "--prune", "now"], cwd=repo, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _blocked_on_flock(waiting.pid):  # the waiting gc really waits on the lock while the writer is held
        assert waiting.poll() is None, waiting.communicate()
        assert time.monotonic() < deadline, "gc never waited for the lock"
        time.sleep(0.02)
    rc, out = paused.resume()
    assert rc == 0, out
    gc_out, gc_err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, gc_out + gc_err
    assert f"pid {paused.pid}" in gc_err  # "gc is waiting for git-theta … (pid N) to finish"
    return gc_out


def _blocked_on_flock(pid: int) -> bool:
    """/proc/locks lists a process waiting for a lock with '->' before the entry."""
    return any(line.split()[1:2] == ["->"] and line.split()[5] == str(pid)
               for line in Path("/proc/locks").read_text().splitlines() if len(line.split()) > 5)


def assert_all_objects_there(repo: Path) -> None:
    proc = git(repo, "theta", "fsck", check=False)
    assert proc.returncode == 0 and ", 0 missing" in proc.stdout.decode(), proc.stdout.decode()


pytestmark = pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux /proc/locks to see gc wait")


def test_gc_during_git_add_keeps_the_version_being_added(repo: Path, tmp_path: Path) -> None:
    v1, v2 = random_state(6, seed=1), random_state(6, seed=2)
    git(repo, "theta", "track", "model.safetensors")
    save_file(v1, repo / "model.safetensors")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "v1")
    save_file(v2, repo / "model.safetensors")
    want = (repo / "model.safetensors").read_bytes()
    adding = Paused(["git", "add", "model.safetensors"], repo, "object-written", tmp_path, count=2)
    out = gc_beside(repo, adding)
    assert "removed 0 objects" in out
    git(repo, "commit", "-qm", "v2")
    assert_all_objects_there(repo)
    git(repo, "checkout", "-q", "HEAD~1")
    git(repo, "checkout", "-q", "main")
    assert (repo / "model.safetensors").read_bytes() == want


def test_gc_between_the_clean_and_gits_index_spares_pending_objects(repo: Path, tmp_path: Path) -> None:
    """The clean has answered git; gc runs before git's index refers to the objects (git add still running): the
    pending list of the filter, tied to the git that called it, keeps them."""
    git(repo, "theta", "track", "model.safetensors")
    save_file(random_state(4, seed=3), repo / "model.safetensors")
    adding = Paused(["git", "add", "model.safetensors"], repo, "objects-checked", tmp_path)
    rc, out = adding.resume()
    assert rc == 0, out
    # simulate the window directly: a pending list whose owner (this test process) is alive protects its oids
    folder = repo / ".git" / "lfs" / PENDING_DIR
    lists = list(folder.iterdir())
    oids = store_objects(repo)
    me = os.getpid()
    from gittheta_merge.storage.storelock import start_time

    (folder / "999999999").write_text(f"999999999 0 {me} {start_time(me)} git-theta filter-process\n"
                                      + "".join(o + "\n" for o in oids))
    git(repo, "rm", "-q", "--cached", "model.safetensors")  # nothing in git refers to them any more
    out = git(repo, "theta", "gc", "--prune", "now").stdout.decode()
    assert "removed 0 objects" in out and f"spared {len(oids)} not yet in git's index" in out
    assert store_objects(repo) == oids
    assert not any(p.exists() for p in lists)  # the lists of the finished git add were swept


def test_gc_during_git_theta_merge_loses_nothing(repo: Path, tmp_path: Path) -> None:
    git(repo, "theta", "track", "model.safetensors")
    base = random_state(6, seed=4)
    save_file(base, repo / "model.safetensors")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "base")
    for i in (1, 2):
        git(repo, "checkout", "-q", "-b", f"ft{i}", "main")
        save_file({k: v + 0.1 * i for k, v in base.items()}, repo / "model.safetensors")
        git(repo, "commit", "-qam", f"ft{i}")
    git(repo, "checkout", "-q", "main")
    merging = Paused(GIT_THETA + ["merge", "ft1", "ft2", "--strategy", "average"], repo, "object-written", tmp_path)
    gc_beside(repo, merging)
    assert_all_objects_there(repo)
    got = load_file(str(repo / "model.safetensors"))
    for k, v in base.items():
        torch.testing.assert_close(got[k], v + 0.15, rtol=0, atol=1e-6)


def test_gc_during_stats_compute_keeps_the_blob(hf_repo: Path, tmp_path: Path) -> None:
    computing = Paused(GIT_THETA + ["stats", "compute", "model", "--kind", "fisher", "--data", "train.jsonl",
                                    "--n-examples", "4", "--batch-size", "2", "--max-length", "16"],
                       hf_repo, "object-written", tmp_path)
    gc_beside(hf_repo, computing)
    git(hf_repo, "commit", "-qm", "statistics")
    assert_all_objects_there(hf_repo)
    out = git(hf_repo, "theta", "stats", "ls", "model").stdout.decode()
    assert "fisher" in out and "fresh" in out


@pytest.mark.skipif(shutil.which("git-lfs") is None, reason="git-lfs not installed")
def test_gc_during_pull_objects_loses_nothing(tmp_path: Path) -> None:
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(remote))
    repo = init_repo(tmp_path / "a")
    git(repo, "theta", "track", "*.safetensors")
    git(repo, "remote", "add", "origin", remote.as_uri())
    save_file(random_state(4, seed=5), repo / "model.safetensors")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "base")
    git(repo, "checkout", "-q", "-b", "ft")
    save_file(random_state(4, seed=6), repo / "model.safetensors")
    git(repo, "commit", "-qam", "ft")
    git(repo, "push", "-q", "origin", "main", "ft")
    copy = tmp_path / "copy"
    git(tmp_path, "clone", "-q", remote.as_uri(), str(copy))
    git(copy, "theta", "install")
    pulling = Paused(GIT_THETA + ["pull-objects", "origin/ft"], copy, "objects-fetched", tmp_path)
    gc_beside(copy, pulling)
    out = git(copy, "theta", "fsck").stdout.decode()
    assert "0 missing" in out and "not downloaded" not in out


def test_gc_removes_temp_files_of_a_killed_add_and_reports_their_bytes(repo: Path, tmp_path: Path) -> None:
    git(repo, "theta", "track", "model.safetensors")
    save_file(random_state(3, seed=7), repo / "model.safetensors")
    adding = Paused(["git", "add", "model.safetensors"], repo, "object-written", tmp_path)
    tmp_dir = repo / ".git" / "lfs" / "tmp"
    leftover = tmp_dir / "theta-killed"  # what a kill -9 mid-write leaves (mkstemp's name, partial bytes)
    leftover.write_bytes(b"\0" * 12345)
    os.killpg(adding.proc.pid, signal.SIGKILL)
    adding.proc.communicate()
    os.utime(leftover, (time.time() - 7200, time.time() - 7200))
    other = tmp_dir / "lfs-own-file"  # git-lfs's own temp files are git-lfs's business
    other.write_bytes(b"x")
    os.utime(other, (time.time() - 7200, time.time() - 7200))
    out = git(repo, "theta", "gc").stdout.decode()  # default grace period: 2-hour-old leftovers go
    assert "removed 1 temp file(s) of killed commands (12.3 KB)" in out, out
    assert not leftover.exists() and other.exists()
    (repo / ".git" / "index.lock").unlink(missing_ok=True)  # git's own leftover of the kill, as git says
    git(repo, "add", "model.safetensors")  # and the add then works
    assert_all_objects_there(repo)
