"""Checkpoint formats are plugins found through the `gittheta_merge.formats` entry-point group.

The built-in safetensors and PyTorch formats register exactly like a third-party one would, so adding
a format is one module plus one entry point (see formats/base.py for the interface).
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points

from gittheta_merge.errors import UsageError
from gittheta_merge.formats.base import CheckpointFormat

GROUP = "gittheta_merge.formats"


@cache
def registry() -> dict[str, CheckpointFormat]:
    found: dict[str, CheckpointFormat] = {}
    for ep in entry_points(group=GROUP):
        cls = ep.load()
        found[ep.name] = cls()
    if not found:
        raise UsageError("no checkpoint formats registered: is gittheta-merge installed (pip install -e .)?")
    return found


def by_name(name: str) -> CheckpointFormat:
    try:
        return registry()[name]
    except KeyError:
        raise UsageError(
            f"checkpoint format {name!r} is not installed (known: {', '.join(sorted(registry()))}); "
            "install the plugin that provides it"
        ) from None


def detect(path: str, head: bytes) -> CheckpointFormat:
    """Pick the format by magic bytes first, file extension second; a clear error if none fits."""
    scored = sorted(((fmt.sniff(path, head), name) for name, fmt in registry().items()), reverse=True)
    if scored and scored[0][0] > 0:
        return registry()[scored[0][1]]
    raise UsageError(
        f"{path}: not a checkpoint this tool understands (first bytes {head[:16]!r}); "
        f"supported formats: {', '.join(sorted(registry()))}. If this file should not be tracked, "
        "remove its line from .gitattributes"
    )
