"""PEFT LoRA adapters (a directory with adapter_config.json and adapter_model.safetensors), merged two ways:

* into one adapter, with the combinations of PEFT's `add_weighted_adapter` and their exact definitions
  (peft 0.21.2, tuners/lora/model.py and utils/merge_utils.py; tests/e2e/test_adapters.py compares with it):
    linear, ties, dare_linear, dare_ties, magnitude_prune: the A matrices and the B matrices combined separately,
      A with sqrt(|w s|) sign(w s), B with sqrt(|w s|) (s = the adapter's scaling); all ranks equal;
    cat: A_i w_i s_i stacked along the rank, B_i side by side (rank = the sum of the ranks): exactly
      sum_i w_i s_i B_i A_i;
    svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd: each delta W_i = s_i B_i A_i combined, then a
      truncated SVD (rank svd_rank, default the largest rank): B = U_r diag(S_r), A = Vh_r, optionally clamped at
      the svd_clamp quantile of their entries;
  the merged adapter has r = lora_alpha = its rank (scaling 1) and the union of the target modules. Per PEFT's
  definitions: magnitude pruning keeps int(density n) entries; ties elects the sign of the sum (total) or of the
  count (frequency) of the pruned, unweighted tensors and divides by how many agree; dare keeps each entry with
  probability density and rescales by 1/density (our seeded stream, not torch's global RNG: equal in expectation).
* into a full model: each adapter is read as the model base + s B A (`AdapterModelSource`), one row range at a
  time, so any of our strategies (TIES, DARE, TSV, …) merges the delta weights and no delta is ever held whole
  for more than the tensor being merged.
One module (its A, B and, for the SVD family, its delta weight) is in memory at a time.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gittheta_merge.errors import InputError, UsageError
from gittheta_merge.merge.sources import SafetensorsSource, TensorInfo

LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
PREFIX = "base_model.model."
COMBINATIONS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
SAME_RANK = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern: the first key that matches the module name's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class Adapter:
    """One PEFT LoRA adapter directory: its configuration and its A/B matrices by module."""

    path: Path
    config: dict[str, Any]
    source: SafetensorsSource
    modules: dict[str, tuple[str, str]]  # module -> (key of lora_A, key of lora_B)

    @classmethod
    def open(cls, path: str | Path) -> Adapter:
        """A directory, or `REV:DIR` for the adapter a branch or commit holds (tracked or plain files alike)."""
        path = Path(path) if Path(path).exists() or ":" not in str(path) else from_revision(str(path))
        cfg_path, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
        if not cfg_path.is_file() or not weights.is_file():
            raise UsageError(f"{path}: not a PEFT adapter directory (needs adapter_config.json and "
                             "adapter_model.safetensors)")
        from gittheta_merge.errors import loads_untrusted

        config = loads_untrusted(cfg_path.read_text(), str(cfg_path), "adapter_config.json")
        if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
            raise UsageError(f"{cfg_path}: only LoRA adapters are merged (peft_type {config.get('peft_type')!r})")
        if config.get("use_dora"):
            raise UsageError(f"{cfg_path}: DoRA adapters (use_dora) are not merged: their magnitude vectors are not "
                             "a low-rank delta")
        source = SafetensorsSource(weights)
        pairs: dict[str, dict[str, str]] = {}
        for name in source.names():
            m = LORA_KEY.match(name)
            if m is None:
                if "lora_embedding" in name or "lora_magnitude" in name:
                    raise UsageError(f"{weights}: tensor {name!r}: embedding LoRA and DoRA tensors are not merged")
                continue  # modules_to_save copies and the like: not part of the low-rank delta
            pairs.setdefault(m.group("module"), {})[m.group("which")] = name
        modules = {}
        for module, both in pairs.items():
            if set(both) != {"A", "B"}:
                raise InputError(f"{weights}: module {module!r} has lora_{next(iter(both))} without its partner")
            modules[module] = (both["A"], both["B"])
        if not modules:
            raise InputError(f"{weights}: no lora_A / lora_B tensors")
        return cls(path, config, source, modules)

    def rank(self, module: str) -> int:
        return int(_pattern_value(self.config.get("rank_pattern") or {}, module, self.config.get("r", 8)))

    def scaling(self, module: str) -> float:
        """lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (PEFT's LoraLayer.update_layer)."""
        alpha = float(_pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", 8)))
        r = self.rank(module)
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def max_rank(self) -> int:
        return max([int(self.config.get("r", 8)), *map(int, (self.config.get("rank_pattern") or {}).values())])

    def matrices(self, module: str) -> tuple[Any, Any]:
        """(A [r, in], B [out, r]) in float32."""
        a_key, b_key = self.modules[module]
        a_info, b_info = self.source.info(a_key), self.source.info(b_key)
        assert a_info is not None and b_info is not None
        return self.source.read_rows(a_key, 0, a_info.rows), self.source.read_rows(b_key, 0, b_info.rows)

    def delta(self, module: str, start: int = 0, end: int | None = None) -> Any:
        """Rows [start, end) of the module's weight update in the base model's layout: s B A, or its transpose
        for fan_in_fan_out layers (GPT-2's Conv1D), as PEFT's get_delta_weight."""
        a, b = self.matrices(module)
        s = self.scaling(module)
        if self.config.get("fan_in_fan_out"):
            return (b @ a[:, start:end]).T * s
        return (b[start:end] @ a) * s


def from_revision(ref: str) -> Path:
    """Check `REV:DIR`'s adapter files out of git into a temporary directory (an adapter is megabytes, not a model):
    a tracked adapter_model.safetensors is rebuilt from its metadata and objects (fetched if missing) by the same
    smudge as a checkout, whatever the work tree's attributes say."""
    import atexit
    import shutil
    import subprocess
    import tempfile

    from gittheta_merge.filter.process import Filter
    from gittheta_merge.storage.gitutil import Repo

    rev, _, folder = ref.partition(":")
    repo = Repo.discover()
    target = Path(tempfile.mkdtemp(prefix="theta-adapter-"))
    atexit.register(shutil.rmtree, target, True)
    folder = folder.strip("/")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        path = f"{folder}/{name}" if folder else name
        spec = f"{rev}:{path}"
        if subprocess.run(["git", "cat-file", "-e", spec], cwd=repo.root, capture_output=True).returncode != 0:
            raise UsageError(f"{ref}: no {name} at {spec} (REV:DIR names an adapter directory in a commit)")
        with open(target / name, "wb") as out:
            Filter(repo).smudge_full(path, repo.git("cat-file", "blob", spec), out)
    return target


# -- PEFT's task-tensor combinations (utils/merge_utils.py), on a list of same-shape float32 tensors ----------------
def _prune_magnitude(t: Any, density: float) -> Any:
    import torch

    if density >= 1:
        return t
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    k = int(density * t.numel())
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * mask.reshape(t.shape)


def _prune_random(t: Any, density: float, seed: int, name: str, model: int) -> Any:
    from gittheta_merge.merge.strategies.dare import uniforms

    if density >= 1:
        return t
    keep = (uniforms(seed, name, model, list(t.shape)) < density).to(t.dtype)
    return t * keep / density


def combine(kind: str, tensors: list[Any], weights: list[float], density: float, sign_method: str,
            seed: int, name: str) -> Any:
    """One of PEFT's task-tensor merges: task_arithmetic, magnitude_prune, ties, dare_linear, dare_ties."""
    import torch

    if kind in ("magnitude_prune", "ties"):
        tensors = [_prune_magnitude(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [_prune_random(t, density, seed, name, i) for i, t in enumerate(tensors)]
    stacked = torch.stack(tensors)
    w = torch.tensor(weights, dtype=stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))
    if kind not in ("ties", "dare_ties"):
        return (stacked * w).sum(dim=0)
    magnitude = stacked.sum(dim=0) if sign_method == "total" else stacked.sign().sum(dim=0)
    majority = torch.where(magnitude >= 0, 1.0, -1.0)
    agree = (stacked.sign() == majority).to(stacked.dtype)
    return (stacked * w * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)


def merge_adapters(paths: list[str | Path], output: str | Path, weights: list[float] | None = None,
                   combination: str = "svd", density: float = 1.0, svd_rank: int | None = None,
                   svd_clamp: float | None = None, majority_sign_method: str = "total", seed: int = 0,
                   svd_full_matrices: bool = True) -> dict[str, Any]:
    """Merge PEFT LoRA adapters into one adapter directory (see the module docstring); returns a small report."""
    import torch
    from safetensors.torch import save_file

    if combination not in COMBINATIONS:
        raise UsageError(f"combination {combination!r}: one of {', '.join(COMBINATIONS)}")
    if majority_sign_method not in ("total", "frequency"):
        raise UsageError(f"majority_sign_method {majority_sign_method!r}: total or frequency")
    adapters = [Adapter.open(p) for p in paths]
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise UsageError(f"{len(weights)} weights for {len(adapters)} adapters")
    if not 0 <= density <= 1:
        raise UsageError(f"density must be in [0, 1], got {density}")
    if len(adapters) == 1:
        combination = "linear"  # as PEFT: one adapter can only be scaled
    ranks = [a.max_rank() for a in adapters]
    if combination in SAME_RANK and len(set(ranks)) != 1:
        raise UsageError(f"combination {combination} needs adapters of one rank (got {ranks}); use cat or svd")
    new_rank = sum(ranks) if combination == "cat" else (svd_rank or max(ranks)) if combination.endswith("svd") \
        else ranks[0]
    modules = list(dict.fromkeys(m for a in adapters for m in a.modules))
    out: dict[str, Any] = {}
    for module in modules:
        have = [(a, w) for a, w in zip(adapters, weights) if module in a.modules]
        a_key, b_key = next(a.modules[module] for a, _ in have)
        a_dtype = dtype_of(have[0][0], a_key)
        if combination == "cat":
            parts_a, parts_b = [], []
            for adapter, w in have:
                mat_a, mat_b = adapter.matrices(module)
                parts_a.append(mat_a * w * adapter.scaling(module))
                parts_b.append(mat_b)
            cat_a, cat_b = torch.cat(parts_a, dim=0), torch.cat(parts_b, dim=1)
            new_a = torch.zeros(new_rank, cat_a.shape[1])
            new_b = torch.zeros(cat_b.shape[0], new_rank)
            new_a[: cat_a.shape[0]], new_b[:, : cat_b.shape[1]] = cat_a, cat_b
        elif combination.endswith("svd"):
            kind = {"svd": "task_arithmetic"}.get(combination, combination[: -len("_svd")])
            deltas = []
            for adapter, _ in have:
                mat_a, mat_b = adapter.matrices(module)
                deltas.append((mat_b @ mat_a) * adapter.scaling(module))  # in the LoRA layout (fan_in_fan_out too)
            delta = combine(kind, deltas, [w for _, w in have], density, majority_sign_method, seed, module)
            u, s, vh = torch.linalg.svd(delta, full_matrices=svd_full_matrices)
            new_b, new_a = u[:, :new_rank] @ torch.diag(s[:new_rank]), vh[:new_rank, :]
            if svd_clamp is not None:
                high = torch.quantile(torch.cat([new_b.flatten(), new_a.flatten()]), svd_clamp)
                new_b, new_a = new_b.clamp(-high, high), new_a.clamp(-high, high)
        else:
            kind = "task_arithmetic" if combination == "linear" else combination
            mats = [adapter.matrices(module) for adapter, _ in have]
            signed = [w * adapter.scaling(module) for adapter, w in have]
            w_a = [math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in signed]
            w_b = [math.sqrt(abs(x)) for x in signed]
            new_a = combine(kind, [m[0] for m in mats], w_a, density, majority_sign_method, seed, module + ".A")
            new_b = combine(kind, [m[1] for m in mats], w_b, density, majority_sign_method, seed, module + ".B")
        out[a_key] = new_a.contiguous().to(a_dtype)
        out[b_key] = new_b.contiguous().to(a_dtype)
    target = Path(output)
    target.mkdir(parents=True, exist_ok=True)
    save_file(out, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = dict(adapters[0].config)
    config.update(r=new_rank, lora_alpha=new_rank, rank_pattern={}, alpha_pattern={},
                  target_modules=_union_targets([a.config.get("target_modules") for a in adapters]))
    config.pop("use_rslora", None)  # scaling 1 = r / r; rslora would make it sqrt(r)
    (target / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"combination": combination, "rank": new_rank, "modules": len(modules), "adapters": [str(p) for p in paths]}


def dtype_of(adapter: Adapter, key: str) -> Any:
    from gittheta_merge import dtypes

    info = adapter.source.info(key)
    assert info is not None
    return dtypes.to_torch(info.dtype)


def _union_targets(targets: list[Any]) -> Any:
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets) if len(targets) > 1 else targets[0]
    if any(isinstance(t, str) for t in targets):
        raise UsageError("the adapters' target_modules mix a regex string and a list; PEFT cannot combine them either")
    return sorted(set().union(*[set(t or []) for t in targets]))


# -- a full model: base + s B A, read a row range at a time -------------------------------------------------------
class AdapterModelSource:
    """The base model with one adapter's delta added, as a merge source: tensors the adapter does not touch read
    from the base (and share its identity, so the plan keeps them without reading); targeted weights are the base
    rows plus the delta's rows, computed in float32 for each row range the engine asks for."""

    ordered_reads = False

    def __init__(self, base: SafetensorsSource, adapter: Adapter | None, label: str) -> None:
        """adapter None: the base itself, with the identities that let the plan see untouched tensors as equal."""
        self.base = base
        self.adapter = adapter
        self.label = label
        self.targets: dict[str, str] = {}  # base tensor name -> module
        names = set(base.names())
        for module in adapter.modules if adapter else []:
            name = (module[len(PREFIX):] if module.startswith(PREFIX) else module) + ".weight"
            if name not in names:
                raise InputError(f"{adapter.path}: module {module!r} has no weight {name!r} in the base model "
                                 f"{base.path}: is this adapter for another model?")
            self.targets[name] = module

    def names(self) -> list[str]:
        return self.base.names()

    def info(self, name: str) -> TensorInfo | None:
        info = self.base.info(name)
        if info is None:
            return None
        key = ("adapter", self.label, name) if name in self.targets else ("base", name)
        return TensorInfo(info.name, info.dtype, info.shape, key)

    def boundaries(self, name: str) -> list[int]:
        return self.base.boundaries(name)

    def read_rows(self, name: str, start: int, end: int) -> Any:
        rows = self.base.read_rows(name, start, end)
        if name in self.targets:
            assert self.adapter is not None
            rows = rows + self.adapter.delta(self.targets[name], start, end)
        return rows

    def read_raw(self, name: str, start: int, end: int) -> Any:
        if name not in self.targets:
            return self.base.read_raw(name, start, end)
        from gittheta_merge import dtypes
        from gittheta_merge.merge.sinks import byte_view

        info = self.base.info(name)
        assert info is not None
        return bytes(byte_view(self.read_rows(name, start, end).to(dtypes.to_torch(info.dtype)).contiguous()))


def adapter_sources(base: str | Path, adapters: list[str | Path]) -> tuple[AdapterModelSource, list[Any]]:
    """The base model and one AdapterModelSource per adapter directory (`merge-files --adapter`)."""
    base_src = SafetensorsSource(base)
    return (AdapterModelSource(base_src, None, "base"),
            [AdapterModelSource(base_src, Adapter.open(p), str(p)) for p in adapters])


def merge_adapter_models(base: str | Path, adapters: list[str | Path], output: str | Path, strategy: str = "average",
                         params: dict[str, Any] | None = None, rules: list[Any] | None = None,
                         report_path: str | Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """A full model from the base and N adapters: each adapter is the model base + s B A, merged by `strategy`
    over the base (task-vector strategies then merge the adapters' delta weights), written as safetensors."""
    from gittheta_merge.merge.api import _options, merge_into_file

    base_src, models = adapter_sources(base, adapters)
    if len(models) < 2:
        raise UsageError("name two or more adapters to merge (one adapter: PEFT's merge_and_unload)")
    options = _options(strategy, params, rules, labels=[str(a) for a in adapters], **kwargs)
    return merge_into_file(models, base_src, output, options, report_path=report_path,
                           file_metadata=base_src.base.file_metadata)
