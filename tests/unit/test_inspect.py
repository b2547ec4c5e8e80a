"""`git theta diff` statistics (revisions.change_stats, numpy; torch only for float8) against the formulas
computed with torch on whole tensors: ‖Δ‖₂, ‖Δ‖/‖old‖ and max |Δ| in float64, and the fraction of entries
whose values differ (-0.0 equals 0.0, NaN differs from everything), over several stored blocks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gittheta_merge import dtypes
from gittheta_merge.storage import revisions
from gittheta_merge.storage.metadata import TensorEntry
from gittheta_merge.storage.revisions import change_stats
from gittheta_merge.storage.store import ObjectStore


def _entry(store: ObjectStore, name: str, t: torch.Tensor, rows_per_block: int) -> TensorEntry:
    blocks = []
    for lo in range(0, t.shape[0], rows_per_block):
        part = t[lo: lo + rows_per_block].contiguous()
        oid, _ = store.put(part.view(torch.uint8).numpy().tobytes() if part.dtype != torch.bool
                           else part.to(torch.uint8).numpy().tobytes())
        blocks.append((oid, part.shape[0]))
    return TensorEntry(name, dtypes.from_torch(t.dtype), list(t.shape), blocks)


def _reference(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    if a.dtype == torch.bool:
        a, b = a.to(torch.uint8), b.to(torch.uint8)
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    delta = b64 - a64
    norm = float(delta.norm())
    old = float(a64.norm())
    return {"l2": norm, "relative": norm / old if old else (math.inf if norm else 0.0),
            "max_abs": float(delta.abs().max()), "changed_fraction": float((a != b).double().mean())}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
                                   torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn])
def test_change_stats_equal_the_formulas(tmp_path: Path, monkeypatch, dtype: torch.dtype) -> None:
    """In chunks of 7 elements that straddle the stored blocks, with the two versions stored in different
    blocks (8 rows vs 5): the elements still line up."""

    monkeypatch.setattr(revisions, "STATS_CHUNK_ELEMS", 7)
    g = torch.Generator().manual_seed(3)
    if dtype == torch.bool:
        a = torch.rand(37, 5, generator=g) > 0.5
        b = a.clone()
        b[3:9] = ~b[3:9]
    elif dtype.is_floating_point:
        a64 = torch.randn(37, 5, generator=g, dtype=torch.float64) * 2
        b64 = a64.clone()
        b64[4:30:3] += torch.randn(9, 5, generator=g, dtype=torch.float64)
        a64[0, 0], b64[0, 0] = -0.0, 0.0  # equal values: not a change
        a, b = a64.to(dtype), b64.to(dtype)  # (float8 has no arithmetic in torch: built in float64)
    else:
        hi = 2**62 if dtype == torch.int64 else 100
        a = torch.randint(0 if dtype == torch.uint8 else -hi, hi, (37, 5), generator=g, dtype=torch.int64).to(dtype)
        b = a.clone()
        b[10:12] += 1  # int64 near 2**62: a change float64 cannot see, equality still does
    store = ObjectStore(tmp_path / "lfs")
    got = change_stats(store, _entry(store, "t", a, 8), _entry(store, "t", b, 5))
    want = _reference(a, b)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-300), key
    assert 0 < got["changed_fraction"] < 1


def test_nan_counts_as_changed(tmp_path: Path) -> None:
    a = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
    store = ObjectStore(tmp_path / "lfs")
    got = change_stats(store, _entry(store, "t", a, 1), _entry(store, "t", a.clone(), 1))
    assert got["changed_fraction"] == 0.25  # NaN != NaN, as in torch and IEEE
