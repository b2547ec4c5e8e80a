"""Fisher, RegMean and MaTS against independent implementations (statistics given as safetensors files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from merge_helpers import family, max_rel_err, write_files
from safetensors.torch import load_file, save_file

from gittheta_merge.errors import ThetaError
from gittheta_merge.merge.api import merge_files, plan_files

TOL = 1e-6
LINEAR = ("l0.weight", "l1.weight")


def stat_files(tmp: Path, kind: str, per_model: list[dict]) -> list[str]:
    paths = []
    for i, sd in enumerate(per_model):
        p = tmp / f"{kind}{i}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
        paths.append(str(p))
    return paths


def fishers(base: dict, n: int, seed: int = 0, zero_frac: float = 0.0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        f = {k: torch.rand(v.shape, generator=gen) ** 4 for k, v in base.items()}
        if zero_frac:
            f = {k: v * (torch.rand(v.shape, generator=gen) > zero_frac) for k, v in f.items()}
        out.append(f)
    return out


def grams(base: dict, n: int, seed: int = 0, rank: int | None = None) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        g = {}
        for k in LINEAR:
            d = base[k].shape[1]
            x = torch.randn(rank or 3 * d, d, generator=gen)
            g[k[: -len(".weight")]] = x.T @ x / x.shape[0]  # keyed by module name on purpose
        out.append(g)
    return out


def merge(tmp: Path, models, strategy, params, stats, base=None, **kw):
    bpath, paths = write_files(tmp, base, models)
    out = tmp / "out.safetensors"
    report = merge_files(paths, out, base=bpath, strategy=strategy, params=params, stats=stats, **kw)
    return load_file(str(out)), report


def ref_fisher(models, fs, floor=1e-6, favor_target=True, normalize=True, coeffs=None):
    coeffs = coeffs or [1.0] * len(models)
    if normalize:
        norms = [float(torch.sqrt(sum((f[k].double() ** 2).sum() for k in f))) for f in fs]
        coeffs = [c / n for c, n in zip(coeffs, norms)]
    out = {}
    for k in models[0]:
        num = den = 0
        for i, (c, m, f) in enumerate(zip(coeffs, models, fs)):
            ff = f[k].clamp(min=floor) if (i == 0 or not favor_target) else f[k]
            num = num + c * ff * m[k]
            den = den + c * ff
        out[k] = num / den
    return out


@pytest.mark.parametrize("favor_target,normalize", [(True, True), (False, True), (True, False)])
def test_fisher_matches_formula(tmp_path: Path, favor_target, normalize) -> None:
    base, models = family(3, seed=1)
    fs = fishers(base, 3, zero_frac=0.3)
    params = {"favor_target": favor_target, "normalize": normalize, "weights": "1,2,0.5"}
    got, _ = merge(tmp_path, models, "fisher", params, {"fisher": stat_files(tmp_path, "f", fs)},
                   max_block_bytes=200)
    want = ref_fisher(models, fs, favor_target=favor_target, normalize=normalize, coeffs=[1, 2, 0.5])
    for k in want:
        assert max_rel_err(got[k], want[k]) <= TOL, k


def test_fisher_zero_everywhere_falls_back_to_target(tmp_path: Path) -> None:
    base, models = family(2, seed=2)
    fs = [{k: torch.zeros(v.shape) for k, v in base.items()} for _ in range(2)]
    for f in fs:
        f["l0.weight"] = torch.ones(base["l0.weight"].shape)  # keeps the norms non-zero
    got, _ = merge(tmp_path, models, "fisher", {}, {"fisher": stat_files(tmp_path, "f", fs)})
    assert torch.allclose(got["l1.weight"], models[0]["l1.weight"])


def test_fisher_missing_statistic_is_reported(tmp_path: Path) -> None:
    base, models = family(2, seed=3)
    fs = fishers(base, 2)
    del fs[1]["l1.weight"]
    bpath, paths = write_files(tmp_path, None, models)
    with pytest.raises(ThetaError, match="'l1.weight': no Fisher for model 1"):
        plan_files(paths, strategy="fisher", stats={"fisher": stat_files(tmp_path, "f", fs)})


def ref_regmean(models, gs, alpha=1.0, coeffs=None):
    m = len(models)
    coeffs = coeffs or [1.0 / m] * m
    out = {}
    for k in models[0]:
        key = k[: -len(".weight")]
        if key not in gs[0]:
            out[k] = sum(c * mod[k] for c, mod in zip(coeffs, models)) / sum(coeffs)
            continue
        gt = []
        for c, g in zip(coeffs, gs):
            g64 = g[key].double()
            gt.append(m * c * (alpha * g64 + (1 - alpha) * torch.diag(torch.diag(g64))))
        num = sum(mod[k].double() @ g for mod, g in zip(models, gt))
        out[k] = (num @ torch.linalg.inv(sum(gt))).float()
    return out


@pytest.mark.parametrize("alpha,coeffs", [(1.0, None), (0.3, None), (0.9, [0.7, 0.3])])
def test_regmean_matches_closed_form(tmp_path: Path, alpha, coeffs) -> None:
    base, models = family(2, seed=4)
    gs = grams(base, 2)
    params = {"alpha": alpha} | ({"weights": coeffs} if coeffs else {})
    got, report = merge(tmp_path, models, "regmean", params, {"gram": stat_files(tmp_path, "g", gs)},
                        max_block_bytes=300)
    want = ref_regmean(models, gs, alpha, coeffs)
    for k in want:
        assert max_rel_err(got[k], want[k]) <= TOL, k
    solved = {t["name"]: t for t in report["tensors"]}
    assert solved["l0.weight"]["solve"] == "cholesky" and "condition_number" in solved["l0.weight"]


def test_regmean_singular_gram_fallbacks(tmp_path: Path) -> None:
    base, models = family(2, seed=5)
    gs = grams(base, 2, rank=4)  # rank-deficient sums (rank 8 < 16)
    for g in gs:
        g["l0"][3, :] = 0
        g["l0"][:, 3] = 0  # feature 3 never active in any model
    got, report = merge(tmp_path, models, "regmean", {}, {"gram": stat_files(tmp_path, "g", gs)})
    w = got["l0.weight"].double()
    assert torch.isfinite(w).all()
    assert torch.allclose(w[:, 3], (models[0]["l0.weight"][:, 3] + models[1]["l0.weight"][:, 3]).double() / 2)
    total = sum(g["l0"].double() for g in gs)
    rhs = sum(m["l0.weight"].double() @ g["l0"].double() for m, g in zip(models, gs))
    assert torch.allclose(w @ total, rhs, atol=1e-4)  # still satisfies the normal equations
    methods = {t["name"]: t.get("solve") for t in report["tensors"]}
    assert methods["l0.weight"] in {"cholesky+ridge", "lstsq"}


def scipy_cg(op, b, x0, iterations):
    from scipy.sparse.linalg import LinearOperator, cg

    shape = b.shape
    n = b.numel()
    lin = LinearOperator((n, n), matvec=lambda v: op(torch.from_numpy(np.asarray(v).reshape(shape))).reshape(-1)
                         .numpy(), dtype=np.float64)
    x, code = cg(lin, b.reshape(-1).numpy(), x0=x0.reshape(-1).numpy(), maxiter=iterations, rtol=1e-5)
    return torch.from_numpy(x).reshape(shape), code


@pytest.mark.parametrize("objective,iterations", [("regmean", 5), ("regmean", 100), ("kfac", 7),
                                                  ("fisher_diag", 4), ("average", 3)])
def test_mats_matches_scipy_cg(tmp_path: Path, objective, iterations) -> None:
    base, models = family(2, seed=6)
    gs = grams(base, 2)
    gen = torch.Generator().manual_seed(9)
    outs = []
    for _ in range(2):
        o = {}
        for k in LINEAR:
            y = torch.randn(40, base[k].shape[0], generator=gen)
            o[k] = y.T @ y / 40
        outs.append(o)
    fs = fishers(base, 2, seed=3)
    stats = {"gram": stat_files(tmp_path, "g", gs), "kfac": stat_files(tmp_path, "o", outs),
             "fisher": stat_files(tmp_path, "f", fs)}
    params = {"objective": objective, "iterations": iterations, "init_lambda": 0.3}
    got, report = merge(tmp_path, models, "mats", params, stats, base=base)
    for k in base:
        ms = [m[k].double() for m in models]
        init = base[k].double() + 0.3 * sum(m - base[k].double() for m in ms)
        mean = sum(ms) / 2
        if objective == "average":
            want, _ = scipy_cg(lambda x: 2 * x, sum(ms), init, iterations)
        elif objective == "fisher_diag":
            f = [fi[k].double() for fi in fs]
            want, _ = scipy_cg(lambda x, f=f: (f[0] + f[1]) * x, f[0] * ms[0] + f[1] * ms[1], init, iterations)
        elif k in LINEAR:
            a = [g[k[:-7]].double() for g in gs]
            if objective == "regmean":
                want, _ = scipy_cg(lambda x, a=a: (a[0] + a[1]) @ x, a[0] @ ms[0].T + a[1] @ ms[1].T, init.T,
                                   iterations)
            else:
                o = [oi[k].double() for oi in outs]
                want, _ = scipy_cg(lambda x, a=a, o=o: a[0] @ x @ o[0] + a[1] @ x @ o[1],
                                   a[0] @ ms[0].T @ o[0] + a[1] @ ms[1].T @ o[1], init.T, iterations)
            want = want.T
        else:
            want = mean
        assert max_rel_err(got[k], want.float()) <= TOL, (k, objective)
    entry = {t["name"]: t for t in report["tensors"]}["l0.weight"]
    assert entry["cg_iterations"] <= iterations and "cg_final_residual" in entry


def test_mats_converges_to_regmean(tmp_path: Path) -> None:
    base, models = family(2, seed=7)
    gs = grams(base, 2)
    stats = {"gram": stat_files(tmp_path, "g", gs)}
    got, _ = merge(tmp_path, models, "mats", {"iterations": 500, "rtol": 1e-12, "init": "average"}, stats)
    want = ref_regmean(models, gs)
    assert max_rel_err(got["l1.weight"], want["l1.weight"]) < 1e-5


def test_regmean_normalize_divides_each_gram_by_its_token_count(tmp_path: Path) -> None:
    """normalize=true: the reference code's mean Gram. Statistic blobs record each sum's token count; model 1's
    Grams sum 7x the tokens of model 0's, which weighs it 7x without normalize and equally with it. A file without
    counts is refused at plan time, naming the tensor and the way out."""
    from gittheta_merge.stats.blobs import write_blob

    base, models = family(2, seed=5)
    gs = grams(base, 2)
    tokens = [100, 700]
    summed = [{k: v * n for k, v in g.items()} for g, n in zip(gs, tokens)]
    paths = []
    for i, (g, n) in enumerate(zip(summed, tokens)):
        p = tmp_path / f"blob{i}.safetensors"
        with open(p, "wb") as out:
            write_blob("gram", {k: v.contiguous() for k, v in g.items()}, {"counts": {k: n for k in g}}, out)
        paths.append(str(p))
    got, _ = merge(tmp_path, models, "regmean", {"normalize": True}, {"gram": paths})
    want = ref_regmean(models, gs)  # the mean Grams
    for k in want:
        assert max_rel_err(got[k], want[k]) <= TOL, k
    got_sums, _ = merge(tmp_path, models, "regmean", {}, {"gram": paths})
    want_sums = ref_regmean(models, summed)
    for k in want_sums:
        assert max_rel_err(got_sums[k], want_sums[k]) <= TOL, k
    assert max_rel_err(got_sums["l0.weight"], want["l0.weight"]) > 1e-3  # the two conventions differ here

    with pytest.raises(ThetaError, match="'l0.weight': regmean normalize=true .* does not record one"):
        merge(tmp_path, models, "regmean", {"normalize": True}, {"gram": stat_files(tmp_path, "g", gs)})
