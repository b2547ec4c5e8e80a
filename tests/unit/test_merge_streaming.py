"""The streaming path (small reused chunks): results independent of the chunk size, bit-exact against the
straightforward stacked TIES, mixed input dtypes, store reads verified once, torch threads restored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from merge_helpers import f32, family, flip_byte, from_meta, to_meta, write_files
from safetensors.torch import load_file

from gittheta_merge.merge import runner
from gittheta_merge.merge.api import merge_files, merge_metadata
from gittheta_merge.merge.plan import MergeOptions
from gittheta_merge.merge.strategies import average, task_arithmetic, ties
from gittheta_merge.merge.strategies.ties import elect_and_merge
from gittheta_merge.storage.store import CorruptObject, ObjectStore

STREAMING = [("average", {}), ("task_arithmetic", {"lambda": 0.7}), ("ties", {"density": 0.3, "lambda": 0.9}),
             ("ties_local", {"density": 0.4})]
SHAPES = {"emb.weight": (301, 37), "l0.weight": (64, 48), "l0.bias": (64,), "ln.weight": (48,), "scale": (),
          "empty": (0, 4)}


def _run(tmp_path: Path, name: str, base, models, strategy, params, **kw):
    d = tmp_path / name
    d.mkdir()
    bpath, paths = write_files(d, base, models)
    report = merge_files(paths, d / "out.safetensors", base=bpath, strategy=strategy, params=params, **kw)
    return load_file(str(d / "out.safetensors")), report


def _set_chunk(monkeypatch, nbytes: int) -> None:
    for cls in (average.Average, task_arithmetic.TaskArithmetic, ties.Ties):
        monkeypatch.setattr(cls, "chunk_bytes", nbytes)


@pytest.mark.parametrize("strategy,params", STREAMING)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunk_size_does_not_change_results(tmp_path: Path, monkeypatch, strategy, params, dtype) -> None:
    base, models = family(3, seed=21, dtype=dtype, shapes=SHAPES)
    want, rep_want = _run(tmp_path, "default", base, models, strategy, params)
    for i, nbytes in enumerate([64, 1000, 1 << 30]):  # below one row, a few rows, everything at once
        _set_chunk(monkeypatch, nbytes)
        got, rep = _run(tmp_path, f"c{i}", base, models, strategy, params)
        for k in want:
            assert torch.equal(got[k], want[k]), (nbytes, k)
        assert rep.get("strategies") == rep_want.get("strategies")


def test_ties_equals_stacked_reference_bit_for_bit(tmp_path: Path) -> None:
    """The float-op merge (sigma, relu, counts) gives exactly what elect_and_merge gives on the same trims."""
    base, models = family(3, seed=22, dtype=torch.bfloat16, noise=0.02, shapes=SHAPES)
    got, report = _run(tmp_path, "r", base, models, "ties", {"density": 0.25, "lambda": 0.8})
    summ = report["strategies"]["ties"]
    b, ms = f32(base), [f32(m) for m in models]
    for k in base:
        taus = [m[k] - b[k] for m in ms]
        trimmed = torch.stack([t * (t.abs() >= th) for t, th in zip(taus, summ["thresholds"])])
        merged, _, _ = elect_and_merge(trimmed, summ["majority_sign"])
        assert torch.equal(got[k], (b[k] + 0.8 * merged).to(torch.bfloat16)), k


def test_exact_cancellation_follows_majority(tmp_path: Path) -> None:
    """Trimmed entries that cancel exactly (elected sign 0) take the global majority sign; with majority 0
    the negative entries are selected, as in the reference."""
    base = {"w": torch.zeros(6), "v": torch.zeros(4)}
    a = {"w": torch.tensor([1.0, -1.0, 2.0, 3.0, 4.0, -5.0]), "v": torch.tensor([2.0, 2.0, 2.0, 0.0])}
    b = {"w": torch.tensor([-1.0, 1.0, 2.0, 3.0, 4.0, -5.0]), "v": torch.tensor([-2.0, 2.0, 2.0, 0.0])}
    got, rep = _run(tmp_path, "m", base, [a, b], "ties", {"density": 1.0})
    assert rep["strategies"]["ties"]["majority_sign"] == 1.0  # sign sum: 0+0+1+1+1-1 + 0+1+1+0 > 0
    assert got["w"].tolist() == [1.0, 1.0, 2.0, 3.0, 4.0, -5.0]
    assert got["v"].tolist() == [2.0, 2.0, 2.0, 0.0]
    b2 = {"w": -a["w"], "v": -a["v"]}  # everything cancels: majority 0 -> negative entries selected
    got, rep = _run(tmp_path, "z", base, [a, b2], "ties", {"density": 1.0})
    assert rep["strategies"]["ties"]["majority_sign"] == 0.0
    assert got["w"].tolist() == [-1.0, -1.0, -2.0, -3.0, -4.0, -5.0]


def test_mixed_input_dtypes(tmp_path: Path) -> None:
    """Each input is converted from its own dtype; the output takes model 0's."""
    base, models = family(2, seed=23, shapes=SHAPES)
    base = {k: v.to(torch.float16) for k, v in base.items()}
    models = [{k: v.to(torch.bfloat16) for k, v in models[0].items()}, models[1]]
    got, _ = _run(tmp_path, "x", base, models, "task_arithmetic", {"lambda": 0.5})
    b, ms = f32(base), [f32(m) for m in models]
    for k in base:
        want = b[k] + 0.5 * ((ms[0][k] - b[k]) + (ms[1][k] - b[k]))
        assert got[k].dtype == torch.bfloat16
        assert torch.equal(got[k], want.to(torch.bfloat16)), k


def test_store_source_reads_verified_once_and_catches_corruption(tmp_path: Path, monkeypatch) -> None:
    _set_chunk(monkeypatch, 256)  # many chunks per stored block
    store = ObjectStore(tmp_path / "lfs")
    base, models = family(2, seed=24, shapes=SHAPES)
    metas = [to_meta(m, store, block_bytes=2048) for m in models]
    bmeta = to_meta(base, store, block_bytes=2048)
    merged, _ = merge_metadata(metas, bmeta, store, MergeOptions(strategy="ties", params={"density": 0.3}))
    files, _ = _run(tmp_path, "f", base, models, "ties", {"density": 0.3})
    got = from_meta(merged, store)
    for k in files:
        assert torch.equal(got[k], files[k]), k
    # flip one byte in the middle of a multi-block tensor's object (same size): the merge must fail
    oid = metas[1].by_name()["emb.weight"].oids[1]
    flip_byte(store, oid, store.size(oid) // 2, 0x40)
    with pytest.raises(CorruptObject, match="emb.weight"):
        merge_metadata(metas, bmeta, store, MergeOptions(strategy="average"))


def test_torch_threads_restored(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    base, models = family(2, seed=25)
    _run(tmp_path, "t", base, models, "ties", {})
    assert torch.get_num_threads() == before
    with runner.intra_op_threads(ties.Ties({}, 2)):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("strategy,params", STREAMING)
def test_prefetch_thread_gives_identical_results(tmp_path: Path, monkeypatch, strategy, params) -> None:
    _set_chunk(monkeypatch, 1000)  # several chunks per tensor, so the helper thread really runs ahead
    base, models = family(3, seed=26, dtype=torch.bfloat16, shapes=SHAPES)
    want, rep_want = _run(tmp_path, "plain", base, models, strategy, params, prefetch=False)
    got, rep = _run(tmp_path, "prefetch", base, models, strategy, params, prefetch=True)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert rep.get("strategies") == rep_want.get("strategies")
    strip = lambda r: [{k: v for k, v in t.items() if k != "seconds"} for t in r["tensors"]]  # noqa: E731
    assert strip(rep) == strip(rep_want)


@pytest.mark.parametrize("fused", [True, False], ids=["compiled", "numpy"])
@pytest.mark.parametrize("strategy,params", STREAMING[:2])
def test_prefetch_on_the_object_store_verifies_and_matches(tmp_path: Path, monkeypatch, strategy, params,
                                                           fused) -> None:
    """The torch-free path (compiled kernel or numpy) with a prefetch thread reading (and merging) from stored
    objects: same tensors as without, and a corrupt object is still caught (one helper reads each object front
    to back, so hashing completes)."""
    _set_chunk(monkeypatch, 256)
    store = ObjectStore(tmp_path / "lfs")
    base, models = family(2, seed=27, dtype=torch.bfloat16, shapes=SHAPES)
    metas = [to_meta(m, store, block_bytes=2048) for m in models]
    bmeta = to_meta(base, store, block_bytes=2048)
    opts = {"strategy": strategy, "params": params, "fused_kernel": fused}
    plain, rep_plain = merge_metadata(metas, bmeta, store, MergeOptions(**opts, prefetch=False))
    ahead, rep = merge_metadata(metas, bmeta, store, MergeOptions(**opts, prefetch=True))
    assert rep.report["kernels"] == rep_plain.report["kernels"] == ("compiled" if fused else "numpy")
    want, got = from_meta(plain, store), from_meta(ahead, store)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    flip_byte(store, metas[0].by_name()["emb.weight"].oids[-1], -1, 0x01)
    with pytest.raises(CorruptObject, match="emb.weight"):
        merge_metadata(metas, bmeta, store, MergeOptions(**opts, prefetch=True))
