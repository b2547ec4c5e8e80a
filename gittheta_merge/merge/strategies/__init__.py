"""Merge strategies are plugins in the `gittheta_merge.strategies` entry-point group.

The built-in ones register exactly like a third party would (pyproject.toml); the fallback table below
only matters when the package metadata is stale (an old editable install), so a checkout still works.
"""

from __future__ import annotations

from functools import cache
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

from gittheta_merge.errors import ThetaError
from gittheta_merge.merge.strategies.base import Strategy

GROUP = "gittheta_merge.strategies"

BUILTIN = {
    "average": "gittheta_merge.merge.strategies.average:Average",
    "task_arithmetic": "gittheta_merge.merge.strategies.task_arithmetic:TaskArithmetic",
    "ties": "gittheta_merge.merge.strategies.ties:Ties",
    "ties_local": "gittheta_merge.merge.strategies.ties:TiesLocal",
    "dare": "gittheta_merge.merge.strategies.dare:Dare",
    "fisher": "gittheta_merge.merge.strategies.fisher:Fisher",
    "regmean": "gittheta_merge.merge.strategies.regmean:RegMean",
    "mats": "gittheta_merge.merge.strategies.mats:Mats",
}


def _load(target: str) -> type[Strategy]:
    module, _, attr = target.partition(":")
    return getattr(import_module(module), attr)


@cache
def registry() -> dict[str, Any]:
    """name -> entry point target (loaded lazily, so listing strategies imports none of them)."""
    found: dict[str, Any] = dict(BUILTIN)
    for ep in entry_points(group=GROUP):
        found[ep.name] = ep
    return found


def get(name: str) -> type[Strategy]:
    reg = registry()
    target = reg.get(name.replace("-", "_"))
    if target is None:
        raise ThetaError(f"unknown merge strategy {name!r} (known: {', '.join(sorted(reg))})")
    cls = _load(target) if isinstance(target, str) else target.load()
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ThetaError(f"merge strategy {name!r} does not provide a Strategy subclass")
    return cls


def create(name: str, params: dict[str, Any] | None, n_models: int) -> Strategy:
    return get(name)(params or {}, n_models)
