"""The mergekit-family strategies through git: SLERP under a plain `git merge` (the driver, two sides) and
breadcrumbs_ties under `git theta merge`; values against straight-from-the-formula float64 references (the
strategies also equal mergekit itself: tests/e2e/test_vs_mergekit.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import git
from safetensors.torch import load_file
from test_merge_git import commit_model, setup


def merged_three(repo: Path, strategy: str, *sets: str) -> tuple[dict, list[dict], dict]:
    """Three task branches merged into main with `git theta merge --strategy S --set …`: (base, models, merged)."""
    base, models = setup(repo, n_branches=3)
    args = [arg for item in sets for arg in ("--set", item)]
    git(repo, "theta", "merge", "t0", "t1", "t2", "--strategy", strategy, *args)
    return base, models, load_file(str(repo / "model.safetensors"))


def slerp_reference(t: float, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    x, y = a.double().numpy().ravel(), b.double().numpy().ravel()
    cos = np.clip(np.dot(x / np.linalg.norm(x), y / np.linalg.norm(y)), -1, 1)
    if abs(cos) > 0.9995:
        return ((1 - t) * x + t * y).reshape(a.shape)
    theta = np.arccos(cos)
    return ((np.sin((1 - t) * theta) * x + np.sin(t * theta) * y) / np.sin(theta)).reshape(a.shape)


def test_slerp_through_plain_git_merge(repo: Path) -> None:
    base, models = setup(repo)
    git(repo, "checkout", "-q", "t0")
    ours = load_file(str(repo / "model.safetensors"))
    far = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(5)) for k, v in ours.items()}
    git(repo, "checkout", "-q", "-b", "far", "main")
    commit_model(repo, dict(base, **{"l0.weight": far["l0.weight"]}), "far")  # an unrelated l0.weight
    git(repo, "checkout", "-q", "t0")
    git(repo, "config", "theta.merge.strategy", "slerp")
    git(repo, "config", "theta.merge.t", "0.3")
    git(repo, "merge", "-q", "--no-edit", "far")
    got = load_file(str(repo / "model.safetensors"))
    want = slerp_reference(0.3, ours["l0.weight"], far["l0.weight"])
    np.testing.assert_allclose(got["l0.weight"].double().numpy(), want, rtol=0, atol=1e-6 * np.abs(want).max())
    assert torch.equal(got["l1.weight"], ours["l1.weight"])  # changed on one side only: taken as is (git's rule)


def breadcrumbs_ties_reference(base: torch.Tensor, models: list[torch.Tensor], density: float,
                               gamma: float) -> np.ndarray:
    b = base.double().numpy()
    kept = []
    for m in models:
        tau = m.double().numpy() - b
        n = tau.size
        target, top = int(density * n), int(gamma * n)
        bot = max(0, n - target - top)
        order = np.argsort(np.abs(tau).ravel(), kind="stable")
        mask = np.zeros(n)
        mask[order[bot:bot + target]] = 1
        kept.append(tau * mask.reshape(tau.shape))
    taus = np.stack(kept)
    elected = np.where(taus.sum(0) >= 0, 1.0, -1.0)
    return b + (taus * (np.sign(taus) == elected)).sum(0)


def test_breadcrumbs_ties_through_git_theta_merge(repo: Path) -> None:
    base, models = setup(repo, n_branches=3)
    out = git(repo, "theta", "merge", "t0", "t1", "t2", "--strategy", "breadcrumbs_ties", "--set", "density=0.5",
              "--set", "gamma=0.05")
    assert b"strategy breadcrumbs_ties" in out.stdout
    got = load_file(str(repo / "model.safetensors"))
    for name in ("l0.weight", "l1.weight"):
        want = breadcrumbs_ties_reference(base[name], [m[name] for m in models], 0.5, 0.05)
        np.testing.assert_allclose(got[name].double().numpy(), want, rtol=0, atol=1e-5)


def model_stock_reference(base: torch.Tensor, models: list[torch.Tensor]) -> np.ndarray:
    b = base.double().numpy().ravel()
    ws = [m.double().numpy().ravel() for m in models]
    d = [w - b for w in ws]
    n = len(ws)
    cos = np.mean([np.clip(d[i] @ d[j] / max(np.linalg.norm(d[i]) * np.linalg.norm(d[j]), 1e-6), -1, 1)
                   for i in range(n) for j in range(i + 1, n)])
    t = n * cos / (1 + (n - 1) * cos)
    return (t * np.mean(ws, axis=0) + (1 - t) * b).reshape(base.shape)


def test_model_stock_through_git_theta_merge(repo: Path) -> None:
    base, models, got = merged_three(repo, "model_stock")
    for name in ("l0.weight", "l1.weight"):
        want = model_stock_reference(base[name], [m[name] for m in models])
        np.testing.assert_allclose(got[name].double().numpy(), want, rtol=0, atol=1e-6)


def karcher_reference(models: list[torch.Tensor], iters: int = 10, tol: float = 1e-5) -> np.ndarray:
    """The geodesic mean direction on the sphere by the same fixed-point iteration, in float64, times the mean
    norm."""
    xs = [m.double().numpy().ravel() for m in models]
    norms = [np.linalg.norm(x) for x in xs]
    units = [x / n for x, n in zip(xs, norms)]
    mean = np.mean(units, axis=0)
    mean /= np.linalg.norm(mean)
    for _ in range(iters):
        tangent = np.zeros_like(mean)
        for u in units:
            cos = np.clip(mean @ u, -1, 1)
            theta = np.arccos(cos)
            if theta >= tol:
                tangent += (theta / np.sin(theta)) * (u - cos * mean) / len(units)
        step = np.linalg.norm(tangent)
        if step < tol:
            break
        mean = np.cos(step) * mean + np.sin(step) * tangent / step
        mean /= np.linalg.norm(mean)
    return (np.mean(norms) * mean).reshape(models[0].shape)


def test_karcher_and_nuslerp_through_merge_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(3)
    states = [{"w": torch.randn(40, 30, generator=gen), "b": torch.randn(30, generator=gen)} for _ in range(3)]
    paths = []
    for i, st in enumerate(states):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(st, paths[-1])
    out = tmp_path / "k.safetensors"
    git(tmp_path, "theta", "merge-files", *map(str, paths), "-o", str(out), "--strategy", "karcher")
    got = load_file(str(out))
    for name in ("w", "b"):
        want = karcher_reference([st[name] for st in states])
        np.testing.assert_allclose(got[name].double().numpy(), want, rtol=0, atol=2e-5 * np.abs(want).max())
    out = tmp_path / "n.safetensors"
    git(tmp_path, "theta", "merge-files", *map(str, paths[1:]), "--base", str(paths[0]), "-o", str(out),
        "--strategy", "nuslerp", "--set", "weights=1,3")
    got = load_file(str(out))
    for name in ("w", "b"):  # with a base: the task vectors are interpolated (t = 3/4) and added to it
        b0 = states[0][name]
        want = b0.double().numpy() + slerp_reference(0.75, states[1][name] - b0, states[2][name] - b0)
        np.testing.assert_allclose(got[name].double().numpy(), want, rtol=0, atol=1e-5)


def sce_reference(base: torch.Tensor, models: list[torch.Tensor], topk: float) -> np.ndarray:
    b = base.double().numpy()
    taus = np.stack([m.double().numpy() - b for m in models])
    if topk < 1:
        var = taus.var(axis=0)
        k = int(np.count_nonzero(var) * topk)
        keep = np.zeros(var.size)
        keep[np.argsort(-np.abs(var).ravel(), kind="stable")[:k]] = 1
        taus = taus * keep.reshape(var.shape)
    elected = np.where(taus.sum(0) >= 0, 1.0, -1.0)
    agree = (np.sign(taus) == elected).astype(float)
    sq = (taus ** 2).reshape(len(models), -1).mean(1)
    w = (sq / sq.sum()).reshape(-1, *([1] * b.ndim)) * agree
    return b + (taus * w).sum(0) / np.maximum(w.sum(0), 1e-6)


def test_sce_through_git_theta_merge(repo: Path) -> None:
    base, models, got = merged_three(repo, "sce", "select_topk=0.4")
    for name in ("l0.weight", "l1.weight"):
        want = sce_reference(base[name], [m[name] for m in models], 0.4)
        np.testing.assert_allclose(got[name].double().numpy(), want, rtol=0, atol=1e-5)


def iso_c_reference(base: torch.Tensor, models: list[torch.Tensor], alpha: float) -> np.ndarray:
    """Straight from the paper, in float64: isotropic spectrum of the summed task matrix; mean task vector else."""
    b = base.double().numpy()
    taus = [m.double().numpy() - b for m in models]
    if b.ndim == 2:
        u, s, vt = np.linalg.svd(np.sum(taus, axis=0), full_matrices=False)
        delta = s.mean() * u @ vt
    else:
        delta = np.mean(taus, axis=0)
    return b + alpha * delta


def test_iso_c_through_git_theta_merge(repo: Path) -> None:
    base, models, got = merged_three(repo, "iso_c", "alpha=0.8")
    for name in ("l0.weight", "l1.weight"):
        want = iso_c_reference(base[name], [m[name] for m in models], 0.8)
        np.testing.assert_allclose(got[name].double().numpy(), want, rtol=0, atol=2e-6 * np.abs(want).max())
        # the merged task matrix really is isotropic: all its singular values equal
        s = np.linalg.svd(got[name].double().numpy() - base[name].double().numpy(), compute_uv=False)
        rank = min(got[name].shape)
        assert np.ptp(s[:rank]) < 1e-4 * s[0]


def tsv_reference(base: torch.Tensor, models: list[torch.Tensor], alpha: float) -> np.ndarray:
    """Straight from the paper in float64: top 1/T singular triplets of each task, stacked, U and V^T replaced by
    their closest orthogonal matrices (P Q^T of their SVD)."""
    b = base.double().numpy()
    taus = [m.double().numpy() - b for m in models]
    if b.ndim != 2:
        return b + alpha * np.mean(taus, axis=0)
    svds = [np.linalg.svd(t, full_matrices=False) for t in taus]
    r = svds[0][1].shape[0]
    k = r // len(taus)
    u = np.zeros((b.shape[0], r))
    s = np.zeros(r)
    vt = np.zeros((r, b.shape[1]))
    for i, (ui, si, vti) in enumerate(svds):
        u[:, i * k:(i + 1) * k], s[i * k:(i + 1) * k], vt[i * k:(i + 1) * k] = ui[:, :k], si[:k], vti[:k]

    def closest_orthogonal(m: np.ndarray) -> np.ndarray:
        p, _, q = np.linalg.svd(m, full_matrices=False)
        return p @ q

    return b + alpha * (closest_orthogonal(u) * s) @ closest_orthogonal(vt)


def test_tsv_merge_through_git_theta_merge(repo: Path) -> None:
    base, models, got = merged_three(repo, "tsv_merge")
    for name in ("l0.weight", "l1.weight"):
        want = tsv_reference(base[name], [m[name] for m in models], 1.0)
        np.testing.assert_allclose(got[name].double().numpy(), want, rtol=0, atol=1e-5 * np.abs(want).max())


def iso_cts_reference(base: torch.Tensor, models: list[torch.Tensor], alpha: float, fraction: float) -> np.ndarray:
    b = base.double().numpy()
    taus = [m.double().numpy() - b for m in models]
    if b.ndim != 2:
        return b + alpha * np.mean(taus, axis=0)
    t, r = len(taus), min(b.shape)
    k = r - round((r - int(r * fraction)) / t) * t
    d = (r - k) // t
    u, s, vt = np.linalg.svd(np.sum(taus, axis=0), full_matrices=False)
    uk = u[:, :k]
    cols_u, vals, rows_v = [], [], []
    for tau in taus:  # task-specific: the top d directions of each task outside the common subspace
        ui, si, vti = np.linalg.svd(tau - uk @ uk.T @ tau, full_matrices=False)
        cols_u.append(ui[:, :d])
        vals.append(si[:d])
        rows_v.append(vti[:d])
    big_u = np.concatenate([*cols_u, uk], axis=1)
    big_vt = np.concatenate([*rows_v, vt[:k]], axis=0)
    spectrum = np.concatenate([*vals, s[:k]])

    def closest_orthogonal(m: np.ndarray) -> np.ndarray:
        p, _, q = np.linalg.svd(m, full_matrices=False)
        return p @ q

    return b + alpha * spectrum.mean() * closest_orthogonal(big_u) @ closest_orthogonal(big_vt)


def test_iso_cts_through_git_theta_merge(repo: Path) -> None:
    base, models, got = merged_three(repo, "iso_cts", "common_fraction=0.5")
    for name in ("l0.weight", "l1.weight"):
        want = iso_cts_reference(base[name], [m[name] for m in models], 1.0, 0.5)
        np.testing.assert_allclose(got[name].double().numpy(), want, rtol=0, atol=1e-5 * np.abs(want).max())


def wudi_reference(base: torch.Tensor, models: list[torch.Tensor], steps: int, lr: float) -> np.ndarray:
    """The paper's objective minimised by Adam written out by hand in float64: gradient
    sum_i 2 (tau - tau_i) tau_i^T tau_i / ||tau_i||^2, Adam(beta 0.9/0.999, eps 1e-8) from the sum."""
    b = base.double().numpy()
    taus = [m.double().numpy() - b for m in models]
    tau = np.sum(taus, axis=0)
    if b.ndim != 2:
        return b + tau
    m1, m2 = np.zeros_like(tau), np.zeros_like(tau)
    for step in range(1, steps + 1):
        grad = sum(2 * (tau - t) @ t.T @ t / np.sum(t * t) for t in taus)
        m1 = 0.9 * m1 + 0.1 * grad
        m2 = 0.999 * m2 + 0.001 * grad * grad
        tau = tau - lr * (m1 / (1 - 0.9 ** step)) / (np.sqrt(m2 / (1 - 0.999 ** step)) + 1e-8)
    return b + tau


@pytest.mark.slow  # WUDI's optimisation per tensor (~15 s)
def test_wudi_through_git_theta_merge_lowers_its_loss(repo: Path) -> None:
    import json

    base, models, got = merged_three(repo, "wudi", "iterations=60", "lr=1e-3")
    report = json.loads((repo / ".git" / "theta" / "merge-reports" / "model.safetensors.json").read_text())
    entries = {t["name"]: t for t in report["tensors"]}
    for name in ("l0.weight", "l1.weight"):
        start = sum(m[name] - base[name] for m in models).double().numpy()
        want = wudi_reference(base[name], [m[name] for m in models], 60, 1e-3)
        moved = np.linalg.norm(want - base[name].double().numpy() - start)
        assert moved > 1e-3  # the optimisation really moved the merged task vector
        assert np.linalg.norm(got[name].double().numpy() - want) <= 1e-3 * moved + 1e-6
        assert entries[name]["wudi_loss_end"] < entries[name]["wudi_loss_start"]


def mergekit_ties_reference(base: torch.Tensor, models: list[torch.Tensor], weights: list[float],
                            densities: list[float]) -> np.ndarray:
    """mergekit's ties straight from its definition, float64: per model keep exactly max(1, int(d n)) entries of
    the task vector by magnitude, weigh, elect the sign of the sum (+ where >= 0), add the agreeing entries and
    divide by the agreeing models' weights (1 where none agree)."""
    b = base.double().numpy().ravel()
    taus = []
    for m, w, d in zip(models, weights, densities):
        tau = m.double().numpy().ravel() - b
        k = max(1, int(d * tau.size))
        kept = np.zeros_like(tau)
        top = np.argsort(-np.abs(tau))[:k]
        kept[top] = tau[top]
        taus.append(w * kept)
    taus = np.stack(taus)
    elected = np.where(taus.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(taus) == elected
    divisor = (np.array(weights)[:, None] * agree).sum(axis=0)
    divisor[divisor == 0] = 1
    return (b + (taus * agree).sum(axis=0) / divisor).reshape(base.shape)


def test_mergekit_configuration_through_git_theta_merge(repo: Path) -> None:
    """`git theta merge --config merge.yml`: models and base_model are branches; per-model weights, a per-model
    density with a filter, the base listed among the models (not one more input); one merge commit with every
    branch as a parent; values equal mergekit's ties computed from its definition."""
    base, models = setup(repo, n_branches=3)
    (repo / "merge.yml").write_text("""
merge_method: ties
base_model: main
models:
  - model: main
  - model: t0
    parameters: {weight: 1.0, density: [{filter: l0, value: 0.5}, {value: 0.8}]}
  - model: t1
    parameters: {weight: 0.5, density: 0.3}
  - model: t2
    parameters: {weight: 2.0}
parameters: {density: 0.6, normalize: true}
dtype: float32
""".lstrip())
    out = git(repo, "theta", "merge", "--config", "merge.yml").stdout.decode()
    assert "strategy ties_local" in out, out
    parents = git(repo, "log", "-1", "--format=%P").stdout.decode().split()
    assert [git(repo, "rev-parse", b).stdout.decode().strip() for b in ("HEAD~1", "t0", "t1", "t2")] == parents
    got = load_file(str(repo / "model.safetensors"))
    tuned = [dict(base, **{k: m[k] for k in ("l0.weight", "l1.weight")}, **({"l0.bias": m["l0.bias"]} if i == 0
                                                                            else {})) for i, m in enumerate(models)]
    for name in ("l0.weight", "l1.weight", "l0.bias"):
        densities = [0.5 if name.startswith("l0") else 0.8, 0.3, 0.6]
        want = mergekit_ties_reference(base[name], [t[name] for t in tuned], [1.0, 0.5, 2.0], densities)
        np.testing.assert_allclose(got[name].double().numpy(), want, rtol=0, atol=1e-6 * np.abs(want).max(),
                                   err_msg=name)
    assert torch.equal(got["emb.weight"], base["emb.weight"])
    assert "0 corrupt, 0 missing" in git(repo, "theta", "fsck").stdout.decode()


def test_mergekit_configuration_with_one_model_still_runs_its_method(repo: Path) -> None:
    """A configuration naming one fine-tune (task arithmetic, weight 0.5) merges it: the result is the base plus half
    the task vector, not the fine-tune as git's tree merge would leave it (found in review)."""
    base, models = setup(repo, n_branches=1)
    (repo / "half.yml").write_text("merge_method: task_arithmetic\nbase_model: main\nmodels:\n"
                                   "  - model: t0\n    parameters: {weight: 0.5}\n")
    git(repo, "theta", "merge", "--config", "half.yml")
    got = load_file(str(repo / "model.safetensors"))
    for name in ("l0.weight", "l1.weight"):
        want = base[name] + 0.5 * (models[0][name] - base[name])
        assert torch.allclose(got[name], want, atol=1e-6), name
