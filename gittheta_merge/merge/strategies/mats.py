"""MaTS (§6): solve (sum_i C_i) theta = sum_i C_i theta_i per linear weight with conjugate gradient,
started from the task-arithmetic merge and stopped after a fixed number of iterations.

Objectives (`objective=`), for W [out, in] and X = W^T:
  regmean      X -> sum_i A~_i X,        A_i = input Gram (kind "gram"), A~ = alpha-shrunk (alpha=1: none)
  kfac         X -> sum_i A~_i X B_i,    B_i = Gram of the output gradients (kind "kfac", [out, out])
  fisher_diag  W -> sum_i F_i * W        (kind "fisher", elementwise; CG converges to Fisher merging)
  average      W -> M W                  (the identity objective)
Blocks without statistics are uniformly averaged (as the MaTS and git-theta code do), even with a TA init.

CG is scipy's algorithm (x0 = init, stop when ||r|| < rtol ||b||, rtol = 1e-5, at most `iterations`
steps) run in float64 on the whole tensor: the iterates couple every row, so MaTS tensors are not
row-chunked (memory: (M+1) whole tensors plus the statistics of that tensor). Init: task arithmetic
with init_lambda (MaTS README: 0.3) when a base is given, otherwise the average (git-theta's MaTS
initialises from the SUM of the models without a base: a bug we do not copy). Defaults: 100 iterations
(MaTS README; git-theta uses 10). Reported per tensor: iterations, initial and final residual, exit code
(0 = converged, >0 = hit the iteration cap).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gittheta_merge.errors import InputError, MissingError
from gittheta_merge.merge.strategies.base import Chunk, Param, StatsAccess, Strategy
from gittheta_merge.merge.strategies.regmean import shrink

KINDS = {"regmean": ("gram",), "kfac": ("gram", "kfac"), "fisher_diag": ("fisher",), "average": ()}


def conjugate_gradient(op: Callable[[Any], Any], b: Any, x0: Any, iterations: int,
                       rtol: float = 1e-5) -> tuple[Any, dict[str, Any]]:
    """Unpreconditioned CG with scipy.sparse.linalg.cg's stopping rule; returns (x, info)."""
    import torch

    x = x0.clone()
    r = b - op(x)
    bnorm = float(torch.linalg.vector_norm(b))
    info = {"initial_residual": float(torch.linalg.vector_norm(r)), "iterations": 0, "exit_code": 0}
    if bnorm == 0.0:
        info["final_residual"] = 0.0
        return torch.zeros_like(b), info
    atol = rtol * bnorm
    p = None
    rho_prev = 0.0
    for k in range(iterations):
        if float(torch.linalg.vector_norm(r)) < atol:
            info["final_residual"] = float(torch.linalg.vector_norm(r))
            return x, info
        rho = float((r * r).sum())
        p = r.clone() if p is None else r + (rho / rho_prev) * p
        q = op(p)
        alpha = rho / float((p * q).sum())
        x += alpha * p
        r -= alpha * q
        rho_prev = rho
        info["iterations"] = k + 1
    info["exit_code"] = iterations
    info["final_residual"] = float(torch.linalg.vector_norm(r))
    return x, info


class Mats(Strategy):
    """MaTS (Tam et al. 2024): solves sum_i C_i theta = sum_i C_i theta_i by conjugate gradient, C_i from each
    model's statistics (objective regmean: Grams; kfac: Grams and gradient Grams; fisher_diag: Fisher); blocks
    without statistics are averaged."""

    name = "mats"
    row_separable = False
    params_spec = {
        "objective": Param("regmean", "choice", "which precision C_i", tuple(KINDS)),
        "iterations": Param(100, "int", "CG iterations (MaTS README: 100; 10 for IA3)"),
        "init": Param("task_arithmetic", "choice", "CG start: task_arithmetic (needs base) or average",
                      ("task_arithmetic", "average")),
        "init_lambda": Param(0.3, "float", "lambda of the task-arithmetic init"),
        "alpha": Param(1.0, "float", "off-diagonal scale of the input Grams"),
        "rtol": Param(1e-5, "float", "relative residual tolerance"),
    }

    def stat_kinds(self) -> tuple[str, ...]:
        return KINDS[self.params["objective"]]

    def has_stats(self, name: str, shape: list[int], stats: StatsAccess) -> bool:
        if self.params["objective"] == "average":
            return True
        if self.params["objective"] != "fisher_diag" and len(shape) != 2:
            return False
        return all(stats.lookup(k, 0, name) is not None for k in self.stat_kinds())

    def check_tensor(self, name: str, shape: list[int], stats: StatsAccess) -> None:
        for kind in self.stat_kinds():
            if not stats.has_kind(kind):
                raise MissingError(f"strategy mats (objective {self.params['objective']}) needs {kind} statistics: "
                                 f"--stats {kind}=ours.safetensors,theirs.safetensors")
        if not self.has_stats(name, shape, stats):
            return
        for kind in self.stat_kinds():  # fisher: the weight's shape; gram: [in, in]; kfac: [out, out]
            want = list(shape) if kind == "fisher" else [shape[-1] if kind == "gram" else shape[0]] * 2
            for i in range(self.n_models):
                got = stats.shape(kind, i, name)
                if got != want:
                    raise InputError(f"tensor {name!r}: {kind} of model {i} has shape {got}, expected {want}")

    def merge(self, chunk: Chunk) -> Any:
        import torch

        models = [m.to(torch.float64) for m in chunk.models]
        mean = sum(models) / self.n_models
        if not self.has_stats(chunk.name, chunk.shape, chunk.stats):
            return mean.to(torch.float32)
        p = self.params
        if p["init"] == "task_arithmetic":
            if chunk.base is None:
                raise MissingError(f"tensor {chunk.name!r}: mats init=task_arithmetic needs the base model "
                                 "(or set init=average)")
            base = chunk.base.to(torch.float64)
            init = base + p["init_lambda"] * sum(m - base for m in models)
        else:
            init = mean
        objective = p["objective"]
        if objective == "average":
            m = float(self.n_models)
            op = lambda x: m * x  # noqa: E731
            b = sum(models)
            x0 = init
        elif objective == "fisher_diag":
            dev = models[0].device
            fs = [chunk.stats.whole("fisher", i, chunk.name).to(dev, torch.float64) for i in range(self.n_models)]
            total = sum(fs)
            op = lambda x: total * x  # noqa: E731
            b = sum(f * w for f, w in zip(fs, models))
            x0 = init
        else:
            grams = [shrink(chunk.stats.whole("gram", i, chunk.name).to(models[0].device, torch.float64), p["alpha"])
                     for i in range(self.n_models)]
            if objective == "regmean":
                a_sum = sum(grams)
                op = lambda x: a_sum @ x  # noqa: E731
                b = sum(g @ w.T for g, w in zip(grams, models))
            else:
                outs = [chunk.stats.whole("kfac", i, chunk.name).to(models[0].device, torch.float64)
                        for i in range(self.n_models)]
                op = lambda x: sum(g @ x @ o for g, o in zip(grams, outs))  # noqa: E731
                b = sum(g @ w.T @ o for g, w, o in zip(grams, models, outs))
            x0 = init.T.contiguous()
        x, info = conjugate_gradient(op, b, x0, p["iterations"], p["rtol"])
        chunk.report.update({f"cg_{k}": v for k, v in info.items()})
        if objective in {"regmean", "kfac"}:
            x = x.T
        return x.contiguous().to(torch.float32)

    @property
    def needs_base(self) -> bool:  # type: ignore[override]
        return self.params["init"] == "task_arithmetic"
