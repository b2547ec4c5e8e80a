"""git's filter entry points: the long-running process and the single-shot clean/smudge."""

from __future__ import annotations

import sys

import click


@click.command("filter-process", hidden=True)
def filter_process() -> None:
    """git's long-running filter (filter.theta.process)."""
    from gittheta_merge.filter.process import serve

    serve(sys.stdin.buffer, sys.stdout.buffer)


@click.command(hidden=True)
@click.argument("path")
def clean(path: str) -> None:
    """Single-shot clean filter: checkpoint on stdin → metadata on stdout."""
    from gittheta_merge.filter.process import single_shot

    sys.exit(single_shot("clean", path))


@click.command(hidden=True)
@click.argument("path")
def smudge(path: str) -> None:
    """Single-shot smudge filter: metadata on stdin → checkpoint on stdout."""
    from gittheta_merge.filter.process import single_shot

    sys.exit(single_shot("smudge", path))
