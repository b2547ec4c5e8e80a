"""Loading a model from the working tree and computing a statistic over a data file, for the CLI.

Kept apart from compute.py (pure computation on an in-memory model) so the CLI's file handling — an HF
directory, or a checkpoint file plus a config directory — has one home.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gittheta_merge.errors import ThetaError


def load_model_and_tokenizer(model_path: str, task: str, config_dir: str | None = None) -> tuple[Any, Any]:
    """An HF directory (config + weights + tokenizer), or a weights file with `config_dir` beside it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub: everything is in the working tree
    import transformers

    from gittheta_merge.stats.compute import load_model

    path = Path(model_path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ThetaError(f"{model_path}: no config.json; pass a Hugging Face model directory "
                             "(or a weights file with --config DIR)")
        model = load_model(str(path), task)
        tok_dir = path
    else:
        if config_dir is None:
            raise ThetaError(f"{model_path} is a file: pass --config DIR with its config.json and tokenizer")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            import torch

            state = torch.load(str(path), map_location="cpu", weights_only=True)
        model = load_model(config_dir, task, state_dict=state)
        tok_dir = Path(config_dir)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    except (OSError, ValueError) as exc:
        raise ThetaError(f"{tok_dir}: no usable tokenizer files ({exc})") from None
    return model, tokenizer


def compute_statistic_from_file(model: Any, tokenizer: Any, data_path: str, *, text_field: str,
                                text_pair_field: str | None, label_field: str, n_examples: int,
                                **kwargs: Any) -> Any:
    """Stream examples from a jsonl/csv file and compute one statistic, recording the data's digest."""
    from gittheta_merge.stats import DataSpec, compute_statistic, file_digest, iter_examples

    spec = DataSpec(data_path, text_field=text_field, text_pair_field=text_pair_field, label_field=label_field)
    return compute_statistic(model, tokenizer, iter_examples(spec), n_examples=n_examples,
                             data_digest=file_digest(data_path),
                             data_source={"file": Path(data_path).name}, **kwargs)
