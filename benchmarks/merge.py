"""Merge benchmark: base + 2 fine-tunes of a synthetic Llama-architecture model (default 400M params, bf16).

Why this shape: it is the model mergekit was measured on (docs/anchors: 400.3M params, 111 tensors, largest
32000 x 1536), so our numbers compare with its 81-100 s / 2.30 GB TIES directly. Names and shapes come from
a transformers LlamaConfig instantiated on the meta device (no memory), the values are random.

Measured, each as a separate process under /usr/bin/time (wall seconds, peak RSS):
  floor       cat base ft1 ft2 > /dev/null, then cp ft1 out (read the inputs + write one output)
  files       `git theta merge-files ft1 ft2 --base base -o out --strategy S` for average (linear),
              task_arithmetic, ties (exact, global top-k) and ties_local
  git         `git theta merge ft1 ft2 --strategy S` in a temp repo (branches committed with git add)
  mergekit    `mergekit-yaml` 0.1.5 for linear / task_arithmetic / ties, only with --mergekit-venv PATH

    python benchmarks/merge.py                       # 400M, everything but mergekit
    python benchmarks/merge.py --size 1.3e9 --skip-git
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = {  # our strategy, its --set parameters, mergekit's method name
    "linear": ("average", [], "linear"),
    "task_arithmetic": ("task_arithmetic", ["lambda=1.0"], "task_arithmetic"),
    "ties": ("ties", ["density=0.2", "lambda=1.0"], "ties"),
    "ties_local": ("ties_local", ["density=0.2", "lambda=1.0"], "ties"),
}


def llama_shapes(size: float) -> dict[str, tuple[int, ...]]:
    """State-dict names/shapes of a Llama with about `size` parameters (hidden 1536, GQA 12/4 heads, ff 4096,
    vocab 32000, untied head; layers scaled to hit the size: 12 layers = 400.3M)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    per_layer = 2 * 1536 * 1536 + 2 * 1536 * 512 + 3 * 1536 * 4096
    layers = max(1, round((size - 2 * 32000 * 1536) / per_layer))
    cfg = LlamaConfig(hidden_size=1536, intermediate_size=4096, num_hidden_layers=layers, num_attention_heads=12,
                      num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
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


def timed(cmd: list[str] | str, cwd: Path | None = None, env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one process tree member (the command itself) via /usr/bin/time."""
    shell = isinstance(cmd, str)
    full = ["/usr/bin/time", "-f", "%e %M"] + (["sh", "-c", cmd] if shell else cmd)
    proc = subprocess.run(full, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    wall, rss_kb = proc.stderr.strip().splitlines()[-1].split()
    return float(wall), int(rss_kb) * 1024 / 1e9


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


def mergekit_run(venv: Path, work: Path, paths: dict[str, Path], method: str) -> tuple[float, float]:
    """mergekit-yaml on the same files (each model in its own directory with a config.json)."""
    dirs = {}
    for n, p in paths.items():
        d = work / "mk" / n
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "model.safetensors").exists():
            os.link(p, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
        dirs[n] = d
    params = {"linear": "weight: 1.0", "task_arithmetic": "weight: 1.0", "ties": "weight: 1.0\n      density: 0.2"}
    cfg = work / "mk" / f"{method}.yaml"
    base_line = "" if method == "linear" else f"base_model: {dirs['base']}\n"
    cfg.write_text(f"merge_method: {method}\n{base_line}dtype: bfloat16\nmodels:\n"
                   + "".join(f"  - model: {dirs[n]}\n    parameters:\n      {params[method]}\n"
                             for n in ("ft1", "ft2")))
    out = work / "mk" / f"out-{method}"
    shutil.rmtree(out, ignore_errors=True)
    return timed([str(venv / "bin" / "mergekit-yaml"), str(cfg), str(out)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=400e6, help="parameters (default 400e6)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep inputs here between runs")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--skip-git", action="store_true")
    ap.add_argument("--mergekit-venv", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    paths = make_models(work, args.size)
    info = json.loads((work / "info.json").read_text())
    one_model_gb = info["bytes"] / 1e9
    print(f"model: {info['params'] / 1e6:.1f}M params, {info['tensors']} tensors, {one_model_gb:.2f} GB bf16 "
          f"(built in {time.monotonic() - t0:.0f} s) in {work}", flush=True)
    gt = [sys.executable, "-m", "gittheta_merge"]
    rows: list[dict] = []
    out = work / "out.safetensors"
    cat_s, cat_rss = timed(f"cat {paths['base']} {paths['ft1']} {paths['ft2']} > /dev/null")
    cp_s, _ = timed(["cp", str(paths["ft1"]), str(out)])
    floor = cat_s + cp_s
    rows.append({"tool": "floor", "method": "read 3 + write 1", "wall_s": floor, "rss_gb": cat_rss})
    print(f"floor: cat {cat_s:.2f} s + cp {cp_s:.2f} s = {floor:.2f} s", flush=True)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        strategy, sets, _ = METHODS[m]
        cmd = [*gt, "merge-files", str(paths["ft1"]), str(paths["ft2"]), "--base", str(paths["base"]),
               "-o", str(out), "--strategy", strategy, *[a for s in sets for a in ("--set", s)]]
        wall, rss = timed(cmd)
        rows.append({"tool": "merge-files", "method": m, "wall_s": wall, "rss_gb": rss})
        print(f"merge-files {m}: {wall:.2f} s, {rss:.3f} GB", flush=True)
    if not args.skip_git:
        t1 = time.monotonic()
        repo = setup_repo(work, paths)
        print(f"repo set up in {time.monotonic() - t1:.0f} s", flush=True)
        for m in methods:
            strategy, sets, _ = METHODS[m]
            git(repo, "reset", "-q", "--hard", "main")
            cmd = [*gt, "merge", "ft1", "ft2", "--strategy", strategy, *[a for s in sets for a in ("--set", s)]]
            wall, rss = timed(cmd, cwd=repo)
            rows.append({"tool": "git theta merge", "method": m, "wall_s": wall, "rss_gb": rss})
            print(f"git theta merge {m}: {wall:.2f} s, {rss:.3f} GB", flush=True)
    if args.mergekit_venv:
        for m in methods:
            if m == "ties_local":
                continue
            wall, rss = mergekit_run(args.mergekit_venv, work, paths, METHODS[m][2])
            rows.append({"tool": "mergekit 0.1.5", "method": m, "wall_s": wall, "rss_gb": rss})
            print(f"mergekit {m}: {wall:.2f} s, {rss:.3f} GB", flush=True)
    print()
    print("| tool | method | wall (s) | × floor | peak RSS (GB) | RSS / one model |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tool']} | {r['method']} | {r['wall_s']:.1f} | {r['wall_s'] / floor:.2f} | "
              f"{r['rss_gb']:.2f} | {r['rss_gb'] / one_model_gb:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"model": info, "rows": rows}, indent=1))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
