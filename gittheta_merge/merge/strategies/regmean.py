"""RegMean (§5): per linear weight W [out, in], W* = (sum_i W_i G~_i)(sum_i G~_i)^-1 with
G~_i = M c_i (alpha G_i + (1 - alpha) diag(G_i)); every block without a Gram is (weighted) averaged. With
normalize=true each G_i is first divided by its token count (the provenance's `counts`): the reference code's mean
Gram, under which every model weighs the same whatever the amount of data its Gram summed.

Statistics: kind "gram", one safetensors file per model, keyed by the weight's name (or the module's
name without ".weight"), each [in, in] (a Conv1D-style weight stored [in, out] is recognised by its
Gram matching the first dimension). The Grams are used as given (mean or sum: that choice decides
whether models are weighted equally or by token count).

Solve (documented fallback for singular sums, in float64): features whose Gram row is zero in every
model carry no information; their columns of W* are the weighted average of the models' columns (the
reference code's inverse fallback would leave them 0, which destroys weights of unused features).
The rest is solved by Cholesky; if that fails (singular), a ridge of 1e-8 x mean(diag) is added; if that
still fails, a least-squares (pseudo-inverse) solve is used. The report records the method and, for
d_in <= 4096, the condition number (estimated, see estimate_condition). alpha defaults to 1 (no shrink:
the paper's formula and the RegMean code's GLUE setting); alpha < 1 is itself a regulariser.

Row-separable for the usual [out, in] layout: each output row needs only the (cached) factorisation,
so large weights stream in row chunks; the M Grams of the current tensor stay in memory.
"""

from __future__ import annotations

from typing import Any

from gittheta_merge.errors import InputError, MissingError
from gittheta_merge.merge.strategies.base import Chunk, Param, StatsAccess, Strategy

KIND = "gram"
COND_MAX_DIM = 4096


def shrink(gram: Any, alpha: float) -> Any:
    """alpha G + (1 - alpha) diag(G): scales the off-diagonal entries by alpha."""
    import torch

    return alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))


def estimate_condition(sym: Any, chol: Any, iterations: int = 30) -> float:
    """lambda_max / lambda_min of a symmetric positive definite matrix, from power iteration on it and inverse
    power iteration through its Cholesky factor: O(iterations * d^2) instead of the O(d^3) eigendecomposition
    that dominated RegMean merges (25 s of 44 s on all-MiniLM's 1536-wide Grams). Both iterations approach the
    extreme eigenvalues from inside, so the estimate is a lower bound that is close (a few %) for the report."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    start = torch.rand(sym.shape[0], 1, generator=gen, dtype=torch.float64).to(sym.device, sym.dtype)
    hi = lo = 0.0
    v = start / start.norm()
    for _ in range(iterations):
        w = sym @ v
        hi = float(w.norm())
        v = w / hi
    v = start / start.norm()
    for _ in range(iterations):
        w = torch.cholesky_solve(v, chol)
        lo = float(w.norm())
        if lo == 0:
            return float("inf")
        v = w / lo
    return hi * lo  # lambda_max * (1 / lambda_min)


class _Solver:
    """A factorised sum of Grams, with the dead-feature split and the fallback chain."""

    def __init__(self, total: Any) -> None:
        import torch

        d = total.shape[0]
        self.dead = torch.diagonal(total) == 0
        self.live = (~self.dead).nonzero().flatten()
        sub = total[self.live][:, self.live]
        self.method = "cholesky"
        self.cond: float | None = None
        self.chol = None
        self.pinv = None
        if sub.numel():
            chol, info = torch.linalg.cholesky_ex(sub)
            if int(info) != 0:
                ridge = 1e-8 * float(torch.diagonal(sub).mean())
                eye = torch.eye(sub.shape[0], dtype=sub.dtype, device=sub.device)
                chol, info = torch.linalg.cholesky_ex(sub + ridge * eye)
                self.method = "cholesky+ridge"
                if int(info) != 0:
                    self.method = "lstsq"
                    self.pinv = torch.linalg.pinv(sub, hermitian=True)
            if self.pinv is None:
                self.chol = chol
                if d <= COND_MAX_DIM:
                    self.cond = estimate_condition(sub, chol)

    def solve(self, rhs: Any) -> Any:
        """X = S^-1 rhs restricted to live features (rhs rows indexed like the live features)."""
        import torch

        if self.pinv is not None:
            return self.pinv @ rhs
        return torch.cholesky_solve(rhs, self.chol)


class RegMean(Strategy):
    """RegMean (Jin et al. 2023): per linear layer, (sum_i G_i)^-1 sum_i G_i W_i with each model's input Gram
    G_i (statistic `gram`); blocks without a Gram are (weighted) averaged, as in the paper. On seven tasks, merging
    those blocks by task arithmetic instead (`--rule REGEX=task_arithmetic:lambda=1` for the embeddings, norms and
    biases) did better: docs/results/quality-multitask.md."""

    name = "regmean"
    params_spec = {
        "alpha": Param(1.0, "float", "scale of the Grams' off-diagonal entries (1 = none)"),
        "weights": Param(None, "floats", "model coefficients c_i (default uniform 1/M)"),
        "normalize": Param(False, "bool", "divide each model's Gram by its token count (the reference code's mean "
                           "Gram: every model weighs the same whatever its data; default: sums, the paper's formula)"),
    }

    def validate(self) -> None:
        super().validate()
        self._cache: dict[str, Any] = {}

    def stat_kinds(self) -> tuple[str, ...]:
        return (KIND,)

    def coefficients(self) -> list[float]:
        w = self.params.get("weights")
        return list(w) if w is not None else [1.0 / self.n_models] * self.n_models

    def layout(self, name: str, shape: list[int], stats: StatsAccess) -> str | None:
        """'linear' ([out, in], Gram in x in), 'conv1d' ([in, out]) or None (averaged)."""
        if len(shape) != 2 or stats.lookup(KIND, 0, name) is None:
            return None
        g = stats.shape(KIND, 0, name)
        if g in ([shape[1], shape[1]], [shape[1]]):  # [in] = a diagonal-only Gram
            return "linear"
        if g in ([shape[0], shape[0]], [shape[0]]):
            return "conv1d"
        raise InputError(f"tensor {name!r} {shape}: its Gram has shape {g}; expected [{shape[1]}, {shape[1]}]")

    def check_tensor(self, name: str, shape: list[int], stats: StatsAccess) -> None:
        if not stats.has_kind(KIND):
            raise MissingError("strategy regmean needs Gram statistics: one safetensors file per model "
                             "(--stats gram=ours.safetensors,theirs.safetensors)")
        if self.layout(name, shape, stats) is None:
            return
        first = stats.shape(KIND, 0, name)
        for i in range(1, self.n_models):
            if stats.shape(KIND, i, name) != first:
                raise MissingError(f"tensor {name!r}: model {i} has no Gram of shape {first} "
                                 "(every model needs one, or none)")
        if self.params["normalize"]:  # at plan time: refused before anything is merged
            for i in range(self.n_models):
                self._token_count(stats, i, name)

    def separable(self, name: str, shape: list[int], stats: StatsAccess) -> bool:
        return self.layout(name, shape, stats) != "conv1d"

    def _prepared(self, chunk: Chunk) -> tuple[list[Any], _Solver]:
        """The current tensor's scaled Grams restricted to the live feature rows (what every chunk's
        right-hand side needs), and the factorised sum; computed once per tensor, not per chunk."""
        import torch

        if chunk.name not in self._cache:
            self._cache.clear()  # only the current tensor's Grams are kept
            m = self.n_models
            dev = chunk.models[0].device
            grams = []
            for i, c in enumerate(self.coefficients()):
                g = chunk.stats.whole(KIND, i, chunk.name).to(dev, torch.float64)
                if g.dim() == 1:
                    g = torch.diag(g)
                if self.params["normalize"]:
                    g = g / self._token_count(chunk.stats, i, chunk.name)
                grams.append(m * c * shrink(g, self.params["alpha"]))
            solver = _Solver(sum(grams))
            if bool(solver.dead.any()):
                grams = [g[solver.live] for g in grams]
            self._cache[chunk.name] = (grams, solver)
        return self._cache[chunk.name]

    @staticmethod
    def _token_count(stats: StatsAccess, model: int, name: str) -> int:
        n = stats.count(KIND, model, name)
        if n is None:
            raise MissingError(f"tensor {name!r}: regmean normalize=true divides each Gram by its token count, and "
                               f"model {model}'s Gram does not record one (a statistic from `git theta stats "
                               "compute` does); or set normalize=false")
        return n

    def _average(self, tensors: list[Any], stats: StatsAccess | None = None) -> Any:
        """Weighted average; for blocks without a Gram (stats given) an input that is itself a merge carrying
        derived statistics counts as the models it merged, so sequential merges equal the N-way one."""
        c = self.coefficients()
        if stats is not None and self.params.get("weights") is None:
            from gittheta_merge.merge.statsflow import model_counts

            c = [float(k) for k in model_counts(stats, KIND, self.n_models)]
        return sum(ci * t for ci, t in zip(c, tensors)) / sum(c)

    def merge(self, chunk: Chunk) -> Any:
        import torch

        layout = self.layout(chunk.name, chunk.shape, chunk.stats)
        if layout is None:
            return self._average(chunk.models, chunk.stats)
        live_grams, solver = self._prepared(chunk)
        # work on X = W^T ([in, rows]) for the linear layout; the conv1d layout already is [in, out]
        xs = [m.to(torch.float64).T if layout == "linear" else m.to(torch.float64) for m in chunk.models]
        rhs = sum(g @ x for g, x in zip(live_grams, xs)) if solver.live.numel() else None
        if rhs is not None and not bool(solver.dead.any()):
            out = solver.solve(rhs)
        else:  # dead features keep the weighted average of the models' columns
            out = self._average(xs)
            if rhs is not None:
                out[solver.live] = solver.solve(rhs)
        chunk.report["solve"] = solver.method
        chunk.report["dead_features"] = int(solver.dead.sum())
        if solver.cond is not None:
            chunk.report["condition_number"] = solver.cond
        return (out.T if layout == "linear" else out).to(torch.float32)
