"""Our merges against mergekit 0.1.5 itself, on a tiny Llama, for every method both tools have.

mergekit runs from its own virtualenv (scripts/reference-tools.sh makes `.reference/mergekit`; it needs its own
dependency set), found there or through the MERGEKIT_YAML variable; without it these tests skip and say why. All
mergekit configurations run in one mergekit process, ours in-process (merge.api.merge_files), so the ~30 cases cost
seconds rather than minutes.
mergekit's `linear` is our `average`, its `task_arithmetic` ours, its `ties` our `ties_local` (our `ties` is the
paper's code: global top-k, so it differs from mergekit's by definition)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def mergekit_yaml() -> str | None:
    for candidate in (os.environ.get("MERGEKIT_YAML"), str(ROOT / ".reference" / "mergekit" / "bin" / "mergekit-yaml"),
                      shutil.which("mergekit-yaml")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


pytestmark = pytest.mark.skipif(mergekit_yaml() is None,
                                reason="mergekit 0.1.5 not installed (bash scripts/reference-tools.sh installs it)")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random Llama and three fine-tunes of it (every tensor moved), as Hugging Face directories."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("mk")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    base = LlamaForCausalLM(cfg)
    dirs = {"base": root / "base"}
    base.save_pretrained(dirs["base"])
    for i in range(3):
        ft = LlamaForCausalLM(cfg)
        gen = torch.Generator().manual_seed(100 + i)
        state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.state_dict().items()}
        ft.load_state_dict(state)
        dirs[f"ft{i}"] = root / f"ft{i}"
        ft.save_pretrained(dirs[f"ft{i}"])
    torch.manual_seed(7)
    dirs["other"] = root / "other"  # an independent initialisation: far from ft0, so SLERP takes its spherical branch
    LlamaForCausalLM(cfg).save_pretrained(dirs["other"])
    return dirs


def mergekit_lines(models: dict[str, Path], method: str, per_model: list[dict[str, float]] | None,
                   inputs: tuple[str, ...], base: str | None, shared: dict[str, float] | None) -> list[str]:
    """A mergekit YAML: per_model holds one parameter table per input (None: no per-model parameters)."""
    lines = [f"merge_method: {method}", "dtype: float32"] + ([f"base_model: {models[base]}"] if base else [])
    lines.append("models:")
    for k, name in enumerate(inputs):
        lines.append(f"  - model: {models[name]}")
        if per_model and per_model[k]:
            lines.append("    parameters: {" + ", ".join(f"{a}: {v}" for a, v in per_model[k].items()) + "}")
    if shared:
        lines.append("parameters: {" + ", ".join(f"{k}: {v}" for k, v in shared.items()) + "}")
    return lines


RUN_ALL = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
args = sys.argv[1:]
for cfg, out in zip(args[::2], args[1::2]):
    with open(cfg) as fh:
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(fh)), out,
                  MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
"""


def run_mergekit_all(jobs: dict[str, list[str]], work: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every configuration in one mergekit process (its start-up, ~4 s, paid once), outputs by job name."""
    args = []
    for name, lines in jobs.items():
        (work / f"{name}.yml").write_text("\n".join(lines) + "\n")
        args += [str(work / f"{name}.yml"), str(work / name)]
    python = Path(mergekit_yaml()).parent / "python"
    proc = subprocess.run([str(python), "-c", RUN_ALL, *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {}
    for name in jobs:
        merged: dict[str, torch.Tensor] = {}
        for shard in sorted((work / name).glob("*.safetensors")):
            merged.update(load_file(str(shard)))
        results[name] = merged
    return results


def run_ours(models: dict[str, Path], out: Path, strategy: str, sets: list[str], inputs: tuple[str, ...],
             base: str | None) -> dict[str, torch.Tensor]:
    from gittheta_merge.merge.api import merge_files

    merge_files([models[n] / "model.safetensors" for n in inputs], out,
                base=models[base] / "model.safetensors" if base else None, strategy=strategy,
                params=dict(item.split("=", 1) for item in sets), progress=False)
    return load_file(str(out))


FT = ("ft0", "ft1", "ft2")
CASES = [  # ours, its --set, mergekit's method, per-model parameters, shared parameters, inputs, base
    ("average", [], "linear", {"weight": 1.0}, None, FT, None),
    ("task_arithmetic", [], "task_arithmetic", {"weight": 1.0}, None, FT, "base"),
    ("ties_local", ["density=0.3"], "ties", {"weight": 1.0, "density": 0.3}, {"normalize": "true"}, FT, "base"),
    ("ties_local", ["density=0.05"], "ties", {"weight": 1.0, "density": 0.05}, {"normalize": "true"}, FT, "base"),
    ("slerp", ["t=0.3"], "slerp", {}, {"t": 0.3}, ("ft0", "other"), "ft0"),  # the spherical branch
    ("slerp", ["t=0.7"], "slerp", {}, {"t": 0.7}, ("ft0", "ft1"), "ft0"),  # nearly collinear: linear
    ("breadcrumbs", ["density=0.6", "gamma=0.05"], "breadcrumbs", {"weight": 1.0, "density": 0.6, "gamma": 0.05},
     None, FT, "base"),
    ("breadcrumbs", ["density=0.5", "gamma=0.1", "weights=0.7,1.0,0.4", "normalize=true", "rescale=true",
                     "lambda=0.8"], "breadcrumbs", None, {"normalize": "true", "rescale": "true", "lambda": 0.8},
     FT, "base"),
    ("breadcrumbs_ties", ["density=0.6", "gamma=0.05"], "breadcrumbs_ties",
     {"weight": 1.0, "density": 0.6, "gamma": 0.05}, None, FT, "base"),
    ("breadcrumbs_ties", ["density=0.4", "gamma=0.02", "normalize=true"], "breadcrumbs_ties",
     {"weight": 1.0, "density": 0.4, "gamma": 0.02}, {"normalize": "true"}, FT, "base"),
]
CASES += [
    ("model_stock", [], "model_stock", None, None, FT, "base"),
    ("model_stock", ["filter_wise=true"], "model_stock", None, {"filter_wise": "true"}, FT, "base"),
    ("model_stock", [], "model_stock", None, None, ("ft0", "ft1"), "base"),
]
CASES += [
    ("karcher", [], "karcher", None, None, FT, None),
    ("karcher", [], "karcher", None, None, ("ft0", "other"), None),
    ("nuslerp", ["weights=1,3"], "nuslerp", None, None, ("ft0", "other"), None),
    ("nuslerp", ["weights=2,1", "vectors=rows"], "nuslerp", None, {"nuslerp_flatten": "false"}, ("ft0", "other"), None),
    ("nuslerp", ["weights=1,1", "vectors=columns"], "nuslerp", None,
     {"nuslerp_flatten": "false", "nuslerp_row_wise": "true"}, ("ft1", "ft2"), "base"),
]
CASES += [
    ("sce", [], "sce", None, None, FT, "base"),
    ("sce", ["select_topk=0.3"], "sce", None, {"select_topk": 0.3}, FT, "base"),
]
CASES += [  # the random families at density 1 (nothing dropped): their deterministic parts, exactly
    ("dare_ties", [], "dare_ties", {"weight": 1.0}, None, FT, "base"),
    ("dare_linear", ["weights=0.7,1.0,0.4", "normalize=true"], "dare_linear", None, {"normalize": "true"}, FT,
     "base"),
    ("della", [], "della", {"weight": 1.0}, None, FT, "base"),
    ("della_linear", ["lambda=0.9"], "della_linear", {"weight": 1.0}, {"lambda": 0.9}, FT, "base"),
]
PER_MODEL_WEIGHTS = {"dare_linear": [{"weight": w} for w in (0.7, 1.0, 0.4)]}
NUSLERP_WEIGHTS = {"1,3": (1, 3), "2,1": (2, 1), "1,1": (1, 1)}
PER_MODEL = {7: [{"weight": w, "density": 0.5, "gamma": 0.1} for w in (0.7, 1.0, 0.4)]}  # case 7: weights differ


KEEP_RATE = {"dare_linear": {}, "della_linear": {"epsilon": 0.2}}
KEEP_DENSITY = 0.4


def case_lines(models: dict[str, Path], case: int) -> list[str]:
    ours, sets, theirs, params, shared, inputs, base = CASES[case]
    if theirs == "nuslerp":  # per-model weights
        per_model = [{"weight": x} for x in NUSLERP_WEIGHTS[sets[0].split("=")[1]]]
    elif theirs in PER_MODEL_WEIGHTS and params is None:
        per_model = PER_MODEL_WEIGHTS[theirs]
    elif case in PER_MODEL:
        per_model = PER_MODEL[case]
    else:
        per_model = [params or {}] * len(inputs)
    return mergekit_lines(models, theirs, per_model, inputs, base, shared)


@pytest.fixture(scope="module")
def mergekit_outputs(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    jobs = {f"case{i}": case_lines(models, i) for i in range(len(CASES))}
    for method, extra in KEEP_RATE.items():  # one model counts (the second has weight 0), rescale off
        jobs[f"keep-{method}"] = mergekit_lines(
            models, method, [{"weight": w, "density": KEEP_DENSITY, **extra} for w in (1.0, 0.0)], ("ft0", "ft1"),
            "base", {"rescale": "false"})
    for name, text in CONFIGS.items():  # the same YAML files that `merge-files --config` reads
        jobs[f"config-{name}"] = config_text(models, text).splitlines()
    return run_mergekit_all(jobs, tmp_path_factory.mktemp("mergekit"))


# mergekit configurations run unchanged through `git theta merge-files --config` (merge/mergekit_config.py):
# per-model parameters that differ, gradients over the 3 layers (t = 0, 0.5, 1), filters, shared parameters
CONFIGS = {
    "ties-per-model": """
merge_method: ties
base_model: {base}
models:
  - model: {ft0}
    parameters: {{weight: 0.7, density: 0.5}}
  - model: {ft1}
    parameters: {{weight: 1.0, density: 0.3}}
  - model: {ft2}
    parameters: {{weight: 0.4, density: [0.2, 0.9]}}
parameters: {{normalize: true, int8_mask: true}}
dtype: float32
""",
    "slerp-gradients-and-filters": """
merge_method: slerp
base_model: {ft0}
models:
  - model: {ft0}
  - model: {other}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    "task-arithmetic-gradient-weights": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft0}
    parameters:
      weight: [0.2, 1.0]
  - model: {ft1}
    parameters:
      weight: [{{filter: mlp, value: 0.1}}, {{value: 0.9}}]
parameters: {{normalize: true, lambda: 0.8}}
dtype: float32
""",
    "linear-filtered": """
merge_method: linear
models:
  - model: {ft0}
    parameters:
      weight: [{{filter: embed_tokens, value: 3.0}}, {{value: 1.0}}]
  - model: {ft1}
    parameters: {{weight: 2.0}}
  - model: {ft2}
    parameters: {{weight: 0.5}}
dtype: float32
""",
    "breadcrumbs-ties-per-model-gamma": """
merge_method: breadcrumbs_ties
base_model: {base}
models:
  - model: {base}
  - model: {ft0}
    parameters: {{weight: 1.0, density: 0.6, gamma: 0.05}}
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.4, gamma: 0.1}}
dtype: float32
""",
    "task-arithmetic-out-bf16": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft0}
    parameters: {{weight: 0.6}}
  - model: {ft1}
    parameters: {{weight: [{{filter: embed_tokens, value: 0.0}}, {{value: 0.4}}]}}
parameters: {{lambda: 1.5}}
dtype: float32
out_dtype: bfloat16
""",
    "nuslerp-rows": """
merge_method: nuslerp
models:
  - model: {ft0}
    parameters: {{weight: 2.0}}
  - model: {other}
    parameters: {{weight: 1.0}}
parameters: {{nuslerp_flatten: false}}
dtype: float32
""",
}


def config_text(models: dict[str, Path], text: str) -> str:
    return text.format(**{k: str(v) for k, v in models.items()}).lstrip()


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    """Equal within 1e-6 of the largest value; in bf16 (out_dtype), within one bf16 rounding step of each value."""
    assert set(got) == set(expected), what
    for name, want in expected.items():
        assert got[name].dtype == want.dtype, (what, name, got[name].dtype, want.dtype)
        have, want = got[name].to(torch.float32), want.to(torch.float32)
        scale = want.abs().max().item()
        worst = (have - want).abs().max().item()
        if got[name].dtype == torch.bfloat16:
            assert bool(((have - want).abs() <= 2 ** -7 * want.abs() + 1e-30).all()), f"{what}: {name} (bf16)"
            differ = (have != want).float().mean().item()
            assert differ < 0.01, f"{what}: {name}: {differ:.2%} of the bf16 values differ"
            continue
        assert worst <= 1e-6 * max(scale, 1e-12), f"{what}: {name}: max |diff| {worst:.3g} (max |value| {scale:.3g})"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mergekit_configuration_runs_unchanged(models: dict[str, Path], mergekit_outputs: dict[str, dict],
                                               tmp_path: Path, name: str) -> None:
    from gittheta_merge.merge.mergekit_config import merge_files_config

    cfg = tmp_path / "merge.yml"
    cfg.write_text(config_text(models, CONFIGS[name]))
    merge_files_config(cfg, tmp_path / "ours.safetensors", progress=False)
    assert_same(load_file(str(tmp_path / "ours.safetensors")), mergekit_outputs[f"config-{name}"], name)


def test_configuration_to_a_hugging_face_directory(models: dict[str, Path], mergekit_outputs: dict[str, dict],
                                                   tmp_path: Path) -> None:
    """merge-files --config with a directory output: weights, the base's config and a model card that records
    the merge; transformers loads it."""
    import subprocess
    import sys

    from transformers import LlamaForCausalLM

    cfg = tmp_path / "merge.yml"
    cfg.write_text(config_text(models, CONFIGS["ties-per-model"]))
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "gittheta_merge", "merge-files", "--config", str(cfg), "-o",
                           str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").read_text() == (models["base"] / "config.json").read_text()
    card = (out / "README.md").read_text()
    assert "mergekit method `ties`" in card and str(models["ft2"]) in card and "density: [0.2, 0.9]" not in card
    assert "density:" in card and "- base: " + str(models["base"]) in card
    model = LlamaForCausalLM.from_pretrained(out)
    assert_same({k: v for k, v in model.state_dict().items() if k in mergekit_outputs["config-ties-per-model"]},
                mergekit_outputs["config-ties-per-model"], "directory output")


def test_unsupported_configuration_keys_are_named(tmp_path: Path) -> None:
    from gittheta_merge.errors import UsageError
    from gittheta_merge.merge.mergekit_config import plan

    with pytest.raises(UsageError, match="`slices` is not supported: frankenmerges"):
        plan({"merge_method": "linear", "slices": [], "models": ["a"]}, ["w"])
    with pytest.raises(UsageError, match="merge_method 'passthrough' is not supported"):
        plan({"merge_method": "passthrough", "models": ["a", "b"]}, ["w"])
    with pytest.raises(UsageError, match="parameter `t` is not one merge_method ties takes"):
        plan({"merge_method": "ties", "base_model": "b", "models": ["a"], "parameters": {"t": 0.5}}, ["w"])
    with pytest.raises(UsageError, match="needs base_model"):
        plan({"merge_method": "ties", "models": ["a", "c"]}, ["w"])
    with pytest.raises(UsageError, match="unknown key `merge_methd`"):
        plan({"merge_methd": "ties", "models": ["a"]}, ["w"])


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{' '.join(c[1])}" for c in CASES])
def test_equals_mergekit(models: dict[str, Path], mergekit_outputs: dict[str, dict], tmp_path: Path,
                         case: int) -> None:
    ours, sets, theirs, _, _, inputs, base = CASES[case]
    expected = mergekit_outputs[f"case{case}"]
    got = run_ours(models, tmp_path / "ours.safetensors", ours, sets, inputs, base)
    assert set(got) == set(expected)
    for name, want in expected.items():
        have = got[name].to(torch.float32)
        scale = want.abs().max().item()
        worst = (have - want).abs().max().item()
        assert worst <= 1e-6 * max(scale, 1e-12), f"{ours} vs mergekit {theirs}: {name}: max |diff| {worst:.3g} " \
                                                  f"(max |value| {scale:.3g})"


@pytest.mark.parametrize("method", sorted(KEEP_RATE))
def test_random_sparsification_keeps_what_mergekit_keeps(models: dict[str, Path], mergekit_outputs: dict[str, dict],
                                                         tmp_path: Path, method: str) -> None:
    """One model counts (the second has weight 0), rescale off: the merged tensor is base + mask * tau, so the
    fraction of entries that moved is the
    keep rate. Ours (our seeded stream) and mergekit's (torch's RNG) must both keep density of the entries, within
    binomial noise, over the whole model; for della the largest-magnitude half must keep more than the smallest."""
    density, extra = KEEP_DENSITY, KEEP_RATE[method]
    theirs = mergekit_outputs[f"keep-{method}"]
    ours = run_ours(models, tmp_path / "ours.safetensors", method,
                    [f"density={density}", "rescale=false", "weights=1,0", *(f"{k}={v}" for k, v in extra.items())],
                    ("ft0", "ft1"), "base")
    base = load_file(str(models["base"] / "model.safetensors"))
    tuned = load_file(str(models["ft0"] / "model.safetensors"))
    for merged in (theirs, ours):
        kept = total = big_kept = big_total = 0
        for name, b in base.items():
            moved = merged[name].to(torch.float32) != b
            kept += int(moved.sum())
            total += moved.numel()
            if method.startswith("della") and b.dim() == 2:
                tau = (tuned[name] - b).abs()
                big = tau >= tau.median(dim=1, keepdim=True).values
                big_kept += int((moved & big).sum())
                big_total += int(big.sum())
        sigma = (density * (1 - density) / total) ** 0.5
        assert abs(kept / total - density) < 5 * sigma, (method, kept / total)
        if big_total:
            small_rate = (kept - big_kept) / (total - big_total)
            assert big_kept / big_total > small_rate + 0.05, (method, big_kept / big_total, small_rate)
