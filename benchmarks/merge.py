"""Merge benchmark: base + 2 fine-tunes of a synthetic Llama-architecture model (default 400M params, bf16).

Why this shape: it is the model mergekit was measured on (docs/anchors: 400.3M params, 111 tensors, largest
32000 x 1536), so our numbers compare with its 81-100 s / 2.30 GB TIES directly. Names and shapes come from
a transformers LlamaConfig instantiated on the meta device (no memory), the values are random.

Measured, each as a separate process under /usr/bin/time (wall seconds, peak RSS):
  floor       read the inputs each method needs (warm `cat ft1 ft2`, + base for every method but linear) plus
              write one model's bytes from user space (`dd if=/dev/zero bs=1M`, the faster of two runs): no merge can
              do less. (Not
              `cp`: coreutils 9 copies with copy_file_range, in the kernel, which no tool that computes new
              bytes can use: 0.28 s against 0.21-1.2 s for write(2) of the same 0.8 GB here.)
  files       `git theta merge-files ft1 ft2 --base base -o out --strategy S` for average (linear),
              task_arithmetic, ties (exact, global top-k) and ties_local
  git         `git theta merge ft1 ft2 --strategy S` in a temp repo (branches committed with git add), each
              from the base commit with a settled index (no racily clean entry, as for a user who did not
              reset a moment ago; measure.settle_index)
  mergekit    `mergekit-yaml` 0.1.5 for linear / task_arithmetic / ties, only with --mergekit-venv PATH

    python benchmarks/merge.py                       # 400M, everything but mergekit
    python benchmarks/merge.py --size 1.3e9 --skip-git
    python benchmarks/merge.py --workdir W --mergekit-venv /tmp/mkvenv --repeat 2   # the docs' table
    python benchmarks/merge.py --workdir W --sweep chunk --methods ties,linear --repeat 2
    python benchmarks/merge.py --workdir W --sweep variants --variants base,omp2,prefetch --methods ties --repeat 3
    python benchmarks/merge.py --workdir W --sweep variants --variants noprefetch,prefetch,torch --methods linear
    python benchmarks/merge.py --workdir W --sweep variants --variants base,numpy --methods linear,task_arithmetic
    python benchmarks/merge.py --workdir W --sweep variants --variants base,pyloop,noprefetch,step65536,step1048576
    python benchmarks/merge.py --workdir W --sweep opmix --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import settle_index, time_command  # benchmarks/ is the script directory

METHODS = {  # our strategy, its --set parameters, mergekit's method name (None: mergekit has none)
    "linear": ("average", [], "linear"),
    "task_arithmetic": ("task_arithmetic", ["lambda=1.0"], "task_arithmetic"),
    "ties": ("ties", ["density=0.2", "lambda=1.0"], "ties"),
    "ties_local": ("ties_local", ["density=0.2", "lambda=1.0"], "ties"),
    # issue 17's methods (opt-in with --methods): the same parameters on both sides
    "slerp": ("slerp", ["t=0.5"], "slerp"),
    "model_stock": ("model_stock", [], "model_stock"),
    "breadcrumbs": ("breadcrumbs", ["density=0.9", "gamma=0.01"], "breadcrumbs"),
    "della": ("della", ["density=0.5", "epsilon=0.1"], "della"),
    "tsv_merge": ("tsv_merge", [], None),
    "iso_c": ("iso_c", [], None),
}
DEFAULT_METHODS = "linear,task_arithmetic,ties,ties_local"
NO_BASE = {"slerp"}  # ours without --base (slerp interpolates the two fine-tunes; average ignores the base)
MERGEKIT_PARAMS = {  # per-model parameters and global ones in mergekit's YAML, equal to the --set above
    "linear": ("weight: 1.0", ""), "task_arithmetic": ("weight: 1.0", ""),
    "ties": ("weight: 1.0\n      density: 0.2", ""),
    "slerp": ("", "parameters: {t: 0.5}\n"), "model_stock": ("", ""),
    "breadcrumbs": ("weight: 1.0\n      density: 0.9\n      gamma: 0.01", ""),
    "della": ("weight: 1.0\n      density: 0.5\n      epsilon: 0.1", ""),
}


def llama_config(size: float):
    """A Llama with about `size` parameters (hidden 1536, GQA 12/4 heads, ff 4096, vocab 32000, untied head;
    layers scaled to hit the size: 12 layers = 400.3M)."""
    from transformers import LlamaConfig

    per_layer = 2 * 1536 * 1536 + 2 * 1536 * 512 + 3 * 1536 * 4096
    layers = max(1, round((size - 2 * 32000 * 1536) / per_layer))
    return LlamaConfig(hidden_size=1536, intermediate_size=4096, num_hidden_layers=layers, num_attention_heads=12,
                       num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)


def llama_shapes(size: float) -> dict[str, tuple[int, ...]]:
    """State-dict names/shapes of llama_config(size)."""
    import torch
    from transformers import LlamaForCausalLM

    cfg = llama_config(size)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def make_models(work: Path, size: float, seed: int = 0) -> dict[str, Path]:
    """base, ft1, ft2 as bf16 safetensors; fine-tunes = base + N(0, 0.01 * std) per tensor."""
    import torch
    from safetensors.torch import save_file

    shapes = llama_shapes(size)
    gen = torch.Generator().manual_seed(seed)
    paths = {n: work / f"{n}.safetensors" for n in ("base", "ft1", "ft2")}
    if all(p.exists() for p in paths.values()):
        return paths
    base = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    save_file(base, str(paths["base"]))
    for n in ("ft1", "ft2"):
        ft = {k: (v.float() + torch.randn(v.shape, generator=gen) * 0.002).to(torch.bfloat16) for k, v in base.items()}
        save_file(ft, str(paths[n]))
        del ft
    n_params = sum(v.numel() for v in base.values())
    (work / "info.json").write_text(json.dumps({"params": n_params, "tensors": len(base),
                                                "bytes": paths["base"].stat().st_size}))
    return paths


def load() -> float:
    """The 1-minute load average (the machine is shared: every figure carries the load it ran under)."""
    return os.getloadavg()[0]


READ_2, READ_3, WRITE_1 = "read ft1+ft2", "read base+ft1+ft2", "write one model (dd)"


def timed(cmd: list[str] | str, cwd: Path | None = None, env: dict[str, str] | None = None,
          fresh: Path | None = None) -> dict:
    """Wall seconds and peak RSS (GB) of one command via /usr/bin/time, with the load average before and after.
    `fresh`: deleted first (outside the timing), so every command writes a new file: replacing an existing
    0.8 GB file costs ~1 s of page-cache freeing, which would otherwise land in whichever command runs next."""
    if fresh is not None:
        if fresh.is_dir():
            shutil.rmtree(fresh)
        elif fresh.exists():
            fresh.unlink()
    os.sync()  # the previous command's dirty pages are written back now, not during this one (write throttling)
    before = load()
    # bytecode caching as on a user's machine (this sandbox sets PYTHONDONTWRITEBYTECODE, which would recompile
    # our modules, ~0.1 s, in every run; the rounds after the first find the .pyc files)
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    wall, rss_kb = time_command(["sh", "-c", cmd] if isinstance(cmd, str) else cmd, cwd, {**environ, **(env or {})})
    return {"wall_s": wall, "rss_gb": rss_kb * 1024 / 1e9, "load_before": before, "load_after": load()}


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def setup_repo(work: Path, paths: dict[str, Path]) -> Path:
    repo = work / "repo"
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    for k, v in (("user.email", "bench@example.com"), ("user.name", "bench"), ("commit.gpgsign", "false")):
        git(repo, "config", k, v)
    git(repo, "theta", "install")
    git(repo, "theta", "track", "*.safetensors")
    shutil.copy(paths["base"], repo / "model.safetensors")
    git(repo, "add", ".gitattributes", "model.safetensors")
    git(repo, "commit", "-q", "-m", "base")
    for n in ("ft1", "ft2"):
        git(repo, "checkout", "-q", "-b", n, "main")
        shutil.copy(paths[n], repo / "model.safetensors")
        git(repo, "add", "model.safetensors")
        git(repo, "commit", "-q", "-m", n)
    git(repo, "checkout", "-q", "main")
    return repo


def mergekit_run(venv: Path, work: Path, paths: dict[str, Path], method: str, size: float) -> dict:
    """mergekit-yaml on the same files (each model in its own directory with the model's config.json)."""
    cfg_json = llama_config(size).to_dict()
    cfg_json.update(architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="bfloat16")
    dirs = {}
    for n, p in paths.items():
        d = work / "mk" / n
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "model.safetensors").exists():
            os.link(p, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps(cfg_json))
        dirs[n] = d
    per_model, shared = MERGEKIT_PARAMS[method]
    cfg = work / "mk" / f"{method}.yaml"
    # slerp: from ft1 (its base_model) to ft2, as ours interpolates the two fine-tunes
    base_line = {"linear": "", "slerp": f"base_model: {dirs['ft1']}\n"}.get(method, f"base_model: {dirs['base']}\n")
    # defaults: linear normalises the weights (= average), ties normalises (= the disjoint mean), lambda 1
    cfg.write_text(f"merge_method: {method}\n{base_line}dtype: bfloat16\n{shared}models:\n"
                   + "".join(f"  - model: {dirs[n]}\n" + (f"    parameters:\n      {per_model}\n" if per_model else "")
                             for n in ("ft1", "ft2")))
    out = work / "mk" / f"out-{method}"
    return timed([str(venv / "bin" / "mergekit-yaml"), str(cfg), str(out)], fresh=out)


SWEEP_CHILD = r"""
import contextlib, json, os, sys
from gittheta_merge.merge import engine, runner
from gittheta_merge.merge.api import merge_files
from gittheta_merge.merge.strategies import average, task_arithmetic, ties
work, strategy, variant, chunk = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
kw = {}
if chunk:
    for cls in (average.Average, task_arithmetic.TaskArithmetic, ties.Ties):
        cls.chunk_bytes = chunk
    kw["max_block_bytes"] = max(chunk, 64 << 20)
if variant == "omp2":  # torch's own 2 intra-op threads instead of 1
    import torch
    engine.intra_op_threads = lambda strat: contextlib.nullcontext()  # engine's name for runner's
    torch.set_num_threads(2)
elif variant == "prefetch":
    kw["prefetch"] = True
elif variant == "noprefetch":  # one thread (the numpy path's default is a prefetch thread)
    kw["prefetch"] = False
elif variant == "torch":
    kw["numpy_kernels"] = False
elif variant == "numpy":  # the torch-free path without the compiled kernel
    kw["fused_kernel"] = False
elif variant == "pyloop":  # the compiled kernel fed chunk by chunk from Python (two helpers read and merge,
    runner._Runner.in_files = lambda self, tp, strat, sink: False  # the main thread writes): the store's path
elif variant.startswith("step"):  # the file loop's elements per read-merge-write step: step65536, ...
    runner.FILE_STEP_ELEMS = int(variant[4:])
params = {"density": 0.2} if strategy.startswith("ties") else {}
out = os.path.join(work, "sweep-out.safetensors")
if os.path.exists(out):
    os.unlink(out)
load = os.getloadavg()[0]
rep = merge_files([os.path.join(work, "ft1.safetensors"), os.path.join(work, "ft2.safetensors")], out,
                  base=os.path.join(work, "base.safetensors"), strategy=strategy, params=params, progress=False, **kw)
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]  # this exec's peak (ru_maxrss
print(json.dumps({"seconds": rep["seconds"], "load": load, "kernels": rep["kernels"],  # keeps the parent's)
                  "rss_gb": int(hwm[0].split()[1]) * 1024 / 1e9}))
"""

OPMIX_CHILD = r"""
import os, sys, threading, time
import torch
mode, n, chunks = sys.argv[1], 1 << 20, 200
torch.set_num_threads(2 if mode == "omp2" else 1)

def work(k):
    torch.set_num_threads(2 if mode == "omp2" else 1)  # per thread (OpenMP's count is per calling thread)
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(n, generator=g).to(torch.bfloat16) for _ in range(3))
    fa, fb, fc, s, t = (torch.empty(n) for _ in range(5))
    o = torch.empty(n, dtype=torch.bfloat16)
    for _ in range(k):  # the TIES merge pass, op for op
        fa.copy_(a); fb.copy_(b); fc.copy_(c); fa.sub_(fc); fb.sub_(fc)
        torch.hardshrink(fa, 0.5, out=fa); torch.hardshrink(fb, 0.5, out=fb)
        torch.add(fa, fb, out=s); s.sign_().mul_(2).add_(0.5).sign_(); fa.mul_(s); fb.mul_(s)
        torch.minimum(fa, fb, out=t); t.clamp_(max=0).sign_().sum()
        fa.clamp_(min=0); fb.clamp_(min=0); torch.add(fa, fb, out=t); fa.sign_(); fb.sign_()
        fa.add_(fb).clamp_(min=1); t.div_(fa).mul_(s).add_(fc); o.copy_(t)

load = os.getloadavg()[0]
t0 = time.perf_counter()
if mode == "threads2":
    ths = [threading.Thread(target=work, args=(chunks // 2,)) for _ in range(2)]
    [x.start() for x in ths]
    [x.join() for x in ths]
else:
    work(chunks)
print(f"{time.perf_counter() - t0:.3f} {load:.2f}")
"""


def sweep(args: argparse.Namespace, work: Path) -> None:
    """In-process variants of one merge (merge seconds from the report: no import time), interleaved round by
    round, one process per run. --sweep chunk: --chunks sizes in MiB; --sweep variants: base (default), omp2
    (2 torch intra-op threads), prefetch / noprefetch (a helper thread reads, and on the numpy path merges, the
    next chunk: default on for the numpy path, off for torch), torch (no numpy kernels), numpy (numpy kernels,
    not the compiled one), pyloop (the compiled kernel fed chunk by chunk from Python, as over the object store,
    instead of its own file loop), stepN (the file loop reading N elements per step; default 262144);
    --sweep opmix: the TIES
    op mix on 200 chunks of 1M elements with 1 thread, a pool of 2 Python threads, or 2 OpenMP threads."""
    if args.sweep == "opmix":
        modes = ["omp1", "threads2", "omp2"]
        for rnd in range(args.repeat):
            for mode in modes:
                out = subprocess.run([sys.executable, "-c", OPMIX_CHILD, mode], capture_output=True, text=True,
                                     check=True).stdout.split()
                print(f"round {rnd + 1}: op mix {mode:8s} {float(out[0]):6.2f} s  load {out[1]}", flush=True)
        return
    if args.sweep == "chunk":
        cases = [("base", int(float(c) * (1 << 20))) for c in args.chunks.split(",")]
    else:
        cases = [(v, 0) for v in args.variants.split(",")]
    for m in args.methods.split(","):
        strategy = METHODS[m][0]
        for rnd in range(args.repeat):
            for variant, chunk in cases:
                os.sync()  # as before the timed commands: no earlier output's write-back during this run
                proc = subprocess.run([sys.executable, "-c", SWEEP_CHILD, str(work), strategy, variant, str(chunk)],
                                      capture_output=True, text=True)
                if proc.returncode:
                    raise RuntimeError(proc.stderr[-2000:])
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                what = f"{chunk / (1 << 20):g} MiB" if chunk else variant
                print(f"round {rnd + 1}: {m} {what:9s} {r['seconds']:7.2f} s  peak RSS {r['rss_gb']:.3f} GB  "
                      f"load {r['load']:.2f}  ({r['kernels']} kernels)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=400e6, help="parameters (default 400e6)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep inputs here between runs")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"any of {', '.join(METHODS)}")
    ap.add_argument("--skip-git", action="store_true")
    ap.add_argument("--mergekit-venv", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=1, help="rounds; each round runs every row once, in order")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--sweep", choices=["chunk", "variants", "opmix"], default=None,
                    help="in-process sweeps behind docs/merge.md's Performance section (see sweep())")
    ap.add_argument("--chunks", default="0.25,1,4,16,64", help="--sweep chunk: MiB")
    ap.add_argument("--variants", default="base,omp2,prefetch", help="--sweep variants")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    paths = make_models(work, args.size)
    info = json.loads((work / "info.json").read_text())
    one_model_gb = info["bytes"] / 1e9
    print(f"model: {info['params'] / 1e6:.1f}M params, {info['tensors']} tensors, {one_model_gb:.2f} GB bf16 "
          f"(built in {time.monotonic() - t0:.0f} s) in {work}; load {load():.2f}", flush=True)
    if args.sweep:
        sweep(args, work)
        return
    gt = [sys.executable, "-m", "gittheta_merge"]
    out = work / "out.safetensors"
    methods = [m for m in args.methods.split(",") if m]
    jobs: list[tuple[str, str, object]] = []  # (tool, method, () -> result)

    def warm_cat(names: list[str]) -> dict:  # the merges read page-cached inputs (each follows others): so does this
        cat = "cat " + " ".join(str(paths[n]) for n in names) + " > /dev/null"
        subprocess.run(cat, shell=True, check=True)
        return timed(cat)

    jobs.append(("floor", READ_2, lambda: warm_cat(["ft1", "ft2"])))
    jobs.append(("floor", READ_3, lambda: warm_cat(["base", "ft1", "ft2"])))
    def dd_write() -> dict:
        """The faster of two writes: a write right after a merge's output was deleted takes 0.8-1.1 s here and one
        after another dd 0.2-0.4 s (seen in both orders; cause not found: ext4 `discard` is on), so the floor
        takes the fast case and a merge is never compared with a slowed-down write."""
        dd = ["dd", "if=/dev/zero", f"of={out}", "bs=1M", "iflag=count_bytes", f"count={info['bytes']}", "status=none"]
        return min((timed(dd, fresh=out) for _ in range(2)), key=lambda r: r["wall_s"])

    jobs.append(("floor", WRITE_1, dd_write))
    for m in methods:
        strategy, sets, _ = METHODS[m]
        base_args = [] if m in NO_BASE else ["--base", str(paths["base"])]
        cmd = [*gt, "merge-files", str(paths["ft1"]), str(paths["ft2"]), *base_args,
               "-o", str(out), "--strategy", strategy, *[a for s in sets for a in ("--set", s)]]
        jobs.append(("merge-files", m, lambda cmd=cmd: timed(cmd, fresh=out)))
    if args.mergekit_venv:
        for m in methods:
            if m != "ties_local" and METHODS[m][2]:
                jobs.append(("mergekit 0.1.5", m, lambda m=m: mergekit_run(args.mergekit_venv, work, paths,
                                                                          METHODS[m][2], args.size)))
    if not args.skip_git:
        t1 = time.monotonic()
        repo = setup_repo(work, paths)
        base_commit = subprocess.run(["git", "rev-parse", "main"], cwd=repo, check=True, capture_output=True,
                                     text=True).stdout.strip()
        print(f"repo set up in {time.monotonic() - t1:.0f} s", flush=True)

        def git_merge(m: str) -> dict:
            strategy, sets, _ = METHODS[m]
            # back to the base commit: each `git theta merge` commits onto main, and merging ft1 ft2 into an
            # earlier merge result would be a 3-model merge
            git(repo, "reset", "-q", "--hard", base_commit)
            # as a user who did not reset a moment ago: no racily clean index entry, else the checkout inside
            # re-runs the clean filter over the 0.8 GB file (~1 s; git compares mtimes in whole seconds)
            settle_index(repo)
            return timed([*gt, "merge", "ft1", "ft2", "--strategy", strategy,
                          *[a for s in sets for a in ("--set", s)]], cwd=repo)

        for m in methods:
            jobs.append(("git theta merge", m, lambda m=m: git_merge(m)))

    runs: dict[tuple[str, str], list[dict]] = {}
    for rnd in range(args.repeat):
        for tool, method, fn in jobs:
            r = fn()  # type: ignore[operator]
            runs.setdefault((tool, method), []).append(r)
            print(f"round {rnd + 1}: {tool} {method}: {r['wall_s']:.2f} s, {r['rss_gb']:.3f} GB, "
                  f"load {r['load_before']:.2f} -> {r['load_after']:.2f}", flush=True)

    def med(key: tuple[str, str], field: str = "wall_s") -> float:
        return statistics.median(r[field] for r in runs[key])

    # per round: read what the method reads + write one model (linear/average needs no base)
    floors = {n: [r["wall_s"] + w["wall_s"] for r, w in zip(runs[("floor", read)], runs[("floor", WRITE_1)])]
              for n, read in ((2, READ_2), (3, READ_3))}
    # the strict floor: the fastest read and the fastest write of any round
    best_write = min(w["wall_s"] for w in runs[("floor", WRITE_1)])
    best_floor = {n: min(r["wall_s"] for r in runs[("floor", read)]) + best_write
                  for n, read in ((2, READ_2), (3, READ_3))}
    rows = []
    for (tool, method), rs in runs.items():
        if tool == "floor":
            continue
        row = {"tool": tool, "method": method, "wall_s": med((tool, method)), "rss_gb": med((tool, method), "rss_gb"),
               "walls": [r["wall_s"] for r in rs], "loads": [r["load_before"] for r in rs]}
        row["floor_rounds"] = floors[2 if method in ("linear", "slerp") else 3]
        row["x_floor_rounds"] = [r["wall_s"] / f for r, f in zip(rs, row["floor_rounds"])]  # same round's floor
        row["x_floor"] = statistics.median(row["x_floor_rounds"])
        row["x_best_floor"] = row["wall_s"] / best_floor[2 if method in ("linear", "slerp") else 3]
        mk = runs.get(("mergekit 0.1.5", method))
        if mk and tool != "mergekit 0.1.5":
            # speed-up against mergekit within the same rounds (same load conditions), median over rounds
            row["x_faster_rounds"] = [m["wall_s"] / r["wall_s"] for m, r in zip(mk, rs)]
            row["x_faster_than_mergekit"] = statistics.median(row["x_faster_rounds"])
        rows.append(row)
    print()
    for n, fs in floors.items():
        print(f"floor, {n} inputs (warm cat of the inputs + dd of one model's bytes to a fresh file): median "
              f"{statistics.median(fs):.2f} s over {len(fs)} rounds ({', '.join(f'{f:.2f}' for f in fs)}); "
              f"best read + best write {best_floor[n]:.2f} s")
    for key, rs in runs.items():
        if key[0] == "floor":
            walls = ", ".join(f"{r['wall_s']:.2f}" for r in rs)
            print(f"  {key[1]}: {walls} s")
    print("| tool | method | wall (s), median | runs (s) | load at start | × floor (per round) | × best floor | "
          "× faster than mergekit | peak RSS (GB) | RSS / one model |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speed = (f"{r['x_faster_than_mergekit']:.2f} ({', '.join(f'{x:.2f}' for x in r['x_faster_rounds'])})"
                 if "x_faster_than_mergekit" in r else "—")
        print(f"| {r['tool']} | {r['method']} | {r['wall_s']:.1f} | {', '.join(f'{w:.1f}' for w in r['walls'])} | "
              f"{', '.join(f'{x:.1f}' for x in r['loads'])} | {r['x_floor']:.2f} "
              f"({', '.join(f'{x:.2f}' for x in r['x_floor_rounds'])}) | {r['x_best_floor']:.2f} | {speed} | "
              f"{r['rss_gb']:.2f} | "
              f"{r['rss_gb'] / one_model_gb:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"model": info, "floor_s": floors, "best_floor_s": best_floor, "rows": rows,
                                         "runs": [{"tool": t, "method": m, "runs": rs}
                                                  for (t, m), rs in runs.items()]}, indent=1))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
