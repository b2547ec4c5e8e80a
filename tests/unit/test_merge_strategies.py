"""Every strategy against an independent whole-model implementation written from merge-methods.md."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from merge_helpers import f32, family, max_rel_err, write_files
from safetensors.torch import load_file

from gittheta_merge.merge.api import merge_files
from gittheta_merge.merge.strategies.dare import dare_keep_mask

TOL = 1e-6


def run(tmp_path: Path, base, models, strategy, params=None, **kw):
    bpath, paths = write_files(tmp_path, base, models)
    out = tmp_path / "out.safetensors"
    report = merge_files(paths, out, base=bpath, strategy=strategy, params=params or {}, **kw)
    return load_file(str(out)), report


def assert_close(got: dict, want: dict, tol: float = TOL) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert max_rel_err(got[k].float(), want[k].float()) <= tol, k


# ---- independent references (whole model, in memory, straight from the formulas) -----------------

def ref_average(models, weights=None, normalize=True):
    w = weights or [1.0] * len(models)
    total = sum(w) if normalize else 1.0
    return {k: sum(wi * m[k] for wi, m in zip(w, models)) / total for k in models[0]}


def ref_task_arithmetic(base, models, lam, weights=None):
    w = weights or [1.0] * len(models)
    return {k: base[k] + lam * sum(wi * (m[k] - base[k]) for wi, m in zip(w, models)) for k in base}


def ref_ties_flat(base, models, density, lam):
    """The TIES reference: flatten over sorted keys, kthvalue threshold, mass sign, global majority."""
    keys = sorted(base)
    flat = lambda sd: torch.cat([sd[k].reshape(-1) for k in keys])  # noqa: E731
    b = flat(base)
    tv = torch.stack([flat(m) - b for m in models])
    d = tv.shape[1]
    k_keep = int(d * (density * 100) / 100)
    trimmed = []
    for v in tv:
        t = v.abs().kthvalue(d - k_keep).values if d - k_keep > 0 else torch.tensor(0.0)
        trimmed.append(v * (v.abs() >= t))
    tr = torch.stack(trimmed)
    sign = torch.sign(tr.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, tr > 0, tr < 0)
    sel = tr * keep
    merged = sel.sum(0) / torch.clamp((sel != 0).sum(0).float(), min=1)
    out_flat = b + lam * merged
    out, pos = {}, 0
    for k in keys:
        n = base[k].numel()
        out[k] = out_flat[pos:pos + n].reshape(base[k].shape)
        pos += n
    return out


def ref_ties_local(base, models, density, lam):
    """mergekit's ties, from its formulas: per tensor keep the max(1, int(density*n)) largest |tau| (argsort), elect
    + where the trimmed sum is >= 0, else -, and average the entries whose sign equals the elected one."""
    out = {}
    for k in base:
        taus = []
        for m in models:
            tau = (m[k] - base[k]).reshape(-1)
            keep = max(1, int(density * tau.numel()))
            mask = torch.zeros_like(tau)
            mask[torch.argsort(tau.abs(), descending=True)[:keep]] = 1
            taus.append(tau * mask)
        tv = torch.stack(taus)
        elected = (tv.sum(0) >= 0).float() * 2 - 1
        agree = (tv.sign() == elected).float()
        merged = (tv * agree).sum(0) / agree.sum(0).clamp(min=1)
        out[k] = base[k] + lam * merged.reshape(base[k].shape)
    return out


# ---- tests -------------------------------------------------------------------------------------------

def test_average_uniform_and_weighted(tmp_path: Path) -> None:
    _, models = family(3)
    got, _ = run(tmp_path, None, models, "average")
    assert_close(got, ref_average(models))
    got, _ = run(tmp_path, None, models, "average", {"weights": "0.5,0.3,0.2"})
    assert_close(got, ref_average(models, [0.5, 0.3, 0.2]))
    got, _ = run(tmp_path, None, models, "average", {"weights": [2, 1, 1], "normalize": False})
    assert_close(got, ref_average(models, [2, 1, 1], normalize=False))


@pytest.mark.parametrize("lam,weights", [(1.0, None), (0.4, None), (0.3, [0.7, 0.3])])
def test_task_arithmetic(tmp_path: Path, lam, weights) -> None:
    base, models = family(2, seed=1)
    params = {"lambda": lam} | ({"weights": weights} if weights else {})
    got, _ = run(tmp_path, base, models, "task_arithmetic", params)
    assert_close(got, ref_task_arithmetic(base, models, lam, weights))


def test_task_arithmetic_two_model_lambda_applies_to_the_sum(tmp_path: Path) -> None:
    """Our convention: lambda scales tau_1 + tau_2 (not git-theta's [lambda, 1 - lambda])."""
    base, models = family(2, seed=2)
    got, _ = run(tmp_path, base, models, "task_arithmetic", {"lambda": 0.3})
    want = {k: base[k] + 0.3 * ((models[0][k] - base[k]) + (models[1][k] - base[k])) for k in base}
    assert_close(got, want)


@pytest.mark.parametrize("n_models,density,lam", [(2, 0.2, 1.0), (3, 0.2, 0.8), (3, 0.5, 1.0), (2, 0.0, 1.0),
                                                  (2, 1.0, 1.0)])
def test_ties_exact_matches_global_flatten_reference(tmp_path: Path, n_models, density, lam) -> None:
    base, models = family(n_models, seed=3)
    got, report = run(tmp_path, base, models, "ties", {"density": density, "lambda": lam})
    assert_close(got, ref_ties_flat(base, models, density, lam))
    summ = report["strategies"]["ties"]
    assert summ["elements"] == sum(v.numel() for v in base.values())


def test_ties_is_global_not_per_tensor(tmp_path: Path) -> None:
    """A tensor with tiny deltas loses (almost) everything under the global top-k, unlike ties_local."""
    base, models = family(2, seed=4)
    for m in models:
        m["l1.weight"] = base["l1.weight"] + 1e-4 * torch.randn(base["l1.weight"].shape)
    got, _ = run(tmp_path, base, models, "ties", {"density": 0.2})
    assert torch.equal(got["l1.weight"], base["l1.weight"])
    local, _ = run(tmp_path, base, models, "ties_local", {"density": 0.2})
    assert not torch.equal(local["l1.weight"], base["l1.weight"])


def test_ties_bf16_ties_at_threshold(tmp_path: Path) -> None:
    """bf16 deltas make many exact ties at the threshold: still identical to the reference (in fp32)."""
    base, models = family(3, seed=5, dtype=torch.bfloat16)
    got, _ = run(tmp_path, base, models, "ties", {"density": 0.3})
    want = ref_ties_flat(f32(base), [f32(m) for m in models], 0.3, 1.0)
    for k in want:
        assert torch.equal(got[k], want[k].to(torch.bfloat16)), k


def test_ties_local_matches_per_tensor_reference(tmp_path: Path) -> None:
    base, models = family(3, seed=6)
    got, _ = run(tmp_path, base, models, "ties_local", {"density": 0.25, "lambda": 0.9})
    assert_close(got, ref_ties_local(base, models, 0.25, 0.9))


def ref_dare(base, models, drop, seed, lam, rescale=True, elect=False, weights=None):
    out = {}
    w = weights or [1.0] * len(models)
    for k in base:
        sparse = []
        for i, m in enumerate(models):
            keep = dare_keep_mask(seed, k, i, list(base[k].shape), drop)
            sparse.append((m[k] - base[k]) * keep / ((1 - drop) if rescale else 1.0))
        if elect:
            tr = torch.stack(sparse)
            sign = torch.sign(tr.sum(0))
            sel = tr * torch.where(sign > 0, tr > 0, tr < 0)
            merged = sel.sum(0) / torch.clamp((sel != 0).sum(0).float(), min=1)
        else:
            merged = sum(wi * s for wi, s in zip(w, sparse))
        out[k] = base[k] + lam * merged
    return out


@pytest.mark.parametrize("elect", [False, True])
def test_dare_formula_and_chunking(tmp_path: Path, elect) -> None:
    base, models = family(2, seed=7)
    params = {"drop": 0.7, "seed": 11, "lambda": 0.8, "elect": elect}
    got, _ = run(tmp_path, base, models, "dare", params)
    assert_close(got, ref_dare(base, models, 0.7, 11, 0.8, elect=elect))
    chunked, _ = run(tmp_path, base, models, "dare", params, max_block_bytes=64)
    for k in got:
        assert torch.equal(got[k], chunked[k]), k


def test_dare_mask_is_reproducible_and_drops_p() -> None:
    a = dare_keep_mask(3, "x.weight", 0, [3000, 700], 0.9)
    b = dare_keep_mask(3, "x.weight", 0, [3000, 700], 0.9)
    assert torch.equal(a, b)
    assert abs(float(a.float().mean()) - 0.1) < 0.005
    assert torch.equal(dare_keep_mask(3, "x.weight", 0, [3000, 700], 0.9, 1234, 2999), a[1234:2999])
    assert not torch.equal(dare_keep_mask(4, "x.weight", 0, [3000, 700], 0.9), a)
    assert not torch.equal(dare_keep_mask(3, "x.weight", 1, [3000, 700], 0.9), a)


@pytest.mark.parametrize("strategy,params", [("average", {}), ("task_arithmetic", {"lambda": 0.5}),
                                             ("ties", {"density": 0.3}), ("ties_local", {}),
                                             ("dare", {"drop": 0.5, "elect": True})])
def test_tiny_blocks_equal_unchunked(tmp_path: Path, strategy, params) -> None:
    base, models = family(3, seed=8)
    whole, _ = run(tmp_path, base, models, strategy, params)
    tiny, _ = run(tmp_path, base, models, strategy, params, max_block_bytes=1)
    for k in whole:
        assert torch.equal(whole[k], tiny[k]), k


def test_output_keeps_model_dtype_and_computes_in_fp32(tmp_path: Path) -> None:
    base, models = family(2, seed=9, dtype=torch.float16)
    got, _ = run(tmp_path, base, models, "task_arithmetic", {"lambda": 0.5})
    want = ref_task_arithmetic(f32(base), [f32(m) for m in models], 0.5)
    for k in want:
        assert got[k].dtype == torch.float16
        assert torch.equal(got[k], want[k].to(torch.float16)), k
