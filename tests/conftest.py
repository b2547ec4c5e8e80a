"""Shared fixtures: real git repositories in temp dirs with the theta filter installed."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import torch


def git(cwd: Path, *args: str, check: bool = True, input: bytes | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, input=input,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout.decode(errors='replace')}\n{proc.stderr.decode(errors='replace')}")
    return proc


INJECT = Path(__file__).resolve().parent / "inject"


def pause_env(point: str, pidfile: Path, count: int = 1) -> dict[str, str]:
    """Environment for a command that should stop at a named pause point (tests/inject/sitecustomize.py)."""
    return {**os.environ, "GITTHETA_TEST_PAUSE": f"{point}:{count}:{pidfile}",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(INJECT), os.environ.get("PYTHONPATH", "")]))}


def init_repo(path: Path, install: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.email", "test@example.com")
    git(path, "config", "user.name", "Test")
    git(path, "config", "commit.gpgsign", "false")
    if install:
        git(path, "theta", "install")
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return init_repo(tmp_path / "repo")


def random_state(n: int = 6, shape: tuple[int, ...] = (64, 32), dtype: torch.dtype = torch.float32,
                 seed: int = 0, prefix: str = "layer") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"{prefix}{i}.weight": torch.randn(shape, generator=gen).to(dtype) for i in range(n)}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def store_objects(repo_path: Path) -> set[str]:
    root = repo_path / ".git" / "lfs" / "objects"
    return {p.name for p in root.rglob("*") if p.is_file()} if root.exists() else set()


WORDS = "the a cat dog runs sits big small red blue good bad movie book not very is was".split()


@pytest.fixture
def hf_repo(repo: Path) -> Path:
    """A tiny BERT sequence classifier as a tracked Hugging Face directory `model/`, and `train.jsonl`."""
    import json

    import transformers

    model_dir = repo / "model"
    model_dir.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(str(model_dir / "vocab.txt")).save_pretrained(model_dir)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(model_dir, safe_serialization=True)
    rows = [{"text": "the cat runs", "label": 1}, {"text": "a bad movie", "label": 0},
            {"text": "very good book", "label": 1}, {"text": "not big", "label": 0}, {"text": "dog", "label": 1}]
    (repo / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    git(repo, "theta", "track", "model")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "model")
    return repo
