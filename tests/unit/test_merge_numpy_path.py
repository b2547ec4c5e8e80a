"""The torch-free path (numpy kernels for average / task arithmetic, and the compiled kernel over F32/BF16):
conversions equal torch's bit for bit, merges equal the torch path bit for bit on all three, and it is taken
only when every merged tensor allows it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from merge_helpers import family, write_files
from safetensors.torch import load_file

from gittheta_merge.merge import npkernels
from gittheta_merge.merge.api import merge_files
from gittheta_merge.merge.buffers import Pool

SHAPES = {"emb.weight": (301, 37), "l0.weight": (64, 48), "l0.bias": (64,), "scale": (), "empty": (0, 4)}


def _edge_floats() -> torch.Tensor:
    """Random bit patterns (every exponent, NaNs excluded) plus values on bf16 rounding ties and edges."""
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = x[~torch.isnan(x)]
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F817FFF, 0x7F7FFFFF, 0x7F7F8000, 0x00008000,
                         0x00018000, 0x80008000, 0x7F800000, -0x00800000, 0, -(2**31), 1], dtype=torch.int64)
    ties = ties.to(torch.int32).view(torch.float32)
    return torch.cat([x, ties])


@pytest.mark.parametrize("dtype,name", [(torch.bfloat16, "BF16"), (torch.float16, "F16"), (torch.float32, "F32")])
def test_conversions_match_torch(dtype, name) -> None:
    x = _edge_floats()
    pool = Pool()
    got = npkernels.from_f32(x.numpy(), name, pool)
    want = x.to(dtype)
    assert np.array_equal(np.asarray(got).view(np.uint8), want.view(torch.uint8).numpy())
    back = np.empty(want.numel(), np.float32)
    npkernels.to_f32(want.view(torch.uint8).numpy(), name, back)
    assert np.array_equal(back.view(np.uint32), want.to(torch.float32).view(torch.int32).numpy().view(np.uint32))


def test_bf16_nan_becomes_canonical_nan() -> None:
    x = np.array([1.0, np.nan, -np.nan, 2.0], np.float32)
    x.view(np.uint32)[2] = 0xFFFFFFFF  # a negative NaN whose rounding would wrap
    got = npkernels.from_f32(x, "BF16", Pool())
    assert got.tolist() == [0x3F80, 0x7FC0, 0x7FC0, 0x4000]


def _merge(tmp: Path, tag: str, base, models, strategy, params, numpy_kernels: bool, **kw):
    d = tmp / tag
    d.mkdir()
    bpath, paths = write_files(d, base, models)
    rep = merge_files(paths, d / "out.safetensors", base=bpath, strategy=strategy, params=params,
                      numpy_kernels=numpy_kernels, **kw)
    return load_file(str(d / "out.safetensors")), rep


@pytest.mark.parametrize("strategy,params", [("average", {}), ("average", {"weights": [0.3, 1.7, 0.9]}),
                                             ("average", {"weights": [2, -1, 0.5], "normalize": False}),
                                             ("task_arithmetic", {}),
                                             ("task_arithmetic", {"lambda": 0.37, "weights": [0.7, 0.2, 1.1]})])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_numpy_path_equals_torch_path(tmp_path: Path, strategy, params, dtype) -> None:
    base, models = family(3, seed=31, dtype=dtype, shapes=SHAPES)
    got, rep = _merge(tmp_path, "np", base, models, strategy, params, True, fused_kernel=False)
    compiled, rep_c = _merge(tmp_path, "c", base, models, strategy, params, True)
    want, rep_t = _merge(tmp_path, "t", base, models, strategy, params, False)
    assert rep["kernels"] == "numpy" and rep_t["kernels"] == "torch"
    assert rep_c["kernels"] == ("numpy" if dtype == torch.float16 else "compiled")  # the kernel has no F16
    for k in want:
        for path in (got, compiled):
            assert path[k].dtype == want[k].dtype and torch.equal(path[k].reshape(-1).view(torch.uint8),
                                                                   want[k].reshape(-1).view(torch.uint8)), k


def test_torch_path_when_a_tensor_needs_it(tmp_path: Path) -> None:
    """One rule-merged tensor with TIES, or an F64 input, sends the whole merge through torch."""
    base, models = family(2, seed=32, shapes=SHAPES)
    d = tmp_path / "r"
    d.mkdir()
    bpath, paths = write_files(d, base, models)
    rep = merge_files(paths, d / "o.safetensors", base=bpath, strategy="average", rules=["^l0=ties"])
    assert rep["kernels"] == "torch"
    base64 = dict(base, scale=base["scale"].double())
    d2 = tmp_path / "f64"
    d2.mkdir()
    bpath, paths = write_files(d2, base64, [dict(m, scale=m["scale"].double()) for m in models])
    rep = merge_files(paths, d2 / "o.safetensors", base=bpath, strategy="task_arithmetic")
    assert rep["kernels"] == "torch"


def test_merge_files_cli_average_never_imports_torch(tmp_path: Path) -> None:
    base, models = family(2, seed=33, dtype=torch.bfloat16, shapes=SHAPES)
    bpath, paths = write_files(tmp_path, base, models)
    code = ("import sys\nfrom gittheta_merge.merge.commands import merge_files_cmd\n"
            "try:\n    merge_files_cmd.main(sys.argv[1:], standalone_mode=False)\n"
            "finally:\n    print('TORCH' if 'torch' in sys.modules else 'NOTORCH')\n")
    out = subprocess.run([sys.executable, "-c", code, *paths, "--base", str(bpath), "-o",
                          str(tmp_path / "o.safetensors"), "--strategy", "average"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "NOTORCH"
