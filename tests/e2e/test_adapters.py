"""PEFT LoRA adapters merged by us against peft 0.21.2 itself: `git theta merge-adapters` (PEFT's
add_weighted_adapter combinations) and `git theta merge-files --base B --adapter A …` (a full model: base + the
adapters' delta weights merged by our strategies) on a tiny Llama with random LoRA weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft", reason="peft 0.21.2 is a test extra (pip install -e .[dev])")

DETERMINISTIC = ["linear", "cat", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd"]


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama and four LoRA adapters of it (random A and B): three of rank 4, one of rank 2 with rsLoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lora")
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    dirs = {"base": root / "base"}
    specs = [("a0", 4, 8, False, ["q_proj", "v_proj"]), ("a1", 4, 16, False, ["q_proj", "v_proj"]),
             ("a2", 4, 4, False, ["q_proj", "v_proj", "down_proj"]), ("r2", 2, 8, True, ["q_proj", "v_proj"])]
    for i, (name, r, alpha, rslora, targets) in enumerate(specs):
        torch.manual_seed(100 + i)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"),
                               LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                                          use_rslora=rslora, lora_dropout=0.0))
        model.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def peft_combined(lora: dict[str, Path], names: list[str], weights: list[float], combination: str,
                  **kwargs: object) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT's own add_weighted_adapter result: (the adapter's tensors, its config)."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(lora["base"]), lora[names[0]],
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(lora[name], adapter_name=name)
    model.add_weighted_adapter(names, weights, "merged", combination_type=combination, **kwargs)
    state = get_peft_model_state_dict(model, adapter_name="merged")
    return {k: v.detach().clone() for k, v in state.items()}, model.peft_config["merged"].to_dict()


def products(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """B @ A per module (what a LoRA adds, up to the scaling), independent of the SVD's sign choices."""
    out = {}
    for key, a in state.items():
        if ".lora_A." in key:
            out[key.replace(".lora_A.", ".")] = state[key.replace(".lora_A.", ".lora_B.")].double() @ a.double()
    return out


@pytest.mark.parametrize("combination", DETERMINISTIC)
def test_merge_adapters_equals_peft(lora: dict[str, Path], tmp_path: Path, combination: str) -> None:
    from gittheta_merge.merge.adapters import merge_adapters

    same_rank = combination in ("linear", "ties", "magnitude_prune")
    names = ["a0", "a1", "a2"] if same_rank else ["a0", "a1", "r2"]
    weights = [1.0, 0.5, -0.7] if combination != "ties" else [1.0, 0.5, 0.7]
    kwargs = {"density": 0.5} if "prune" in combination or "ties" in combination else {}
    want, want_cfg = peft_combined(lora, names, weights, combination, **kwargs)
    merge_adapters([lora[n] for n in names], tmp_path / "out", weights, combination, **kwargs)  # type: ignore[arg-type]
    got = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (want_cfg["r"], want_cfg["lora_alpha"])
    assert set(cfg["target_modules"]) == set(want_cfg["target_modules"])
    assert set(got) == set(want)
    compare = products if combination.endswith("svd") else (lambda s: {k: v.double() for k, v in s.items()})
    for key, value in compare(want).items():
        have = compare(got)[key]
        scale = value.abs().max().item()
        assert (have - value).abs().max().item() <= 1e-5 * max(scale, 1e-12), (combination, key)


def test_merged_adapter_loads_in_peft_and_cat_is_exact(lora: dict[str, Path], tmp_path: Path) -> None:
    """cat is exact: the merged adapter (loaded back by PEFT) changes the model by sum_i w_i s_i B_i A_i."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    proc = subprocess.run([sys.executable, "-m", "gittheta_merge", "merge-adapters", str(lora["a0"]),
                           str(lora["r2"]), "-o", str(tmp_path / "cat"), "--combination", "cat", "--weights", "1,0.5"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "rank 6" in proc.stdout
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(lora["base"]), tmp_path / "cat")
    merged = merged.merge_and_unload().state_dict()
    singles = []
    for name, w in (("a0", 1.0), ("r2", 0.5)):
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(lora["base"]), lora[name])
        singles.append((model.merge_and_unload().state_dict(), w))
    base = LlamaForCausalLM.from_pretrained(lora["base"]).state_dict()
    for key, b in base.items():
        want = b + sum(w * (s[key] - b) for s, w in singles)
        assert torch.allclose(merged[key], want, atol=1e-6), key


def test_full_model_from_adapters_with_our_strategies(lora: dict[str, Path], tmp_path: Path) -> None:
    """merge-files --base B --adapter …: task arithmetic of the adapters' delta weights equals PEFT's merge of the
    adapters into the base; TIES over the deltas equals TIES over models PEFT merged one by one."""
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from gittheta_merge.merge.adapters import merge_adapter_models
    from gittheta_merge.merge.api import merge_files

    base_file = lora["base"] / "model.safetensors"
    out = tmp_path / "ta.safetensors"
    proc = subprocess.run([sys.executable, "-m", "gittheta_merge", "merge-files", "--base", str(base_file),
                           "--adapter", str(lora["a0"]), "--adapter", str(lora["a2"]), "-o", str(out),
                           "--strategy", "task_arithmetic"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = load_file(str(out))
    base = load_file(str(base_file))
    full = {}
    for name in ("a0", "a2"):
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(lora["base"]), lora[name])
        state = {k: v.contiguous() for k, v in model.merge_and_unload().state_dict().items() if k in base}
        full[name] = state
        save_file(state, tmp_path / f"{name}.safetensors")
    for key, b in base.items():
        want = b + (full["a0"][key] - b) + (full["a2"][key] - b)
        assert torch.allclose(got[key], want, atol=1e-6), key

    merge_adapter_models(base_file, [lora["a0"], lora["a2"]], tmp_path / "ties-adapters.safetensors", "ties",
                         {"density": 0.3}, progress=False)
    merge_files([tmp_path / "a0.safetensors", tmp_path / "a2.safetensors"], tmp_path / "ties-full.safetensors",
                base=base_file, strategy="ties", params={"density": 0.3}, progress=False)
    a, b = load_file(str(tmp_path / "ties-adapters.safetensors")), load_file(str(tmp_path / "ties-full.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_adapter_mistakes_are_one_line(lora: dict[str, Path], tmp_path: Path) -> None:
    for args, needle in (
        (["merge-adapters", str(lora["a0"]), str(lora["r2"]), "-o", str(tmp_path / "x"), "--combination", "linear"],
         "needs adapters of one rank"),
        (["merge-adapters", str(lora["a0"]), str(tmp_path), "-o", str(tmp_path / "x")], "not a PEFT adapter"),
        (["merge-adapters", str(lora["a0"]), str(lora["a1"]), "-o", str(tmp_path / "x"), "--combination", "nope"],
         "combination 'nope'"),
        (["merge-files", "--adapter", str(lora["a0"]), "-o", str(tmp_path / "y.safetensors")], "give --base"),
    ):
        proc = subprocess.run([sys.executable, "-m", "gittheta_merge", *args], capture_output=True, text=True)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr and needle in proc.stderr, proc.stderr


@pytest.mark.parametrize("combination", ["dare_linear", "dare_ties"])
def test_dare_combinations_keep_density_of_the_entries_reproducibly(lora: dict[str, Path], tmp_path: Path,
                                                                    combination: str) -> None:
    """PEFT draws dare's masks from torch's global RNG; ours come from a seeded stream: the same merge twice is
    identical, and with one adapter weighted (the other 0) the kept fraction is density within binomial noise and
    the kept entries are the adapter's, rescaled by sqrt(w s) / density."""
    from gittheta_merge.merge.adapters import Adapter, merge_adapters

    density = 0.4
    for run in ("x", "y"):
        merge_adapters([lora["a0"], lora["a1"]], tmp_path / run, [1.0, 0.0], combination, density=density, seed=3)
    x = load_file(str(tmp_path / "x" / "adapter_model.safetensors"))
    y = load_file(str(tmp_path / "y" / "adapter_model.safetensors"))
    assert all(torch.equal(x[k], y[k]) for k in x)
    if combination == "dare_ties":
        return  # the weight-0 adapter still votes in the sign election (PEFT's definition): no simple keep rate
    adapter = Adapter.open(lora["a0"])
    kept = total = 0
    for module, (a_key, _) in adapter.modules.items():
        a, _ = adapter.matrices(module)
        scale = (1.0 * adapter.scaling(module)) ** 0.5 / density
        moved = x[a_key] != 0
        kept += int(moved.sum())
        total += moved.numel()
        assert torch.allclose(x[a_key][moved], (a * scale)[moved], rtol=1e-5), module
    sigma = (density * (1 - density) / total) ** 0.5
    assert abs(kept / total - density) < 5 * sigma, kept / total


def test_adapters_on_branches_merge_by_revision(lora: dict[str, Path], tmp_path: Path) -> None:
    """Branches that each hold an adapter (tracked with git theta) merge with REV:DIR references: the result equals
    merging the directories themselves."""
    import shutil

    from conftest import git, init_repo

    from gittheta_merge.merge.adapters import merge_adapters

    repo = init_repo(tmp_path / "repo")
    git(repo, "theta", "track", "*.safetensors")
    git(repo, "commit", "-qm", "track", "--allow-empty")
    for branch, name in (("task-a", "a0"), ("task-b", "a1")):
        git(repo, "checkout", "-qb", branch, "main")
        shutil.copytree(lora[name], repo / "adapter", dirs_exist_ok=True)
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", branch)
    git(repo, "checkout", "-q", "main")
    stored = git(repo, "show", "task-a:adapter/adapter_model.safetensors").stdout
    assert stored.startswith(b'{"gittheta"')  # tracked per tensor, not as raw bytes
    proc = git(repo, "theta", "merge-adapters", "task-a:adapter", "task-b:adapter", "-o", "merged",
               "--combination", "svd", "--weights", "0.7,0.3")
    assert b"merged 2 adapters (svd, rank 4" in proc.stdout
    merge_adapters([lora["a0"], lora["a1"]], tmp_path / "direct", [0.7, 0.3], "svd")
    got = load_file(str(repo / "merged" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "direct" / "adapter_model.safetensors"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)
    bad = git(repo, "theta", "merge-adapters", "task-a:adapter", "task-b:nothere", "-o", "x", check=False)
    assert bad.returncode != 0 and b"no adapter_config.json at task-b:nothere/" in bad.stderr, bad.stderr


def test_fisher_of_an_adapter_is_staged_next_to_it(hf_repo: Path) -> None:
    """`git theta stats compute ADAPTER --config BASE --kind fisher`: the Fisher of the adapter's parameters only,
    keyed like adapter_model.safetensors, equal to per-example gradients squared computed here directly."""
    import json as _json

    import transformers
    from conftest import git
    from peft import LoraConfig, PeftModel, get_peft_model

    from gittheta_merge.stats import statistic_from_bytes
    from gittheta_merge.stats.attach import blob_path
    from gittheta_merge.storage.gitutil import Repo
    from gittheta_merge.storage.revisions import read_metadata
    from gittheta_merge.storage.store import ObjectStore

    torch.manual_seed(3)
    base = transformers.BertForSequenceClassification.from_pretrained(hf_repo / "model")
    get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                    init_lora_weights=False)).save_pretrained(hf_repo / "adapter")
    git(hf_repo, "theta", "track", "adapter")
    git(hf_repo, "add", "-A")
    git(hf_repo, "commit", "-qm", "adapter")
    out = git(hf_repo, "theta", "stats", "compute", "adapter", "--config", "model", "--kind", "fisher", "--data",
              "train.jsonl", "--n-examples", "5", "--batch-size", "2", "--max-length", "16")
    assert "staged fisher statistics for adapter/adapter_model.safetensors" in out.stdout.decode()
    repo = Repo.discover(hf_repo)
    meta = read_metadata(repo, ":", "adapter/adapter_model.safetensors")
    stored = statistic_from_bytes(blob_path(ObjectStore.for_repo(repo), meta, "fisher", "adapter").read_bytes())
    saved = set(load_file(hf_repo / "adapter" / "adapter_model.safetensors"))
    assert set(stored.tensors) == saved  # every adapter tensor, named as saved, and no base weight

    model = PeftModel.from_pretrained(transformers.BertForSequenceClassification.from_pretrained(hf_repo / "model"),
                                      hf_repo / "adapter", is_trainable=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_repo / "model")
    params = {k.replace(".default.", "."): p for k, p in model.named_parameters() if p.requires_grad}
    want = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    for line in (hf_repo / "train.jsonl").read_text().splitlines()[:5]:
        row = _json.loads(line)
        enc = tok(row["text"], return_tensors="pt", truncation=True, max_length=16)
        logp = torch.log_softmax(model(**enc).logits[0], dim=-1)[row["label"]]
        grads = torch.autograd.grad(logp, list(params.values()))
        for key, g in zip(params, grads):
            want[key] += g.double() ** 2
    for key, value in want.items():
        scale = value.abs().max().item()
        assert (stored.tensors[key].double() - value).abs().max().item() <= 1e-5 * max(scale, 1e-30), key
