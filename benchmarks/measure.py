"""Measuring commands for the benchmarks: wall time and peak RSS via /usr/bin/time, directory sizes, and a
git index with no racily clean entry before a timed command."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def time_command(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS in KiB of the largest process) of one command, via `/usr/bin/time -f '%e %M'`;
    a failing command stops the benchmark with the tail of its output."""
    proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd or os.getcwd()}:\n{proc.stdout[-2000:]}\n"
                         + "\n".join(lines[-15:]))
    seconds, kib = lines[-1].split()
    return float(seconds), int(kib)


def dir_bytes(path: Path) -> int:
    """Apparent size of a directory tree (like `du -sb`); 0 if it does not exist."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def settle_index(repo: Path, env: dict[str, str] | None = None) -> None:
    """Leave no "racily clean" index entry before a timed checkout (untimed).

    git compares the index file's mtime with each file's mtime in whole seconds. When a file was
    written in the same second as the index (a fast `git add` right after the file was rewritten), git
    cannot trust the stat data and, on the next command that looks at the file (commit, status, or
    the checkout about to overwrite it), re-runs the clean filter over the whole file. That cost
    depends on where the second boundary falls and hits faster filters more often; it is measured in
    the status steps, but it would make the checkout numbers bimodal. So: wait past the index's
    mtime second, then let `git status` re-verify and rewrite the index."""
    index = repo / ".git" / "index"
    while time.time() < int(index.stat().st_mtime) + 1.05:
        time.sleep(0.05)
    subprocess.run(["git", "status", "--porcelain"], cwd=repo, env=env, check=True, capture_output=True)
