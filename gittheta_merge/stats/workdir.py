"""Loading a model from the working tree and computing a statistic over a data file, for the CLI.

Kept apart from compute.py (pure computation on an in-memory model) so the CLI's file handling — an HF
directory, or a checkpoint file plus a config directory — has one home.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gittheta_merge.errors import InputError, MissingError, UsageError


def load_model_and_tokenizer(model_path: str, task: str, config_dir: str | None = None,
                              **placement: Any) -> tuple[Any, Any]:
    """An HF directory (config + weights + tokenizer), or a weights file with `config_dir` beside it. `placement`:
    accelerate's device_map arguments for from_pretrained (stats/placement.py; HF directories only)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub: everything is in the working tree

    from gittheta_merge.stats.batches import load_model

    path = Path(model_path)
    if placement and (not (path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        raise UsageError(f"{model_path}: --device-map loads a Hugging Face model directory (config.json and its "
                         "weights), not a single weights file or an adapter")
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return _load_adapter(path, task, config_dir)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise MissingError(f"{model_path}: no config.json; pass a Hugging Face model directory "
                             "(or a weights file with --config DIR)")
        model = load_model(str(path), task, **placement)
        tok_dir = path
    else:
        if config_dir is None:
            raise UsageError(f"{model_path} is a file: pass --config DIR with its config.json and tokenizer")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            import torch

            state = torch.load(str(path), map_location="cpu", weights_only=True)
        model = _model_from_state(config_dir, task, state, model_path)
        tok_dir = Path(config_dir)
    return model, _load_tokenizer(tok_dir, path.parent if not path.is_dir() else None)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def _model_from_state(config_dir: str, task: str, state: dict[str, Any], weights: str) -> Any:
    """Build the task's model from `config_dir` and load a weights file into it.

    transformers >= 5 refuses `from_pretrained(directory, state_dict=...)`, so the model is built from the config
    and filled here, with from_pretrained's tolerance: a missing `base_model_prefix` (encoder-only weights) is
    added, tensors absent from the file (a task head) keep their fresh initialisation with a note, tied weights
    are re-tied; names the model does not have, or other shapes, are errors naming the file."""
    import sys

    import transformers

    from gittheta_merge.stats.batches import TASKS, auto_class

    if task not in TASKS:
        raise UsageError(f"unknown task {task!r} (one of {', '.join(TASKS)})")
    config = transformers.AutoConfig.from_pretrained(config_dir)
    model = auto_class(task).from_config(config)
    own = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") + "."
    if prefix != "." and sum(k in own for k in state) < sum(prefix + k in own for k in state):
        state = {prefix + k: v for k, v in state.items()}
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise InputError(f"{weights}: {len(unexpected)} tensors that a {type(model).__name__} built from "
                         f"{config_dir}/config.json does not have ({', '.join(unexpected[:3])}, …); "
                         "pass the --config directory that belongs to these weights")
    wrong = [f"{k} {list(v.shape)} vs {list(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise InputError(f"{weights}: shapes differ from {config_dir}/config.json ({'; '.join(wrong[:3])}); "
                         "pass the --config directory that belongs to these weights")
    model.load_state_dict(state, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    tied = {k for k, v in model.state_dict().items() if any(v is w for w in state.values())}
    missing = [k for k in own if k not in state and k not in tied]
    if missing:
        print(f"git-theta: {weights}: {len(missing)} tensors not in the file keep a fresh initialisation "
              f"({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''})", file=sys.stderr)
    model.eval()
    return model


def _load_tokenizer(tok_dir: Path, beside_weights: Path | None) -> Any:
    """From the config directory; failing that, from the weights file's own directory: a repo that keeps one
    shared tokenizer next to the weights and a small config per task head (different label sets) needs both."""
    import transformers

    tried: list[Path] = []
    last = "none of " + ", ".join(TOKENIZER_FILES)
    for where in (tok_dir, beside_weights):
        if where is None or where in tried:
            continue
        tried.append(where)
        if not any((where / f).exists() for f in TOKENIZER_FILES):
            continue  # transformers would build an empty 5-token tokenizer from config.json alone, silently
        try:
            return transformers.AutoTokenizer.from_pretrained(str(where))
        except (OSError, ValueError) as exc:
            last = str(exc)
    raise MissingError(f"{' or '.join(map(str, tried))}: no usable tokenizer files ({last}); put the "
                     "tokenizer next to the weights or in the --config directory") from None


def compute_statistic_from_file(model: Any, tokenizer: Any, data_path: str, *, text_field: str,
                                text_pair_field: str | None, label_field: str, n_examples: int,
                                **kwargs: Any) -> Any:
    """Stream examples from a jsonl/csv file and compute one statistic, recording the data's digest."""
    from gittheta_merge.stats import DataSpec, compute_statistic, file_digest, iter_examples

    if kwargs.get("task") in ("causal-lm", "masked-lm"):
        label_field = None  # language modelling takes its targets from the text: a label column is not needed
    spec = DataSpec(data_path, text_field=text_field, text_pair_field=text_pair_field, label_field=label_field)
    return compute_statistic(model, tokenizer, iter_examples(spec), n_examples=n_examples,
                             data_digest=file_digest(data_path),
                             data_source={"file": Path(data_path).name}, **kwargs)


def _load_adapter(path: Path, task: str, config_dir: str | None) -> tuple[Any, Any]:
    """A PEFT LoRA adapter directory on its base model (--config BASE_DIR, or the adapter's base_model_name_or_path
    when that is a local directory), with only the adapter's parameters trainable: a statistic of the adapter."""
    import json

    from gittheta_merge.stats.batches import load_model

    base = config_dir or json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise UsageError(f"{path} is a PEFT adapter: pass --config BASE_DIR, the base model's directory "
                         f"(its adapter_config.json names {base!r}, which is not a local model directory)")
    try:
        from peft import PeftModel
    except ImportError:
        raise UsageError(f"{path} is a PEFT adapter: statistics of adapters need peft (pip install peft)") from None
    model = PeftModel.from_pretrained(load_model(str(base), task), str(path), is_trainable=True)
    tok_dir = path if any((path / f).is_file() for f in TOKENIZER_FILES) else Path(base)
    return model, _load_tokenizer(tok_dir, None)


def adapter_keys(model: Any, stat: Any) -> Any:
    """A statistic of a PeftModel keyed like the adapter's saved tensors: PEFT names a parameter
    `….lora_A.<adapter>.weight` in the model and `….lora_A.weight` in adapter_model.safetensors."""
    names = getattr(model, "peft_config", None)
    if not names:
        return stat
    suffixes = tuple(f".{name}" for name in names)

    def rename(key: str) -> str:
        for suffix in suffixes:
            key = key.replace(f"{suffix}.", ".") if f"{suffix}." in key else key
        return key

    stat.tensors = {rename(k): v for k, v in stat.tensors.items()}
    for field in ("sharing", "counts"):
        value = stat.provenance.get(field)
        if isinstance(value, dict):
            stat.provenance[field] = {rename(k): rename(v) if isinstance(v, str) else v for k, v in value.items()}
    return stat
