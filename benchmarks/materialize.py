"""Checkout of a large model: through git (git holds the whole smudge output in memory) against direct
materialization (a placeholder for git, the file written by our post-checkout hook from the object store).

For each size: a repo with two commits that differ in every tensor; `git checkout` of the other commit is timed, and
the peak RSS of the whole process tree (git, the filter process, the hook and its children, summed at each 20 ms
sample from /proc) is recorded; then `git status` right after. Baselines: `cp` of the same file to a new path and
over an existing copy (a checkout replaces a model: the old file's deletion is part of its cost), and the same
checkout with materialization off (theta.materializeBytes above the file size). Every timed step starts after a
`sync`, so none pays for writing back the previous step's dirty pages (a single cp right after a 2 GB checkout
took 1.5 s instead of 0.6 s here); --repeat checkouts alternate between the two commits, medians are shown.

    python benchmarks/materialize.py                   # 2 GB
    python benchmarks/materialize.py --sizes 2,4       # GB
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def tree_rss_kb(root: int) -> int:
    """Summed VmRSS of `root` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        pid, ppid = int(entry), int(fields.get("PPid", "0").strip() or 0)
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) if "VmRSS" in fields else 0
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def run_tree(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak summed RSS of the process tree in MB)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss_kb(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    proc.wait()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}")
    return time.monotonic() - start, peak / 1024


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, stdout=subprocess.DEVNULL)


def make_repo(work: Path, gb: float, materialize_bytes: int) -> Path:
    repo = work / f"repo-{gb:g}-{materialize_bytes}"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "b@example.com")
    git(repo, "config", "user.name", "bench")
    git(repo, "theta", "install")
    git(repo, "config", "theta.materializeBytes", str(materialize_bytes))
    git(repo, "theta", "track", "model.safetensors")
    n = max(1, int(gb * 1e9 / (4096 * 4096 * 4)))  # 64 MiB fp32 tensors
    for version in (0, 1):
        save_file({f"layer{i}.weight": torch.full((4096, 4096), float(i + 1000 * version)) +
                   torch.arange(4096 * 4096, dtype=torch.float32).reshape(4096, 4096) for i in range(n)},
                  repo / "model.safetensors")
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", f"v{version}")
    return repo


def prepare(cache: str, sources: list[Path]) -> None:
    """Before a timed step: no dirty pages left to write back (`sync`); then either nothing cached (cold: what a
    checkout of a model written long ago meets; needs root for /proc/sys/vm/drop_caches) or the step's sources
    read once into the page cache (warm)."""
    subprocess.run(["sync"], check=True)
    if cache == "cold":
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return
    for source in sources:
        files = [source] if source.is_file() else [p for p in source.rglob("*") if p.is_file()]
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(16 << 20):
                    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2", help="comma-separated model sizes in GB")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--cache", choices=["cold", "warm"], default="warm",
                    help="cold: page cache dropped before each timed step (root); warm: its sources read first")
    ap.add_argument("--repeat", type=int, default=3, help="checkouts per mode (alternating between the two "
                    "commits); medians of time, maxima of memory")
    args = ap.parse_args()
    # bytecode caching as on a user's machine: this sandbox sets PYTHONDONTWRITEBYTECODE, under which every filter,
    # hook and CLI start compiles our modules again (~0.1 s each); the runs after the first find the .pyc files
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="materialize-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"page cache: {args.cache}")
    print("| model | cp s (over the old file) | checkout via git: s / tree MB | materialized: s / tree MB | s vs cp "
          "(over the old file) | tree MB / file MB | git status after, s |")
    print("|---|---|---|---|---|---|---|")
    for gb in (float(x) for x in args.sizes.split(",")):
        runs: dict[str, list[tuple[float, float]]] = {}
        for mode, threshold in (("git", 1 << 50), ("materialized", 1 << 20)):
            repo = make_repo(work, gb, threshold)
            size = (repo / "model.safetensors").stat().st_size
            for i in range(args.repeat):
                rev = "HEAD~1" if i % 2 == 0 else "main"
                prepare(args.cache, [repo / ".git"])
                time.sleep(1.1)  # out of git's racy window
                runs.setdefault(mode, []).append(run_tree(["git", "checkout", "-q", rev], repo))
                t0 = time.monotonic()
                status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, check=True)
                runs.setdefault(mode + "-status", []).append((time.monotonic() - t0, 0.0))
                assert status.stdout == b"", status.stdout
                copy = work / "copy.safetensors"
                prepare(args.cache, [repo / "model.safetensors"])
                t0 = time.monotonic()
                subprocess.run(["cp", str(repo / "model.safetensors"), str(copy)], check=True)
                runs.setdefault("cp", []).append((time.monotonic() - t0, 0.0))
                # what a checkout does besides writing: the model it replaces is deleted first (git unlinks it),
                # which for a large file costs about as much again as the copy here; `cp` over an existing file
                # pays the same (it truncates the old one)
                prepare(args.cache, [repo / "model.safetensors"])
                t0 = time.monotonic()
                subprocess.run(["cp", str(repo / "model.safetensors"), str(copy)], check=True)
                runs.setdefault("cp-over", []).append((time.monotonic() - t0, 0.0))
                copy.unlink()
            subprocess.run(["rm", "-rf", str(repo)], check=True)
        rows = {key: (statistics.median(t for t, _ in v), max(m for _, m in v)) for key, v in runs.items()}
        (gs, gmb), (ms, mmb) = rows["git"], rows["materialized"]
        cp, over = rows["cp"][0], rows["cp-over"][0]
        print(f"| {size / 1e9:.2f} GB | {cp:.2f} ({over:.2f}) | {gs:.2f} / {gmb:.0f} | {ms:.2f} / {mmb:.0f} | "
              f"{ms / cp:.2f}x ({ms / over:.2f}x) | {mmb / (size / 1e6):.3f} (git: {gmb / (size / 1e6):.3f}) | "
              f"{rows['materialized-status'][0]:.2f} (git: {rows['git-status'][0]:.2f}) |", flush=True)


if __name__ == "__main__":
    main()
