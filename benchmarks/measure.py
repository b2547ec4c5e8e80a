"""Measuring commands for the benchmarks: wall time and peak RSS via /usr/bin/time, and directory sizes."""

from __future__ import annotations

import os
import subprocess
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
