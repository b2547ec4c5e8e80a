"""keep_largest: per tensor, the fine-tune whose change to it is largest wins, whole.

Why it is useful: fine-tunes of different tasks often change different parts of a model (a task head, the last
blocks, an adapter-like subset). Averaging or summing their task vectors dilutes or interferes where they overlap;
selecting, per tensor, the model that moved it most (relative L2 norm of its task vector, ||theta_i - theta_0|| /
||theta_0||, or absolute with relative=false) keeps each model's most specialised tensors intact and never mixes
two models inside one tensor. With lambda != 1 the chosen task vector is scaled: theta_0 + lambda (theta_i - theta_0).

How it streams: one statistics pass per tensor (pass_scope "tensor") sums the squared task vector of every model
chunk by chunk; the merge pass then copies the chosen model's rows. Memory: one chunk per model, like every
streaming strategy. Ties go to the first model (HEAD / ours).
"""

from __future__ import annotations

from typing import Any

from gittheta_merge.merge.strategies.base import STREAM_CHUNK_BYTES, Chunk, Param, Strategy


class KeepLargest(Strategy):
    """Per tensor, take the fine-tune whose task vector on it is largest (relative L2 norm by default);
    lambda scales the chosen task vector."""

    name = "keep_largest"
    needs_base = True
    n_passes = 1
    pass_scope = "tensor"
    chunk_bytes = STREAM_CHUNK_BYTES
    params_spec = {
        "relative": Param(True, "bool", "compare ||tau_i|| / ||theta_0|| (else the absolute ||tau_i||)"),
        "lambda": Param(1.0, "float", "scale of the chosen task vector (1: the chosen model's tensor as it is)"),
    }

    def begin_pass(self, index: int) -> None:
        self._sq = [0.0] * self.n_models
        self._base_sq = 0.0

    def observe(self, index: int, chunk: Chunk) -> None:
        base = chunk.base.double()
        self._base_sq += float((base * base).sum())
        for i, model in enumerate(chunk.models):
            tau = model.double() - base
            self._sq[i] += float((tau * tau).sum())

    def end_pass(self, index: int) -> None:
        scale = self._base_sq if self.params["relative"] and self._base_sq > 0 else 1.0
        sizes = [sq / scale for sq in self._sq]
        self.chosen = max(range(self.n_models), key=lambda i: (sizes[i], -i))  # ties: the first model

    def merge(self, chunk: Chunk) -> Any:
        chunk.report["chosen_model"] = self.chosen  # in the merge report, per tensor
        winner = chunk.models[self.chosen]
        lam = self.params["lambda"]
        if lam == 1.0:
            return winner.clone()
        return chunk.base + lam * (winner - chunk.base)
