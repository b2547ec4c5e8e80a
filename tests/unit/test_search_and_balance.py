"""The pieces of `--search` and of the distributed merge that need no git: the search space and score parsers, and
how tensors are dealt out to ranks."""

from __future__ import annotations

import pytest

from gittheta_merge.errors import ThetaError
from gittheta_merge.merge.distributed import balance
from gittheta_merge.merge.plan import MergePlan, TensorPlan
from gittheta_merge.merge.search import parse_score, parse_space
from gittheta_merge.merge.sources import TensorInfo


def test_space_ranges_grids_and_choices() -> None:
    dims = {d.name: d for d in parse_space("density=0.1:0.9, lambda=0.5:2.0:4", "ties")}
    assert dims["density"].grid() == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert dims["lambda"].grid() == [0.5, 1.0, 1.5, 2.0]
    mats = parse_space("iterations=10:100:3", "mats")[0]
    assert mats.integer and mats.grid() == [10, 55, 100]
    choice = parse_space("normalize=true|false", "fisher")[0]
    assert choice.grid() == ["true", "false"] and choice.contains("false") and not choice.contains("maybe")


@pytest.mark.parametrize("text,message", [
    ("density=0.1", "LOW:HIGH"), ("lambda=1:0", "LOW < HIGH"), ("nope=0:1", "no parameter 'nope'"),
    ("lambda=0:1,lambda=1:2", "given twice"), ("lambda=a:b", "must be numbers"), ("", "names no parameter"),
    ("density=0.5:1.5", "density"),  # outside what ties accepts
])
def test_space_mistakes(text: str, message: str) -> None:
    with pytest.raises(ThetaError, match=message):
        parse_space(text, "ties")


def test_scores() -> None:
    assert parse_score("loading...\n0.75\n", None, "x") == 0.75
    assert parse_score('{"acc": 0.5, "name": "val"}', None, "x") == 0.5  # the only numeric field
    assert parse_score('{"acc": 0.5, "loss": 2}', "loss", "x") == 2.0
    for out, metric, message in [("", None, "printed nothing"), ("ok", None, "neither a number nor JSON"),
                                 ('{"a": 1, "b": 2}', None, "--metric"), ('{"a": 1}', "b", "without a numeric"),
                                 ("NaN", None, "finite")]:
        with pytest.raises(ThetaError, match=message):
            parse_score(out, metric, "x")


class _Src:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype

    def info(self, name: str) -> TensorInfo:
        return TensorInfo(name, self.dtype, (4, 4), None)


def test_balance_deals_largest_first_and_leaves_free_outputs_to_rank_0() -> None:
    sizes = {"a": 1000, "b": 600, "c": 500, "d": 400, "e": 100}
    tensors = [TensorPlan(n, "merge", strategy="ties", info=TensorInfo(n, "F32", (rows, 1), None))
               for n, rows in sizes.items()]
    tensors.append(TensorPlan("kept", "keep", source=0, info=TensorInfo("kept", "F32", (9999, 1), None)))
    tensors.append(TensorPlan("converted", "keep", source=-1, info=TensorInfo("converted", "BF16", (300, 1), None)))
    plan = MergePlan(tensors, {}, n_models=2, max_block_bytes=1 << 20)
    owner = balance(plan, 2, [_Src("F32"), _Src("F32")], base=_Src("F32"))
    assert owner["a"] == 0 and owner["b"] == 1 and owner["c"] == 1 and "kept" not in owner
    assert "converted" in owner  # a dtype conversion copies data: it is work
    load = [sum(sizes.get(n, 0) for n, r in owner.items() if r == k) for k in (0, 1)]
    assert abs(load[0] - load[1]) <= max(sizes.values())
    assert balance(plan, 1, [_Src("F32")] * 2, base=_Src("F32")) == {n: 0 for n in owner}
