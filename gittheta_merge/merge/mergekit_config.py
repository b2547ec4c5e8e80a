"""A mergekit configuration (YAML, as mergekit 0.1.5 reads it) turned into our merge: which strategy, which inputs
in which order, which base, and per tensor the parameters mergekit would use, so a mergekit user's file runs
unchanged (`git theta merge --config merge.yml`, `git theta merge-files --config merge.yml -o OUT`).

mergekit's parameter semantics, kept exactly (mergekit/config.py evaluate_setting, parameter_resolver.py):
* a value is a scalar; a list of numbers is a gradient over the layers, interpolated linearly at t; a list of
  booleans or strings picks values[int(t (n - 1))]; a list of {filter, value} is the first whose filter is
  missing, "*" or a substring of the tensor name (none matching: the next source, then the default);
* t = i / (L - 1) for a tensor of layer i of L (t = 1 when L = 1); tensors outside the layers (embeddings, final
  norm, head) have t = 0. Layers are found by name (`….layers.N.…`, `h.N`, `layer.N`, `blocks.N`);
* per-model parameters (weight, density, gamma, epsilon) come from that model's `parameters`, then the global
  `parameters`; the others only from the global ones;
* base-aware methods take the base_model as the base and the other listed models as inputs (a base listed under
  models is not one more input); slerp interpolates from the base (t = 0) to the other model.
We compute in float32 whatever `dtype` says (mergekit computes in `dtype`), so results equal mergekit's run at
float32; `out_dtype` is the dtype every floating-point output tensor is written in. Keys we cannot honour
(slices and modules: frankenmerges; tokenizer surgery; chat templates) are refused with the key named, rather than
merged differently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gittheta_merge.errors import UsageError
from gittheta_merge.merge.rules import Rule

# mergekit method -> (our strategy, its base policy: "required" / "optional" (base_model is the base, not one more
# input) or "ignored" (mergekit would count base_model as an input))
METHODS: dict[str, tuple[str, str]] = {
    "linear": ("average", "ignored"), "task_arithmetic": ("task_arithmetic", "required"),
    "ties": ("ties_local", "required"), "dare_ties": ("dare_ties", "required"),
    "dare_linear": ("dare_linear", "required"), "breadcrumbs": ("breadcrumbs", "required"),
    "breadcrumbs_ties": ("breadcrumbs_ties", "required"), "della": ("della", "required"),
    "della_linear": ("della_linear", "required"), "slerp": ("slerp", "required"), "nuslerp": ("nuslerp", "optional"),
    "karcher": ("karcher", "ignored"), "model_stock": ("model_stock", "required"), "sce": ("sce", "required"),
}
PER_MODEL = ("weight", "density", "gamma", "epsilon")  # mergekit's input-scope parameters
IGNORED = {"int8_mask"}  # a memory option of mergekit's masks: the result is the same without it
TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "name"}
REFUSED = {"slices": "frankenmerges (slices) stack layers from different models; only per-tensor merges are built",
           "modules": "per-module slices are frankenmerges; only per-tensor merges are built",
           "tokenizer": "tokenizer surgery (merging vocabularies) is not built; use tokenizer_source: base or a model",
           "chat_template": "chat templates are not written; set one in the output's tokenizer_config.json"}
DTYPES = {"float32": "F32", "float": "F32", "fp32": "F32", "float16": "F16", "half": "F16", "fp16": "F16",
          "bfloat16": "BF16", "bf16": "BF16"}
LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")


@dataclass
class MergekitPlan:
    """What the configuration asks for, in our terms."""

    method: str
    strategy: str
    models: list[str]  # references as written (branches, revisions or paths), in our input order
    base: str | None
    rules: list[Rule] = field(default_factory=list)  # per-tensor parameters (one rule per distinct set)
    params: dict[str, Any] = field(default_factory=dict)  # parameters of tensors no rule names
    tokenizer_source: str | None = None
    out_dtype: str | None = None  # safetensors code (F32, F16, BF16)
    source: str = ""


def load(path: str | Path) -> dict[str, Any]:
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the merge configuration ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: a mergekit configuration is a YAML mapping (merge_method, models, …)")
    return raw


def evaluate(setting: Any, name: str, t: float) -> Any:
    """One parameter setting at tensor `name`, layer position t (mergekit's evaluate_setting)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)) or setting is None:
        return setting
    if not isinstance(setting, list):
        raise UsageError(f"parameter value {setting!r}: expected a number, a list (gradient) or filter entries")
    if not setting:
        return None
    if all(isinstance(v, (bool, int, float, str)) for v in setting):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if not isinstance(cond, dict) or "value" not in cond:
            raise UsageError(f"parameter entry {cond!r}: a filter entry is {{filter: NAME-PART, value: …}}")
        flt = cond.get("filter")
        if flt is None or flt == "*" or (name and str(flt) in name):
            return evaluate(cond["value"], name, t)
    return None


def layer_positions(names: list[str]) -> dict[str, float]:
    """t of every tensor: i / (L - 1) inside the L layers (1 when L = 1), 0 outside them."""
    found = {n: int(m.group(1)) for n in names if (m := LAYER.search(n))}
    count = max(found.values()) + 1 if found else 0
    return {n: (found[n] / (count - 1) if count > 1 else 1.0) if n in found else 0.0 for n in names}


def _resolve(sources: list[dict[str, Any]], key: str, name: str, t: float) -> Any:
    for scope in sources:
        if key in scope:
            value = evaluate(scope[key], name, t)
            if value is not None:
                return value
    return None


def plan(raw: dict[str, Any], names: list[str], where: str = "merge configuration") -> MergekitPlan:
    """Our merge for a parsed configuration, given the tensor names of the first input."""
    from gittheta_merge.merge import strategies

    for key in raw:
        if key in REFUSED:
            raise UsageError(f"{where}: `{key}` is not supported: {REFUSED[key]}")
        if key not in TOP_KEYS:
            raise UsageError(f"{where}: unknown key `{key}` (known: {', '.join(sorted(TOP_KEYS))})")
    method = raw.get("merge_method")
    if method not in METHODS:
        raise UsageError(f"{where}: merge_method {method!r} is not supported (supported: {', '.join(sorted(METHODS))})")
    strategy, base_policy = METHODS[method]
    spec = strategies.get(strategy).params_spec
    entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{where}: `models` must list the models to merge (- model: NAME)")
    models, model_params = [], []
    for entry in entries:
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not entry.get("model"):
            raise UsageError(f"{where}: each entry of `models` needs `model: NAME` (got {entry!r})")
        models.append(str(entry["model"]))
        model_params.append(dict(entry.get("parameters") or {}))
    base = str(raw["base_model"]) if raw.get("base_model") else None
    if base_policy == "required" and base is None:
        raise UsageError(f"{where}: merge_method {method} needs base_model")
    if base_policy != "ignored" and base is not None:
        keep = [i for i, m in enumerate(models) if m != base]
        models, model_params = [models[i] for i in keep], [model_params[i] for i in keep]
    elif base is not None and base_policy == "ignored":
        raise UsageError(f"{where}: merge_method {method} does not use a base model, and mergekit would count "
                         f"base_model {base!r} as one more input; list it under models instead")
    glob = dict(raw.get("parameters") or {})
    for key in [*glob, *(k for p in model_params for k in p)]:
        if key not in PER_MODEL and key not in IGNORED and _our_name(method, key) not in spec:
            raise UsageError(f"{where}: parameter `{key}` is not one merge_method {method} takes here "
                             f"(ours: {', '.join(sorted(spec))})")
    out_dtype = raw.get("out_dtype")
    if out_dtype is not None and str(out_dtype).removeprefix("torch.") not in DTYPES:
        raise UsageError(f"{where}: out_dtype {out_dtype!r} is not one of {', '.join(DTYPES)}")
    out = MergekitPlan(method, strategy, models, base, tokenizer_source=raw.get("tokenizer_source"), source=where,
                       out_dtype=DTYPES[str(out_dtype).removeprefix("torch.")] if out_dtype else None)
    if method == "slerp":  # from the base (t = 0) to the other model: our two inputs, no base
        if len(models) != 1:
            raise UsageError(f"{where}: slerp interpolates base_model and exactly one other model "
                             f"(got {len(models)} others)")
        out.models, out.base = [base, models[0]], None  # type: ignore[list-item]
        model_params = [{}, *model_params]
    groups: dict[str, list[str]] = {}
    chosen: dict[str, dict[str, Any]] = {}
    for name, t in layer_positions(names).items():
        params = _tensor_params(method, spec, glob, model_params, name, t)
        key = repr(sorted(params.items()))
        groups.setdefault(key, []).append(name)
        chosen[key] = params
    ordered = sorted(groups, key=lambda k: -len(groups[k]))
    if ordered:
        out.params = chosen[ordered[0]]  # the most common set is the default; the others get rules
        for key in ordered[1:]:
            pattern = "^(?:" + "|".join(re.escape(n) for n in groups[key]) + ")$"
            out.rules.append(Rule(pattern, "merge", strategy=strategy, params=chosen[key]))
    return out


def _our_name(method: str, key: str) -> str:
    return {"nuslerp_flatten": "vectors", "nuslerp_row_wise": "vectors"}.get(key, key) if method == "nuslerp" else key


def _tensor_params(method: str, spec: dict[str, Any], glob: dict[str, Any], model_params: list[dict[str, Any]],
                   name: str, t: float) -> dict[str, Any]:
    """Our parameters for one tensor (only those the configuration sets)."""
    out: dict[str, Any] = {}
    for key in PER_MODEL:
        values = [_resolve([mp, glob], key, name, t) for mp in model_params]
        if method == "slerp":
            values = values[1:]
        if all(v is None for v in values):
            continue
        if key == "weight":
            if "weights" not in spec:
                continue  # mergekit's method takes no weight either (karcher, sce, model_stock): ignored as there
            if any(v is None for v in values):
                raise UsageError(f"tensor {name!r}: `weight` is set for some models but not all; mergekit needs one "
                                 "per model")
            out["weights"] = [float(v) for v in values]
        elif key in spec:
            default = spec[key].default
            filled = [float(default if v is None else v) for v in values]
            out[key] = filled[0] if len(set(filled)) == 1 else filled
    for key, setting in glob.items():
        if key in PER_MODEL or key in IGNORED:
            continue
        value = evaluate(setting, name, t)
        if value is not None:
            out[_our_name(method, key)] = value
    if method == "nuslerp":
        flatten = evaluate(glob.get("nuslerp_flatten", True), name, t)
        row_wise = evaluate(glob.get("nuslerp_row_wise", False), name, t)
        out["vectors"] = "flatten" if _truthy(flatten) else ("columns" if _truthy(row_wise) else "rows")
    return out


def _truthy(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in {"1", "true", "yes", "on"}


# -- merging files and Hugging Face directories ----------------------------------------------------------------
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt",
            "added_tokens.json")


def weights_file(ref: str, where: str) -> Path:
    """The checkpoint a model reference names: a safetensors file, or a model directory (sharded or not)."""
    path = Path(ref)
    if path.is_dir():
        if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
            return path
        raise UsageError(f"{where}: {ref} has no model.safetensors or model.safetensors.index.json")
    if not path.is_file():
        raise UsageError(f"{where}: model {ref!r} is neither a safetensors file nor a model directory")
    return path


def merge_files_config(config_path: str | Path, output: str | Path, **kwargs: Any) -> dict[str, Any]:
    """`git theta merge-files --config merge.yml -o OUT`: OUT a .safetensors file, or a directory that gets
    model.safetensors (or shards and their index above the shard size), the base's (or tokenizer_source's) config
    and tokenizer files, and a model card."""
    from gittheta_merge.merge.api import merge_files
    from gittheta_merge.merge.sources import open_checkpoint

    raw = load(config_path)
    where = str(config_path)
    probe = plan(raw, [], where)  # the file's own mistakes first, before any model is opened
    first = weights_file(probe.models[0], where)
    mk = plan(raw, open_checkpoint(first).names(), where)
    files = [weights_file(m, where) for m in mk.models]
    base = weights_file(mk.base, where) if mk.base else None
    out = Path(output)
    to_dir = out.suffix != ".safetensors"
    if to_dir:
        out.mkdir(parents=True, exist_ok=True)
    report = merge_files(files, out, base=base, strategy=mk.strategy, params=mk.params, rules=mk.rules,
                         labels=mk.models, out_dtype=mk.out_dtype, **kwargs)
    if to_dir:
        _write_hf_extras(mk, raw, out, where)
    return report


def _write_hf_extras(mk: MergekitPlan, raw: dict[str, Any], out: Path, where: str) -> None:
    import shutil

    source = mk.tokenizer_source
    if source in (None, "base"):
        source = mk.base or mk.models[0]
    elif source == "union":
        raise UsageError(f"{where}: tokenizer_source: union (a merged vocabulary) is not built; use base or a model")
    src = Path(source)
    src_dir = src if src.is_dir() else src.parent
    for name in HF_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, out / name)
    import yaml

    card = ["---", "tags: [merge, gittheta-merge]", "---", f"# {raw.get('name') or out.name}", "",
            f"Merged with gittheta-merge (`git theta merge-files --config`), mergekit method `{mk.method}` "
            f"(our strategy `{mk.strategy}`).", "", "Inputs:", *(f"- {m}" for m in mk.models),
            *([f"- base: {mk.base}"] if mk.base else []), "", "Configuration:", "", "```yaml",
            yaml.safe_dump(raw, sort_keys=False).rstrip(), "```", ""]
    (out / "README.md").write_text("\n".join(card))
