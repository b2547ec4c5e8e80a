"""Running one command as several processes under `torchrun` (torch.distributed): the engine our users already launch
on Slurm, Kubernetes and the clouds. There is no scheduler of ours: torchrun starts the ranks, and this module joins
them into one group and gives the commands (stats compute, merge) the few collective steps they need.

Everything that crosses ranks is either a tensor (sums of statistics, TIES' histograms: added with all_reduce) or
JSON text (tensor entries, reports, checks): never a pickle, so a rank trusts nothing it could not parse.

A step that fails on one rank must not leave the others waiting in a collective: every command passes its
fallible steps through `Group.agree`, where the ranks exchange "ok" or their error and all raise the first one
together. A rank that dies (killed, out of memory) ends the others' next collective with an error (torchrun also
stops them); the group's timeout (10 minutes) bounds the wait where neither happens.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from gittheta_merge.errors import ThetaError

TIMEOUT = timedelta(minutes=10)


class RankFailed(ThetaError):
    """Another rank of the group failed; its message says which and why."""


class Group:
    """The ranks of this torchrun job (world size > 1). Object exchange runs over gloo even when the tensors use
    nccl, so it never needs a GPU buffer."""

    def __init__(self, rank: int, world: int, backend: str) -> None:
        import torch.distributed as dist

        self.rank = rank
        self.world = world
        self.backend = backend
        self._cpu = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend != "gloo" else None

    # --- tensors ---------------------------------------------------------------------------------------------
    def all_reduce_(self, tensor: Any) -> Any:
        """Sum `tensor` over the ranks, in place (integers are exact; floats in the backend's order)."""
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=None if tensor.is_cuda else self._cpu)
        return tensor

    # --- JSON ------------------------------------------------------------------------------------------------
    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's bytes, in rank order (lengths first, then one padded uint8 all_gather)."""
        import torch
        import torch.distributed as dist

        size = torch.tensor([len(data)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(sizes, size, group=self._cpu)
        longest = max(int(s) for s in sizes)
        mine = torch.zeros(longest, dtype=torch.uint8)
        if data:
            mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        parts = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world)]
        dist.all_gather(parts, mine, group=self._cpu)
        return [bytes(p[: int(n)].numpy()) for p, n in zip(parts, sizes)]

    def all_gather_json(self, value: Any) -> list[Any]:
        return [json.loads(b) for b in self.all_gather_bytes(json.dumps(value, sort_keys=True).encode())]

    def agree(self, error: BaseException | None, step: str) -> None:
        """Every rank reports whether `step` worked; if any failed, all raise (the failing rank its own error, the
        others one naming that rank), so no rank waits for a partner that has given up."""
        mine = None if error is None else f"{type(error).__name__}: {error}" if not isinstance(error, ThetaError) \
            else str(error)
        results = self.all_gather_json(mine)
        failed = [(r, msg) for r, msg in enumerate(results) if msg is not None]
        if not failed:
            return
        if error is not None:
            raise error
        rank, msg = failed[0]
        raise RankFailed(f"{step}: rank {rank} of {self.world} failed: {msg}")

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Run a block on every rank and agree on its outcome (see `agree`)."""
        try:
            yield
        except BaseException as exc:  # noqa: BLE001 - reported to every rank, then re-raised
            self.agree(exc, name)
            raise
        self.agree(None, name)

    def close(self) -> None:
        """The command's end on every rank: wait for the others, then leave the group (a process that exits while
        its peers still talk to it can abort in the backend's threads)."""
        import torch.distributed as dist

        self.all_gather_json(None)
        if self._cpu is not None:
            dist.destroy_process_group(self._cpu)
        dist.destroy_process_group()

    def same_everywhere(self, value: Any, what: str, fix: str) -> None:
        """A clear error when the ranks disagree on `value` (e.g. the commits a branch names in each clone)."""
        values = self.all_gather_json(value)
        for rank, other in enumerate(values):
            if other != values[0]:
                raise ThetaError(f"rank {rank} and rank 0 see different {what} ({other!r} vs {values[0]!r}); {fix}")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def join(command: str, device: str) -> tuple[Group | None, str]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (gloo on CPU; nccl on CUDA, each rank on its
    LOCAL_RANK's GPU) and return (group, device); (None, device) in a plain run."""
    world = world_size()
    if world <= 1:
        return None, device
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT)
    rank = dist.get_rank()
    print(f"git-theta: {command}: rank {rank} of {world} ({device})", file=sys.stderr, flush=True)
    return Group(rank, world, backend), device


def quiet_unless_rank0(group: Group | None, echo: Callable[..., Any]) -> Callable[..., Any]:
    """`echo` on rank 0 (or in a plain run); a no-op on the other ranks, so a job prints its plan once."""
    if group is None or group.rank == 0:
        return echo
    return lambda *args, **kwargs: None
