"""`git theta stats compute` end to end: a tiny BERT as an HF directory in a real repo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from conftest import git
from safetensors.torch import load_file

from gittheta_merge.stats import DataSpec, compute_statistic, iter_examples, statistic_from_bytes
from gittheta_merge.stats.attach import blob_path
from gittheta_merge.storage.gitutil import Repo
from gittheta_merge.storage.revisions import read_metadata
from gittheta_merge.storage.store import ObjectStore


@pytest.mark.parametrize("kind", ["fisher", "gram"])
def test_stats_compute_stages_the_same_statistic_as_the_api(hf_repo: Path, kind: str) -> None:
    out = git(hf_repo, "theta", "stats", "compute", "model", "--kind", kind, "--data", "train.jsonl",
              "--n-examples", "4", "--batch-size", "2", "--max-length", "16")
    assert f"staged {kind} statistics for model/model.safetensors" in out.stdout.decode()
    assert git(hf_repo, "status", "--porcelain").stdout.decode().strip() == "M  model/model.safetensors"
    git(hf_repo, "commit", "-q", "-m", f"{kind} statistics")
    listing = git(hf_repo, "theta", "stats", "ls", "model").stdout.decode()
    assert kind in listing and "fresh" in listing

    repo = Repo.discover(hf_repo)
    meta = read_metadata(repo, "HEAD", "model/model.safetensors")
    stored = statistic_from_bytes(blob_path(ObjectStore.for_repo(repo), meta, kind, "model").read_bytes())
    model = transformers.BertForSequenceClassification.from_pretrained(hf_repo / "model")
    tok = transformers.AutoTokenizer.from_pretrained(hf_repo / "model")
    direct = compute_statistic(model, tok, iter_examples(DataSpec(hf_repo / "train.jsonl")), kind=kind,
                               task="sequence-classification", n_examples=4, batch_size=2, max_length=16)
    assert set(stored.tensors) == set(direct.tensors)
    for key, value in direct.tensors.items():
        assert torch.allclose(stored.tensors[key], value, rtol=1e-10, atol=0), key
    weights = set(load_file(hf_repo / "model" / "model.safetensors"))
    assert set(stored.sharing) <= weights  # keyed by weight name


def test_stats_compute_refuses_unstaged_weights(hf_repo: Path) -> None:
    path = hf_repo / "model" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    proc = git(hf_repo, "theta", "stats", "compute", "model", "--kind", "gram", "--data", "train.jsonl",
               "--n-examples", "2", check=False)
    assert proc.returncode == 1 and b"not staged" in proc.stderr


@pytest.mark.slow  # a Fisher computed through the CLI with a tokenizer (~15 s)
def test_weights_file_with_a_head_config_uses_the_tokenizer_beside_the_weights(hf_repo: Path) -> None:
    """One shared tokenizer next to the weights, a config-only directory per task head (other label count)."""
    head = hf_repo / "heads" / "three"
    head.mkdir(parents=True)
    cfg = transformers.BertConfig.from_pretrained(hf_repo / "model")
    cfg.num_labels = 2
    cfg.save_pretrained(head)
    git(hf_repo, "add", "heads")
    git(hf_repo, "commit", "-q", "-m", "head config")
    out = git(hf_repo, "theta", "stats", "compute", "model/model.safetensors", "--config", "heads/three",
              "--kind", "gram", "--data", "train.jsonl", "--n-examples", "4", "--max-length", "16")
    assert "staged gram statistics for model/model.safetensors" in out.stdout.decode()
    repo = Repo.discover(hf_repo)
    meta = read_metadata(repo, ":0", "model/model.safetensors")
    stored = statistic_from_bytes(blob_path(ObjectStore.for_repo(repo), meta, "gram", "model").read_bytes())
    tok = transformers.AutoTokenizer.from_pretrained(hf_repo / "model")
    model = transformers.BertForSequenceClassification.from_pretrained(hf_repo / "model")
    direct = compute_statistic(model, tok, iter_examples(DataSpec(hf_repo / "train.jsonl")), kind="gram",
                               task="sequence-classification", n_examples=4, batch_size=16, max_length=16)
    for key, value in direct.tensors.items():
        assert torch.allclose(stored.tensors[key], value, rtol=1e-10, atol=0), key

    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (hf_repo / "model" / name).unlink(missing_ok=True)
    proc = git(hf_repo, "theta", "stats", "compute", "model/model.safetensors", "--config", "heads/three",
               "--kind", "gram", "--data", "train.jsonl", "--n-examples", "2", check=False)
    assert proc.returncode == 1 and b"no usable tokenizer files" in proc.stderr, proc.stderr
