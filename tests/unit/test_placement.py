"""stats/placement.py's text handling: --max-memory parsing and the printed placement (runs of layers)."""

from __future__ import annotations

import pytest

from gittheta_merge.errors import UsageError
from gittheta_merge.stats import placement


def test_max_memory_pairs_become_accelerates_dict() -> None:
    assert placement.parse_max_memory("0=20GB, cpu=8GiB,1=512MB") == {0: "20GB", "cpu": "8GiB", 1: "512MB"}
    assert placement.parse_max_memory(None) is None
    for bad in ("20GB", "cpu=", "cpu=lots", "=3GB"):
        with pytest.raises(UsageError, match="DEVICE=SIZE"):
            placement.parse_max_memory(bad)


class _Placed:
    def __init__(self, device_map: dict) -> None:
        self.hf_device_map = device_map


def test_the_placement_lists_runs_of_layers_per_device() -> None:
    model = _Placed({"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": "cpu",
                     "model.layers.3": "disk", "model.layers.4": "disk", "model.layers.5": "disk",
                     "model.norm": "disk", "lm_head": "disk"})
    assert placement.describe(model).splitlines() == [
        "  cuda:0: model.embed_tokens, model.layers.0-1",
        "  cpu: model.layers.2",
        "  disk: model.layers.3-5, model.norm, lm_head"]
    assert placement.execution_device(model) == "cuda:0"
    assert placement.execution_device(_Placed({"": "cpu"})) == "cpu"


def test_every_kind_is_computed_on_a_split_model_but_not_under_torchrun() -> None:
    for kind in ("gram", "fisher", "kfac"):  # fisher and kfac layer by layer (stats/layerwise.py)
        placement.check(kind, distributed=False)
    with pytest.raises(UsageError, match="not lfisher"):
        placement.check("lfisher", distributed=False)
    with pytest.raises(UsageError, match="torchrun"):
        placement.check("gram", distributed=True)
