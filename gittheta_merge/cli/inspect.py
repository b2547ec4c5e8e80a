"""`ls` and `diff`: what is stored, and what changed, read from metadata."""

from __future__ import annotations

import sys

import click

from gittheta_merge.cli.common import repo_relative, tracked_at
from gittheta_merge.errors import MissingError
from gittheta_merge.storage.gitutil import Repo


@click.command("ls")
@click.argument("paths", nargs=-1)
@click.option("--rev", default=":", show_default=True, help="commit to read (':' = the index)")
def ls_cmd(paths: tuple[str, ...], rev: str) -> None:
    """List the tensors of tracked checkpoints: name, dtype, shape, size, object."""
    from gittheta_merge.storage import revisions

    repo = Repo.discover()
    files = tracked_at(repo, rev, paths)
    if not files:
        what = " ".join(paths) if paths else "files"
        where = "the index" if rev == ":" else rev
        raise MissingError(f"no tracked checkpoint {what} in {where} (`git theta track` it, then `git add` it)")
    for path, meta in files.items():
        click.echo("\n".join(revisions.ls_lines(meta, path)))


@click.command("diff")
@click.argument("revs", nargs=-1)
@click.option("--no-stats", is_flag=True, help="metadata only: do not read changed tensors")
def diff_cmd(revs: tuple[str, ...], no_stats: bool) -> None:
    """Tensor-level diff: git theta diff [OLD [NEW]] [-- PATHS]. Defaults: HEAD vs the index."""
    from gittheta_merge.storage import revisions

    args = list(revs)
    paths: list[str] = []
    if "--" in sys.argv:
        after = sys.argv[sys.argv.index("--") + 1:]
        paths = after
        args = [a for a in args if a not in after]
    old = args[0] if args else "HEAD"
    new = args[1] if len(args) > 1 else revisions.INDEX
    repo = Repo.discover()
    rel = [repo_relative(repo, p) for p in paths] or None
    lines = revisions.diff(repo, old, new, rel, stats=not no_stats)
    click.echo("\n".join(lines) if lines else "no tensor changes")
