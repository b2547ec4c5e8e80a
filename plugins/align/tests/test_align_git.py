"""`git theta align` in real repositories: a planted permutation is undone exactly (the aligned branch holds the
reference's very objects), an aligned model computes what the unaligned one did, its alignment statistic is
versioned with it, it merges with the reference, and bad input writes nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from gittheta_align.bert import Shape
from gittheta_align.permute import permute_state, random_perms

transformers = pytest.importorskip("transformers")
WORDS = [f"w{i}" for i in range(60)]


def git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=check)


def _config(layers: int = 2) -> transformers.BertConfig:
    return transformers.BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=layers,
                                   num_attention_heads=4, intermediate_size=48, max_position_embeddings=64)


def _save(folder: Path, model: torch.nn.Module, tokenizer: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)  # type: ignore[attr-defined]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    git(repo, "theta", "install")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
    git(repo, "theta", "track", "model/*.safetensors")
    git(repo, "add", ".gitattributes")
    git(repo, "commit", "-qm", "attributes")
    torch.manual_seed(0)
    _save(repo / "model", transformers.BertModel(_config()), tokenizer)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "seed a")
    git(repo, "branch", "seed-a")
    rng = np.random.default_rng(0)
    data = tmp_path / "text.txt"
    data.write_text("\n".join(" ".join(rng.choice(WORDS, size=rng.integers(6, 20))) for _ in range(120)) + "\n")
    return repo


def _commit_model(repo: Path, branch: str, model: torch.nn.Module) -> None:
    git(repo, "checkout", "-q", "-b", branch, "main~1")
    git(repo, "checkout", "seed-a", "--", "model")  # the same tokenizer files, byte for byte
    model.save_pretrained(repo / "model", safe_serialization=True)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", branch)
    git(repo, "checkout", "-q", "main")


def _model_at(repo: Path, rev: str) -> torch.nn.Module:
    git(repo, "checkout", "-q", rev)
    model = transformers.BertModel.from_pretrained(str(repo / "model")).eval()
    git(repo, "checkout", "-q", "main")
    return model


def _tensors(repo: Path, rev: str) -> list[str]:
    meta = json.loads(git(repo, "show", f"{rev}:model/model.safetensors").stdout)
    return [json.dumps(t, sort_keys=True) for t in meta["tensors"]]


@pytest.mark.parametrize("qk", [False, True])
def test_a_planted_permutation_is_undone_exactly(repo: Path, qk: bool) -> None:
    a = _model_at(repo, "seed-a")
    shape = Shape.from_config(a.config.to_dict())
    b = transformers.BertModel(a.config)
    b.load_state_dict(permute_state(a.state_dict(), shape, random_perms(shape, seed=3, qk=qk)))
    _commit_model(repo, "seed-b", b)
    assert _tensors(repo, "seed-b") != _tensors(repo, "seed-a")
    out = git(repo, "theta", "align", "seed-a", "seed-b", "--data", str(repo.parent / "text.txt"),
              *(["--qk"] if qk else []))
    assert "on seed-b-aligned" in out.stdout, out.stderr
    # the aligned model is the reference, object for object (the objects are content-addressed)
    assert _tensors(repo, "seed-b-aligned") == _tensors(repo, "seed-a")
    assert git(repo, "rev-parse", "seed-b-aligned~1").stdout == git(repo, "rev-parse", "seed-b").stdout
    stats = git(repo, "theta", "stats", "ls", "--rev", "seed-b-aligned").stdout
    assert "alignment" in stats
    assert ("q/k from their own statistics" in git(repo, "log", "-1", "--format=%B", "seed-b-aligned").stdout) == qk
    assert git(repo, "status", "--porcelain").stdout == ""  # the user's work tree and index are untouched


def test_an_aligned_model_computes_the_same_function_and_merges(repo: Path) -> None:
    torch.manual_seed(1)
    b = transformers.BertModel(_config()).eval()
    _commit_model(repo, "seed-b", b)
    git(repo, "theta", "align", "seed-a", "seed-b", "--data", str(repo.parent / "text.txt"), "--into", "b-in-a")
    aligned = _model_at(repo, "b-in-a")
    batch = {"input_ids": torch.tensor([[2, 7, 9, 30, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with torch.no_grad():
        ref, got = b(**batch).pooler_output, aligned(**batch).pooler_output
    assert torch.allclose(ref, got, atol=1e-5)
    a_sd, al_sd = _model_at(repo, "seed-a").state_dict(), aligned.state_dict()
    git(repo, "checkout", "-q", "-b", "merged", "seed-a")
    merged = git(repo, "theta", "merge", "b-in-a", "--strategy", "average", check=False)
    assert merged.returncode == 0, merged.stderr
    m = transformers.BertModel.from_pretrained(str(repo / "model"))
    name = "encoder.layer.1.intermediate.dense.weight"
    assert torch.allclose(m.state_dict()[name], (a_sd[name] + al_sd[name]) / 2, atol=1e-6)


def test_bad_input_is_refused_and_writes_nothing(repo: Path) -> None:
    torch.manual_seed(2)
    _commit_model(repo, "deeper", transformers.BertModel(_config(layers=3)))
    refs = git(repo, "show-ref").stdout
    out = git(repo, "theta", "align", "seed-a", "deeper", "--data", str(repo.parent / "text.txt"), check=False)
    assert out.returncode == 1 and "different architectures" in out.stderr
    empty = repo.parent / "empty.txt"
    empty.write_text("\n")
    out = git(repo, "theta", "align", "seed-a", "deeper", "--data", str(empty), check=False)
    assert out.returncode == 1 and "no text" in out.stderr
    assert git(repo, "show-ref").stdout == refs


@pytest.mark.slow  # over 20 s: several alignments
def test_max_memory_splits_the_statistics_into_passes_with_the_same_result(repo: Path) -> None:
    torch.manual_seed(1)
    _commit_model(repo, "seed-b", transformers.BertModel(_config()).eval())
    data = str(repo.parent / "text.txt")
    whole = git(repo, "theta", "align", "seed-a", "seed-b", "--data", data, "--into", "one-pass")
    # an FF site (48 wide) needs 8 * (48^2 + 4*48) = 19.9 kB: 20kB forces a pass per site or two
    split = git(repo, "theta", "align", "seed-a", "seed-b", "--data", data, "--into", "passes", "--max-memory", "20kB")
    assert "1 pass over" in whole.stderr and "passes over the data" in split.stderr, split.stderr
    assert git(repo, "rev-parse", "one-pass^{tree}").stdout == git(repo, "rev-parse", "passes^{tree}").stdout
    out = git(repo, "theta", "align", "seed-a", "seed-b", "--data", data, "--max-memory", "10kB", check=False)
    assert out.returncode == 1 and "raise --max-memory" in out.stderr


@pytest.mark.slow  # over 20 s: several alignments
def test_merge_with_align_aligns_first_then_merges(repo: Path) -> None:
    torch.manual_seed(1)
    _commit_model(repo, "seed-b", transformers.BertModel(_config()).eval())
    data = str(repo.parent / "text.txt")
    git(repo, "theta", "align", "seed-a", "seed-b", "--data", data, "--into", "by-hand")
    git(repo, "checkout", "-q", "-b", "two-steps", "seed-a")
    git(repo, "theta", "merge", "by-hand", "--strategy", "average")
    git(repo, "checkout", "-q", "-b", "one-step", "seed-a")
    out = git(repo, "theta", "merge", "seed-b", "--align", data, "--strategy", "average", check=False)
    assert out.returncode == 0, out.stderr
    assert "on seed-b-aligned" in out.stderr
    assert git(repo, "rev-parse", "one-step^{tree}").stdout == git(repo, "rev-parse", "two-steps^{tree}").stdout
    assert git(repo, "rev-parse", "one-step^2").stdout == git(repo, "rev-parse", "seed-b-aligned").stdout


@pytest.mark.skipif(shutil.which("git-lfs") is None, reason="git-lfs not installed")
def test_the_alignment_statistic_travels_with_push_and_clone(repo: Path, tmp_path: Path) -> None:
    torch.manual_seed(1)
    _commit_model(repo, "seed-b", transformers.BertModel(_config()).eval())
    git(repo, "theta", "align", "seed-a", "seed-b", "--data", str(repo.parent / "text.txt"))
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(remote))
    git(repo, "remote", "add", "origin", remote.as_uri())
    git(repo, "push", "-q", "origin", "seed-b-aligned")
    git(tmp_path, "clone", "-q", "--branch", "seed-b-aligned", remote.as_uri(), "copy")
    copy = tmp_path / "copy"
    git(copy, "theta", "install")
    git(copy, "theta", "pull-objects")
    meta = json.loads(git(copy, "show", "HEAD:model/model.safetensors").stdout)
    oid = meta["stats"]["alignment"]["oid"]
    blob = copy / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
    original = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
    assert blob.read_bytes() == original.read_bytes()
    assert "alignment fresh" in " ".join(git(copy, "theta", "stats", "ls", "--rev", "HEAD").stdout.split())
    assert git(copy, "theta", "fsck").returncode == 0


@pytest.mark.slow  # over 20 s: several alignments
def test_statistics_are_reused_for_other_options_and_refused_when_stale(repo: Path) -> None:
    torch.manual_seed(1)
    _commit_model(repo, "seed-b", transformers.BertModel(_config()).eval())
    data = str(repo.parent / "text.txt")
    git(repo, "theta", "align", "seed-a", "seed-b", "--data", data, "--residual", "all", "--into", "all")
    # matching again from the stored sums gives what a full run with those options gives
    git(repo, "theta", "align", "seed-a", "seed-b", "--data", data, "--heads", "monotonic", "--into", "fresh")
    out = git(repo, "theta", "align", "seed-a", "seed-b", "--stats-from", "all", "--heads", "monotonic",
              "--into", "reused")
    assert "matching only" in out.stderr
    assert _tensors(repo, "reused") == _tensors(repo, "fresh")
    # B changes after the statistics were computed: refused as stale, nothing written
    git(repo, "checkout", "-q", "seed-b")
    model = transformers.BertModel.from_pretrained(str(repo / "model"))
    with torch.no_grad():
        model.encoder.layer[0].output.dense.weight.mul_(1.5)
    model.save_pretrained(repo / "model", safe_serialization=True)
    git(repo, "commit", "-qam", "more training")
    git(repo, "checkout", "-q", "main")
    refs = git(repo, "show-ref").stdout
    out = git(repo, "theta", "align", "seed-a", "seed-b", "--stats-from", "all", "--into", "stale", check=False)
    assert out.returncode == 1 and "stale" in out.stderr and "seed-b" in out.stderr
    out = git(repo, "theta", "align", "seed-a", "seed-b", "--into", "neither", check=False)
    assert out.returncode == 1 and "--data" in out.stderr
    assert git(repo, "show-ref").stdout == refs


@pytest.mark.slow  # over 20 s: several alignments
def test_merge_with_align_reuses_its_aligned_branch_and_refuses_a_foreign_one(repo: Path) -> None:
    torch.manual_seed(1)
    _commit_model(repo, "seed-b", transformers.BertModel(_config()).eval())
    data = str(repo.parent / "text.txt")
    git(repo, "checkout", "-q", "-b", "target", "seed-a")
    bad = git(repo, "theta", "merge", "seed-b", "--align", data, "--strategy", "no-such-method", check=False)
    assert bad.returncode == 1 and "no-such-method" in bad.stderr
    assert "seed-b-aligned" not in git(repo, "branch").stdout  # refused before any alignment
    git(repo, "theta", "align", "seed-a", "seed-b", "--data", data)  # an earlier run's branch
    out = git(repo, "theta", "merge", "seed-b", "--align", data, "--strategy", "average")
    assert "reusing it" in out.stderr
    git(repo, "branch", "-f", "seed-b-aligned", "seed-a")  # a branch of that name that is something else
    git(repo, "checkout", "-q", "-b", "target2", "seed-a")
    out = git(repo, "theta", "merge", "seed-b", "--align", data, check=False)
    assert out.returncode == 1 and "git branch -D seed-b-aligned" in out.stderr
