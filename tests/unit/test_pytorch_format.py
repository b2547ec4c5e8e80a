"""PyTorch plugin: nested checkpoints value-exact, code-carrying pickles refused."""

from __future__ import annotations

import io
import math
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from gittheta_merge.errors import ThetaError
from gittheta_merge.formats.base import Context
from gittheta_merge.formats.pytorch_format import PytorchFormat
from gittheta_merge.storage.store import ObjectStore


def assert_same(a: object, b: object) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape  # type: ignore[union-attr]
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.bool else a, b.view(torch.uint8)
                           if b.dtype == torch.bool else b)  # type: ignore[union-attr]
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys())  # type: ignore[union-attr]
        for k in a:
            assert_same(a[k], b[k])  # type: ignore[index]
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)  # type: ignore[arg-type]
        for x, y in zip(a, b):  # type: ignore[call-overload]
            assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)  # type: ignore[arg-type]
    else:
        assert a == b


def round_trip(tmp_path: Path, obj: object, legacy: bool = False, block: int = 64 << 20):
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    store = ObjectStore(tmp_path / "lfs")
    ctx = Context("ckpt.pt", store, block, str(tmp_path))
    fmt = PytorchFormat()
    meta = fmt.clean(io.BytesIO(buf.getvalue()), ctx)
    out = io.BytesIO()
    fmt.smudge(meta, out, ctx)
    out.seek(0)
    return meta, torch.load(out, weights_only=True)


def nested_checkpoint() -> dict:
    gen = torch.Generator().manual_seed(1)
    model = OrderedDict((f"enc.{i}.weight", torch.randn(8, 4, generator=gen)) for i in range(3))
    model["enc.emb"] = torch.randn(10, 4, generator=gen).to(torch.bfloat16)
    model["mask"] = torch.rand(5, generator=gen) > 0.5
    return {
        "model": model,
        "optimizer": {"state": {0: {"step": torch.tensor(12.0), "exp_avg": torch.randn(8, 4, generator=gen)}},
                      "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0, 1, 2]}]},
        "epoch": 3, "loss": float("nan"), "best": float("inf"), "name": "run-7", "done": False,
        "none": None, "shape": torch.Size([3, 4]), "dtype": torch.float16, "blob": b"\x00\x01",
        "fp8": torch.randn(4, 4, generator=gen).to(torch.float8_e4m3fn), "scalar": torch.tensor(7),
    }


def test_nested_checkpoint_is_value_exact(tmp_path: Path) -> None:
    obj = nested_checkpoint()
    meta, back = round_trip(tmp_path, obj)
    assert_same(obj, back)
    names = {t.name for t in meta.tensors}
    assert "model/enc.0.weight" in names and "optimizer/state/0/exp_avg" in names


def test_flat_state_dict_names_are_the_keys(tmp_path: Path) -> None:
    state = {"a.weight": torch.ones(3, 3), "a.bias": torch.zeros(3)}
    meta, back = round_trip(tmp_path, state, block=12)
    assert [t.name for t in meta.tensors] == ["a.weight", "a.bias"]
    assert len(meta.by_name()["a.weight"].blocks) == 3  # row blocks work here too
    assert_same(state, back)


def test_legacy_format_and_parameters(tmp_path: Path) -> None:
    obj = {"p": torch.nn.Parameter(torch.randn(3, 2)), "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False)}
    _, back = round_trip(tmp_path, obj, legacy=True)
    assert isinstance(back["p"], torch.nn.Parameter) and back["p"].requires_grad
    assert not back["frozen"].requires_grad
    assert torch.equal(back["p"].data, obj["p"].data)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ThetaError, match="could run arbitrary code") as info:
        round_trip(tmp_path, {"w": torch.ones(2), "x": Evil()})
    assert "ckpt.pt" in str(info.value)


def test_truncated_and_garbage_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(100)}, buf)
    store = ObjectStore(tmp_path / "lfs")
    ctx = Context("ckpt.pt", store, 1 << 20, str(tmp_path))
    with pytest.raises(ThetaError, match="ckpt.pt"):
        PytorchFormat().clean(io.BytesIO(buf.getvalue()[:300]), ctx)
    with pytest.raises(ThetaError, match="ckpt.pt"):
        PytorchFormat().clean(io.BytesIO(pickle.dumps({"a": 1})[:5]), ctx)
    assert list((tmp_path).glob("theta-spool-*")) == []  # spool files cleaned up
