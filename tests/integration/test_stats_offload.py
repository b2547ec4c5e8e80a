"""`stats compute --device-map`: a model split by accelerate over the devices and a disk folder gives the Gram and
the Fisher of the model held whole (the Fisher layer by layer), and the kind it cannot compute is refused with the
reason."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import git

pytestmark = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="pip install accelerate")


def test_an_offloaded_model_gives_the_gram_of_the_whole_model(hf_repo: Path, tmp_path: Path) -> None:
    from gittheta_merge.stats import placement, workdir

    model_dir, data = str(hf_repo / "model"), str(hf_repo / "train.jsonl")
    common = dict(kind="gram", task="sequence-classification", batch_size=2, max_length=16, text_field="text",
                  text_pair_field=None, label_field="label", n_examples=None)
    split, tok = workdir.load_model_and_tokenizer(model_dir, "sequence-classification",
                                                  **placement.load_kwargs("auto", "cpu=2KB", str(tmp_path / "off")))
    assert "disk" in set(map(str, split.hf_device_map.values()))  # the check below is about offloaded layers
    offloaded = workdir.compute_statistic_from_file(split, tok, data, **common)
    whole, tok = workdir.load_model_and_tokenizer(model_dir, "sequence-classification")
    plain = workdir.compute_statistic_from_file(whole, tok, data, **common)
    assert sorted(offloaded.tensors) == sorted(plain.tensors) and len(plain.tensors) >= 6
    for key, t in plain.tensors.items():
        assert offloaded.tensors[key].dtype == t.dtype and bool((offloaded.tensors[key] == t).all()), key
    # the weights it describes are identified by the stored values, so a merge finds it fresh
    assert offloaded.provenance["weights"] == plain.provenance["weights"]
    assert offloaded.provenance["tokens"] == plain.provenance["tokens"]


def test_device_map_through_the_cli_prints_the_placement_and_stages(hf_repo: Path, tmp_path: Path) -> None:
    out = git(hf_repo, "theta", "stats", "compute", "model", "--kind", "gram", "--data", "train.jsonl",
              "--device-map", "auto", "--max-memory", "cpu=2KB", "--offload-folder", str(tmp_path / "off"))
    err = out.stderr.decode()
    assert "placed by accelerate" in err and "disk:" in err, err
    assert "staged gram statistics" in out.stdout.decode()
    listing = git(hf_repo, "theta", "stats", "ls", "model").stdout.decode()
    assert "gram" in listing and "fresh" in listing


def test_fisher_of_an_offloaded_model_through_the_cli_equals_the_whole_models(hf_repo: Path, tmp_path: Path) -> None:
    from gittheta_merge.stats import statistic_from_bytes, workdir
    from gittheta_merge.stats.attach import blob_path
    from gittheta_merge.storage.gitutil import Repo
    from gittheta_merge.storage.revisions import read_metadata
    from gittheta_merge.storage.store import ObjectStore

    out = git(hf_repo, "theta", "stats", "compute", "model", "--kind", "fisher", "--data", "train.jsonl",
              "--device-map", "auto", "--max-memory", "cpu=2KB", "--offload-folder", str(tmp_path / "off"))
    assert "disk:" in out.stderr.decode() and "staged fisher statistics" in out.stdout.decode()
    repo = Repo.discover(hf_repo)
    meta = read_metadata(repo, ":", "model/model.safetensors")
    staged = statistic_from_bytes(blob_path(ObjectStore.for_repo(repo), meta, "fisher", "model").read_bytes())
    assert staged.provenance["per_example"] == "layerwise"
    whole, tok = workdir.load_model_and_tokenizer(str(hf_repo / "model"), "sequence-classification")
    plain = workdir.compute_statistic_from_file(whole, tok, str(hf_repo / "train.jsonl"), kind="fisher",
                                                task="sequence-classification", per_example="loop",
                                                text_field="text", text_pair_field=None, label_field="label",
                                                n_examples=None)
    assert sorted(staged.tensors) == sorted(plain.tensors)
    scale = max(float(t.norm()) for t in plain.tensors.values())
    for key, t in plain.tensors.items():  # float32 weights: padded batch vs one example at a time
        assert float((staged.tensors[key] - t).norm()) <= 1e-5 * float(t.norm()) + 1e-9 * scale, key


@pytest.mark.parametrize("args, message", [
    (["--kind", "gram", "--max-memory", "cpu=1GB"], "go with --device-map"),
    (["--kind", "gram", "--device-map", "auto", "--max-memory", "lots"], "DEVICE=SIZE"),
])
def test_what_device_map_cannot_do_is_refused(hf_repo: Path, args: list[str], message: str) -> None:
    out = git(hf_repo, "theta", "stats", "compute", "model", "--data", "train.jsonl", *args, check=False)
    assert out.returncode != 0 and message in out.stderr.decode(), out.stderr
    assert git(hf_repo, "status", "--porcelain").stdout == b""  # nothing staged
