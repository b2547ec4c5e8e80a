"""The engine over git-theta metadata + store: trivial cases read nothing, checks come first, rules work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from merge_helpers import CountingStore, family, from_meta, to_meta

from gittheta_merge.errors import ThetaError
from gittheta_merge.merge.api import merge_metadata
from gittheta_merge.merge.plan import MergeOptions
from gittheta_merge.merge.rules import parse_rule
from gittheta_merge.storage.metadata import Metadata


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    CountingStore.reads = 0
    return CountingStore(tmp_path / "lfs")


def test_trivial_cases_read_no_tensor_data(store: CountingStore) -> None:
    base, (a, b) = family(2, seed=1)
    ours = dict(base, **{"l0.weight": a["l0.weight"], "ln.weight": a["ln.weight"]})  # one-sided + identical
    theirs = dict(base, **{"l1.weight": b["l1.weight"], "ln.weight": a["ln.weight"]})
    metas = [to_meta(ours, store), to_meta(theirs, store)]
    bmeta = to_meta(base, store)
    CountingStore.reads = 0
    merged, result = merge_metadata(metas, bmeta, store, MergeOptions(strategy="ties"))
    assert CountingStore.reads == 0
    got = from_meta(merged, store)
    assert torch.equal(got["l0.weight"], a["l0.weight"]) and torch.equal(got["l1.weight"], b["l1.weight"])
    assert torch.equal(got["ln.weight"], a["ln.weight"]) and torch.equal(got["emb.weight"], base["emb.weight"])
    reasons = {t["name"]: t["reason"] for t in result.report["tensors"]}
    assert reasons["l0.weight"] == "changed only in ours"
    assert reasons["ln.weight"] == "changed identically in ours, theirs"
    # the merged metadata reuses the existing objects
    assert merged.by_name()["l0.weight"].oids == metas[0].by_name()["l0.weight"].oids


def test_merge_in_store_matches_file_api_and_dedups(store: CountingStore, tmp_path: Path) -> None:
    base, models = family(2, seed=2)
    metas = [to_meta(m, store, block_bytes=256) for m in models]
    bmeta = to_meta(base, store, block_bytes=1000)
    opts = MergeOptions(strategy="task_arithmetic", params={"lambda": 0.5}, max_block_bytes=300)
    merged, _ = merge_metadata(metas, bmeta, store, opts, block_bytes=512)
    got = from_meta(merged, store)
    for k in base:
        want = base[k] + 0.5 * ((models[0][k] - base[k]) + (models[1][k] - base[k]))
        assert torch.allclose(got[k], want, rtol=0, atol=1e-6), k
    # output blocks follow the block size, like `git add` would, so re-adding dedups
    again = to_meta(got, store, block_bytes=512)
    assert [t.oids for t in again.tensors] == [t.oids for t in merged.tensors]
    Metadata.from_bytes(merged.to_bytes())


def test_shape_mismatch_is_reported_before_reading(store: CountingStore) -> None:
    base, (a, b) = family(2, seed=3)
    b["l0.weight"] = torch.randn(5, 16)
    metas = [to_meta(a, store), to_meta(b, store)]
    bmeta = to_meta(base, store)
    CountingStore.reads = 0
    with pytest.raises(ThetaError) as err:
        merge_metadata(metas, bmeta, store, MergeOptions(strategy="average"))
    msg = str(err.value)
    assert "'l0.weight'" in msg and "[24, 16] in ours" in msg and "[5, 16] in theirs" in msg
    assert "--rule" in msg
    assert CountingStore.reads == 0
    merged, _ = merge_metadata(metas, bmeta, store, MergeOptions(rules=[parse_rule(r"^l0\.weight$=theirs")]))
    assert merged.by_name()["l0.weight"].shape == [5, 16]


def test_rules_keep_exclude_and_strategy_override(store: CountingStore) -> None:
    base, models = family(2, seed=4)
    metas = [to_meta(m, store) for m in models]
    bmeta = to_meta(base, store)
    rules = [parse_rule("^emb=base"), parse_rule("bias=exclude"), parse_rule("ln=ours"),
             parse_rule("scale=theirs"), parse_rule("l1=task_arithmetic:lambda=0.5")]
    merged, result = merge_metadata(metas, bmeta, store, MergeOptions(strategy="average", rules=rules))
    got = from_meta(merged, store)
    assert "l0.bias" not in got
    assert torch.equal(got["emb.weight"], base["emb.weight"])
    assert torch.equal(got["ln.weight"], models[0]["ln.weight"])
    assert torch.equal(got["scale"], models[1]["scale"])
    want = base["l1.weight"] + 0.5 * sum(m["l1.weight"] - base["l1.weight"] for m in models)
    assert torch.allclose(got["l1.weight"], want, atol=1e-6)
    assert torch.allclose(got["l0.weight"], (models[0]["l0.weight"] + models[1]["l0.weight"]) / 2, atol=1e-6)
    assert merged.file.get("header_oid") is None


def test_conflicts_are_clear(store: CountingStore) -> None:
    base, (a, b) = family(2, seed=5)
    del b["l0.weight"]
    metas = [to_meta(a, store), to_meta(b, store)]
    with pytest.raises(ThetaError, match="'l0.weight': missing in theirs but changed in ours"):
        merge_metadata(metas, to_meta(base, store), store, MergeOptions())
    a2 = dict(a, **{"l0.weight": a["l0.weight"].to(torch.int32)})
    b2 = dict(a, **{"l0.weight": a["l0.weight"].to(torch.int32) + 1})
    with pytest.raises(ThetaError, match="not a floating-point tensor"):
        merge_metadata([to_meta(a2, store), to_meta(b2, store)], to_meta(base, store), store, MergeOptions())
    with pytest.raises(ThetaError, match="needs the base"):
        merge_metadata([to_meta(a, store), to_meta(models_b := dict(a, scale=torch.tensor(3.0)), store)], None,
                       store, MergeOptions(strategy="ties"))
    del models_b


def test_ties_counts_unchanged_tensors_as_zeros(store: CountingStore) -> None:
    """Tensors unchanged everywhere are part of D (as zeros) without being read."""
    base, models = family(2, seed=6)
    for m in models:
        m["emb.weight"] = base["emb.weight"].clone()
    metas = [to_meta(m, store) for m in models]
    merged, result = merge_metadata(metas, to_meta(base, store), store, MergeOptions(strategy="ties"))
    assert result.report["strategies"]["ties"]["elements"] == sum(v.numel() for v in base.values())


def test_parse_rule_errors_and_forms() -> None:
    assert parse_rule("a(?=b)=ours").pattern == "a(?=b)"
    rule = parse_rule("attn=ties:density=0.3,lambda=1")
    assert rule.strategy == "ties" and rule.params == {"density": "0.3", "lambda": "1"}
    assert parse_rule("x=model:2").keep == 2
    with pytest.raises(ThetaError, match="REGEX=ACTION"):
        parse_rule("classifier")
    with pytest.raises(ThetaError, match="unknown parameter"):
        MergeOptions  # noqa: B018
        from gittheta_merge.merge.strategies import create

        create("ties", {"k": 3}, 2)


@pytest.mark.parametrize("strategy", ["ties", "tsv_merge"])
def test_the_planned_peak_never_counts_a_chunk_larger_than_the_largest_tensor(tmp_path: Path, strategy: str) -> None:
    """A chunk is rows of one tensor: with tensors far below the 64 MiB block, the printed peak uses the largest
    tensor's float32 size (it used the block size: a 2 x 8 MB merge was said to peak at 1.8 GB)."""
    from safetensors.torch import save_file

    from gittheta_merge.merge.api import plan_files
    from gittheta_merge.merge.plan import worker_threads

    for i, name in enumerate(["base", "a", "b"]):
        torch.manual_seed(i)
        save_file({"w": torch.randn(512, 256), "v": torch.randn(300)}, tmp_path / f"{name}.safetensors")
    plan = plan_files([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "base.safetensors",
                      strategy)
    sets = worker_threads() + 1 if worker_threads() > 1 else 1
    text = plan.peak_formula()
    block = min(plan.max_block_bytes, 512 * 256 * 4) if strategy == "tsv_merge" else None
    if block is not None:
        assert f"× {block / 1e6:.1f} MB × 3 × {sets} ≈ {3 * block * 3 * sets / 1e6:.1f} MB" in text, text
    chunk = float(text.split("= (2+1) × ")[1].split(" MB")[0])
    assert chunk * 1e6 <= 512 * 256 * 4 + 1e5
