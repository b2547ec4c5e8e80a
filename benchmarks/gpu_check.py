"""The GPU path checked against the CPU in one short run (issue 18): every merge strategy and every statistic kind
computed with `--device DEVICE` and on the CPU, compared tensor by tensor, and a TIES merge of the merge benchmark's
400M bf16 models timed on both.

    python benchmarks/gpu_check.py --device cuda --out /tmp/gpu        # ~3 min on one GPU machine
    python benchmarks/gpu_check.py --device cpu --size 20e6            # the script itself, checked without a GPU

What it compares (pass = max |device - cpu| / max |cpu| per tensor within the tolerance):
  1. statistics: a small random BERT classifier on 256 synthetic sentences; fisher, gram and kfac, each by
     `compute_statistic(device=...)` (sums accumulated in float64 on both sides, the products in float32), tolerance
     1e-4 relative;
  2. merges: every installed strategy (two-model ones with two models) through `merge_files(device=...)` on that
     BERT's base and three perturbed copies, with the CPU-computed statistics for the data-aware ones; tolerance 1e-4
     relative (float32 everywhere; iterative and SVD-based methods are reported the same way, so a larger
     difference shows up rather than passing silently);
  3. time: `merge_files` TIES (density 0.2) of base + two fine-tunes of `--size` parameters in bf16 (the merge
     benchmark's models, benchmarks/merge.py), on the CPU and on the device, wall seconds and the ratio.
Output: a markdown report (stdout, and --out/gpu_check.md) and JSON beside it; exit status 1 if anything failed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

WORDS = ("the a cat dog runs sits big small red blue good bad movie book not very is was film plot actor scene "
         "great awful slow fast love hate story music end start").split()
TOL = 1e-4


def rel_diff(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    scale = max(float(a.abs().max()), floor) or 1.0
    return float((a - b).abs().max()) / scale


def tiny_bert(work: Path) -> tuple[Any, Any, list[Any]]:
    """A 4-layer random BERT classifier (hidden 128), its word-level tokenizer, and 256 labelled sentences."""
    import random

    import transformers

    from gittheta_merge.stats.data import Example

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (work / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(str(work / "vocab.txt"))
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=256, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    gen = random.Random(0)
    examples = [Example(" ".join(gen.choice(WORDS) for _ in range(gen.randint(3, 20))), label=gen.randrange(3))
                for _ in range(256)]
    return model, tok, examples


def check_stats(model: Any, tok: Any, examples: list[Any], device: str, work: Path) -> tuple[list[dict], dict]:
    """Each kind on the CPU and on `device`; the CPU ones are saved for the data-aware merges."""
    from gittheta_merge.stats.blobs import save_statistic
    from gittheta_merge.stats.compute import compute_statistic

    rows, files = [], {}
    cpu_stats: dict[str, Any] = {}
    # the layer-wise rows (one block on the device at a time, stats/layerwise.py) against the plain CPU ones
    for kind, how in (("fisher", "auto"), ("gram", "auto"), ("kfac", "auto"), ("fisher", "layerwise"),
                      ("kfac", "layerwise")):
        row: dict[str, Any] = {"kind": kind if how == "auto" else f"{kind} ({how})"}
        try:
            if kind not in cpu_stats:  # the plain CPU statistic: the reference of both rows of a kind
                t0 = time.perf_counter()
                cpu_stats[kind] = (compute_statistic(model, tok, examples, kind=kind, task="sequence-classification",
                                                     batch_size=32, max_length=32, device="cpu", progress=False),
                                   time.perf_counter() - t0)
            ref, ref_s = cpu_stats[kind]
            t0 = time.perf_counter()
            got = compute_statistic(model, tok, examples, kind=kind, task="sequence-classification", batch_size=32,
                                    max_length=32, device=device, progress=False, per_example=how)
            dev_s = time.perf_counter() - t0
            model.to("cpu")
            cpu, dev_stat = ref.tensors, got.tensors
            # a tensor whose statistic is 0 in exact arithmetic (BERT's key biases: softmax ignores them) holds
            # rounding noise only: it is measured against 1e-6 of the statistic's largest entry instead
            floor = 1e-6 * max(float(t.abs().max()) for t in cpu.values())
            row["max_rel_diff"] = max(rel_diff(cpu[k], dev_stat[k], floor) for k in cpu)
            row["same_keys"] = sorted(cpu) == sorted(dev_stat)
            row["ok"] = row["same_keys"] and row["max_rel_diff"] <= TOL
            row.update({"cpu_s": round(ref_s, 2), "device_s": round(dev_s, 2)})
            if how == "auto":
                files[kind] = work / f"{kind}.safetensors"
                save_statistic(ref, files[kind])
        except Exception as exc:  # noqa: BLE001 - the report says what broke and goes on
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc(limit=3))
        rows.append(row)
    return rows, files


def check_merges(model: Any, device: str, work: Path, stat_files: dict[str, Path]) -> list[dict]:
    """Every strategy on base + perturbed copies (each copy's statistics: the base model's, a stand-in that has
    the right names and shapes), CPU vs device."""
    from safetensors.torch import load_file, save_file

    from gittheta_merge.errors import UsageError
    from gittheta_merge.merge import strategies
    from gittheta_merge.merge.api import merge_files

    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    paths = [work / "base.safetensors"] + [work / f"ft{i}.safetensors" for i in range(3)]
    save_file(base, str(paths[0]))
    for p in paths[1:]:
        save_file({k: (v + 0.01 * v.float().std().nan_to_num(1.0) * torch.randn(v.shape, generator=gen)).to(v.dtype)
                   if v.is_floating_point() else v for k, v in base.items()}, str(p))
    rows = []
    for name in strategies.all_names():
        row: dict[str, Any] = {"strategy": name}

        def both(n: int, name: str = name) -> tuple[dict[str, dict], dict[str, float]]:
            kinds = strategies.get(name)({}, n).stat_kinds()
            stats = {k: [str(stat_files[k])] * n for k in kinds} or None
            outs, times = {}, {}
            for dev in ("cpu", device):
                path = work / f"{name}-{dev.replace(':', '')}.safetensors"
                t0 = time.perf_counter()
                merge_files(paths[1:1 + n], path, base=paths[0], strategy=name, stats=stats, device=dev,
                            progress=False)
                times[dev] = time.perf_counter() - t0
                outs[dev] = load_file(str(path))
            return outs, times

        try:
            n = 3
            try:
                outs, times = both(n)
            except UsageError as exc:
                if "exactly 2" not in str(exc):
                    raise
                n = 2  # slerp, nuslerp
                outs, times = both(n)
            cpu, dev_out = outs["cpu"], outs[device]
            row["models"] = n
            row["same_names"] = sorted(cpu) == sorted(dev_out)
            row["max_rel_diff"] = max(rel_diff(cpu[k], dev_out[k]) for k in cpu if cpu[k].is_floating_point())
            row["ok"] = row["same_names"] and row["max_rel_diff"] <= TOL
            row.update({"cpu_s": round(times["cpu"], 2), "device_s": round(times[device], 2)})
        except Exception as exc:  # noqa: BLE001 - the report says what broke and goes on
            row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        rows.append(row)
    return rows


def time_ties(size: float, device: str, work: Path) -> dict[str, Any]:
    from merge import make_models

    from gittheta_merge.merge.api import merge_files

    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = make_models(work, size)
    made_s = time.perf_counter() - t0
    out: dict[str, Any] = {"size": size, "bytes_per_model": paths["base"].stat().st_size,
                           "make_models_s": round(made_s, 1)}
    results = {}
    for dev in ("cpu", device):
        t0 = time.perf_counter()
        merge_files([paths["ft1"], paths["ft2"]], work / f"ties-{dev.replace(':', '')}.safetensors",
                    base=paths["base"], strategy="ties", params={"density": 0.2}, device=dev, progress=False)
        out[f"{dev}_s"] = round(time.perf_counter() - t0, 2)
        results[dev] = work / f"ties-{dev.replace(':', '')}.safetensors"
    from safetensors import safe_open

    worst = 0.0
    with safe_open(str(results["cpu"]), "pt") as a, safe_open(str(results[device]), "pt") as b:
        for k in a.keys():
            worst = max(worst, rel_diff(a.get_tensor(k), b.get_tensor(k)))
    out["max_rel_diff"] = worst
    out["ratio_cpu_over_device"] = round(out["cpu_s"] / max(out[f"{device}_s"], 1e-9), 2)
    return out


def report(r: dict[str, Any]) -> str:
    lines = [f"# GPU path vs CPU: `{r['command']}`", "",
             f"Device: {r['device_name']}; torch {r['torch']}; CPU threads {r['threads']}; {r['platform']}; "
             f"{r['wall_s']:.0f} s in all. Tolerance: max |device - cpu| / max |cpu| <= {TOL:g} per tensor.", "",
             "## Statistics", "", "| kind | max rel. diff | cpu s | device s | ok |", "|---|---|---|---|---|"]
    for row in r["stats"]:
        lines.append(f"| {row['kind']} | {row.get('max_rel_diff', float('nan')):.2e} | {row.get('cpu_s', '-')} | "
                     f"{row.get('device_s', '-')} | {'yes' if row['ok'] else 'NO: ' + row.get('error', '')} |")
    lines += ["", "## Merges (every strategy)", "", "| strategy | models | max rel. diff | cpu s | device s | ok |",
              "|---|---|---|---|---|---|"]
    for row in r["merges"]:
        lines.append(f"| {row['strategy']} | {row.get('models', '-')} | {row.get('max_rel_diff', float('nan')):.2e} "
                     f"| {row.get('cpu_s', '-')} | {row.get('device_s', '-')} | "
                     f"{'yes' if row['ok'] else 'NO: ' + row.get('error', 'over tolerance')} |")
    t = r.get("ties")
    if t:
        lines += ["", f"## TIES, base + 2 fine-tunes of {t['size']:.3g} parameters (bf16, "
                  f"{t['bytes_per_model'] / 1e6:.0f} MB each)", "",
                  f"CPU {t['cpu_s']} s, device {t[r['device'] + '_s']} s: the device is {t['ratio_cpu_over_device']}x "
                  f"the CPU's speed; results agree to {t['max_rel_diff']:.2e} relative."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=float, default=400e6, help="parameters of the timed TIES merge (0: skip)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    started = time.perf_counter()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    model, tok, examples = tiny_bert(work)
    stats_rows, files = check_stats(model, tok, examples, a.device, work)
    merge_rows = check_merges(model, a.device, work, files)
    ties = time_ties(a.size, a.device, work / "ties") if a.size else None
    r = {"command": " ".join(["python benchmarks/gpu_check.py", *sys.argv[1:]]), "device": a.device,
         "device_name": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu",
         "torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
         "stats": stats_rows, "merges": merge_rows, "ties": ties, "wall_s": time.perf_counter() - started}
    text = report(r)
    print(text)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "gpu_check.md").write_text(text)
        (a.out / "gpu_check.json").write_text(json.dumps(r, indent=1, default=str))
    sys.exit(0 if all(x["ok"] for x in stats_rows + merge_rows) else 1)


if __name__ == "__main__":
    main()
