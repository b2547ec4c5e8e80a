"""`git theta checkout` and `git theta status` (models checked out as placeholders), and the post-checkout /
post-merge / post-rewrite hooks that write them (storage/materialize.py)."""

from __future__ import annotations

import sys

import click

from gittheta_merge.storage.gitutil import Repo


@click.command("checkout")
@click.argument("paths", nargs=-1)
def checkout_cmd(paths: tuple[str, ...]) -> None:
    """Write tracked models that are placeholders in the work tree (all, or PATHS) from the object store."""
    from gittheta_merge.cli.common import repo_relative
    from gittheta_merge.storage.materialize import materialize

    repo = Repo.discover()
    rel = [repo_relative(repo, p) for p in paths] or None
    done = materialize(repo, rel, echo=click.echo)
    if not done:
        click.echo("no placeholders to write")


@click.command("status")
def status_cmd() -> None:
    """List tracked models that are placeholders in the work tree (written by `git theta checkout`)."""
    from gittheta_merge.storage.materialize import placeholders, threshold

    repo = Repo.discover()
    found = placeholders(repo)
    for path in found:
        click.echo(f"placeholder: {path}")
    click.echo(f"{len(found)} placeholder(s); models above {threshold(repo):,} bytes (theta.materializeBytes) are "
               "written by the checkout hooks" + ("; run `git theta checkout` to write them now" if found else ""))


@click.command("hook", hidden=True, context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def hook_cmd(name: str, args: tuple[str, ...]) -> None:
    """git's post-checkout / post-merge / post-rewrite hooks: write placeholders, then chain."""
    from gittheta_merge.storage.materialize import materialize
    from gittheta_merge.storage.tracking import run_chained_hook

    repo = Repo.discover()
    stdin_data = sys.stdin.buffer.read() if name == "post-rewrite" else b""  # the rewritten commits, for the chain
    try:
        materialize(repo, echo=lambda line: click.echo(line, err=True))  # after a branch or a file checkout alike
    finally:  # the user's and git-lfs's hooks run even when writing a model failed (its error is printed)
        rc = run_chained_hook(repo, name, list(args), stdin_data)
    sys.exit(rc)
