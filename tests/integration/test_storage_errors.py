"""A full disk or a read-only store ends in one line that names the path, the bytes needed and free, and the fix;
never a traceback, never a half-written file, and the command works once space is freed. Real small filesystems:
tmpfs mounts (root only; otherwise these tests skip and say why)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import git, init_repo, random_state, store_objects
from safetensors.torch import save_file

MB = 1 << 20


def _mount(point: Path, size_mb: int) -> None:
    point.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")


@pytest.fixture
def mounts():
    made: list[Path] = []

    def mount(point: Path, size_mb: int) -> Path:
        _mount(point, size_mb)
        made.append(point)
        return point

    yield mount
    for point in reversed(made):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def remount(point: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(point)], check=True)


def one_line_error(proc: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode != 0, err
    assert "Traceback" not in err and "internal error" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_add_on_a_full_disk_says_what_is_needed_and_works_once_space_is_freed(tmp_path: Path, mounts) -> None:
    repo = init_repo(mounts(tmp_path / "disk", 7))
    git(repo, "theta", "track", "model.safetensors")
    state = random_state(4, shape=(256, 1024))  # 4 MiB
    save_file(state, repo / "model.safetensors")
    want = (repo / "model.safetensors").read_bytes()
    proc = git(repo, "add", "model.safetensors", check=False)
    err = one_line_error(proc, "needs", "free", "git theta gc --prune now", str(repo / ".git" / "lfs"))
    assert "model.safetensors" in err
    assert (repo / "model.safetensors").read_bytes() == want  # the work-tree file is intact
    assert list((repo / ".git" / "lfs" / "tmp").iterdir()) == []  # no temp file left
    assert b"model.safetensors" not in git(repo, "ls-files", "--stage").stdout  # nothing half-staged
    status = git(repo, "status", "--porcelain", check=False)
    assert status.returncode == 0 and b"Traceback" not in status.stderr
    remount(repo, "size=20m")
    git(repo, "add", "model.safetensors")
    git(repo, "commit", "-qm", "model")
    (repo / "model.safetensors").unlink()
    git(repo, "checkout", "--", "model.safetensors")
    assert (repo / "model.safetensors").read_bytes() == want
    assert git(repo, "theta", "fsck").returncode == 0


def test_checkout_that_cannot_fit_is_refused_with_the_numbers(tmp_path: Path, mounts) -> None:
    repo = init_repo(mounts(tmp_path / "disk", 16))
    git(repo, "theta", "track", "*.safetensors")
    (repo / "README").write_text("x\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "empty")
    git(repo, "checkout", "-q", "-b", "model")
    save_file(random_state(4, shape=(256, 1024)), repo / "model.safetensors")
    want = (repo / "model.safetensors").read_bytes()
    git(repo, "add", "model.safetensors")
    git(repo, "commit", "-qm", "model")
    git(repo, "checkout", "-q", "main")
    free = os.statvfs(repo).f_bavail * os.statvfs(repo).f_frsize
    filler = repo.parent / "disk" / ".filler"
    with open(filler, "wb") as fh:  # leave ~1 MiB free: the 4 MiB model cannot be written
        fh.write(b"\0" * (free - MB))
    proc = git(repo, "checkout", "model", check=False)
    one_line_error(proc, "model.safetensors: checking out 4.2 MB", "needs", "free", "git theta gc")
    filler.unlink()
    git(repo, "checkout", "-q", "-f", "model")
    assert (repo / "model.safetensors").read_bytes() == want


def test_merge_files_output_that_cannot_fit_is_refused_before_merging(tmp_path: Path, mounts) -> None:
    out_dir = mounts(tmp_path / "out", 2)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(random_state(4, shape=(256, 1024), seed=i), paths[-1])
    proc = subprocess.run([sys.executable, "-m", "gittheta_merge", "merge-files", *map(str, paths), "-o",
                           str(out_dir / "merged.safetensors")], capture_output=True)
    one_line_error(proc, f"writing {out_dir / 'merged.safetensors'}", "needs 4.2 MB", "free")
    assert list(out_dir.iterdir()) == []


def test_read_only_store_gives_one_line_and_reuse_still_works(tmp_path: Path, mounts) -> None:
    repo = init_repo(tmp_path / "repo")
    git(repo, "theta", "track", "model.safetensors")
    state = random_state(3)
    save_file(state, repo / "model.safetensors")
    git(repo, "add", "model.safetensors")
    git(repo, "commit", "-qm", "v1")
    lfs = repo / ".git" / "lfs"
    saved = tmp_path / "lfs-copy"
    subprocess.run(["cp", "-a", str(lfs), str(saved)], check=True)
    mounts(lfs, 8)
    subprocess.run(f"cp -a {saved}/. {lfs}/", shell=True, check=True)
    before = store_objects(repo)
    remount(lfs, "ro")
    (repo / "model.safetensors").touch()  # unchanged content, new mtime: re-adding reuses every object
    git(repo, "add", "model.safetensors")
    save_file(random_state(3, seed=9), repo / "model.safetensors")
    proc = git(repo, "add", "model.safetensors", check=False)
    one_line_error(proc, "read-only filesystem", str(lfs))
    remount(lfs, "rw")
    assert store_objects(repo) == before
    git(repo, "add", "model.safetensors")
