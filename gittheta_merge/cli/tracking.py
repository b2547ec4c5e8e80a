"""`install` and `track`: configure the filter, mark files as tracked."""

from __future__ import annotations

from pathlib import Path

import click

from gittheta_merge.errors import ThetaError
from gittheta_merge.storage.gitutil import Repo


@click.command()
@click.option("--scope", type=click.Choice(["repo", "user", "global"]), default="repo", show_default=True,
              help="repo: this repository's .git/config; user: ~/.gitconfig; global: the system config.")
def install(scope: str) -> None:
    """Configure git's theta filter (run once per clone, or once per machine with --scope user)."""
    from gittheta_merge.storage import tracking

    for key, value in tracking.install(scope):
        click.echo(f"set {key} = {value}")
    try:
        repo = Repo.discover()
    except ThetaError:
        return
    restored = tracking.materialise(repo) if tracking.is_installed(repo) else []
    if restored:
        click.echo(f"checked out {len(restored)} tracked file(s) that were still metadata text")


@click.command()
@click.argument("targets", nargs=-1, required=True)
def track(targets: tuple[str, ...]) -> None:
    """Track checkpoint files, globs ('*.safetensors') or Hugging Face model directories."""
    from gittheta_merge.storage import tracking

    missing = [t for t in targets if not any(ch in t for ch in "*?[") and not Path(t).exists()]
    for target in missing:
        click.echo(f"note: {target} does not exist yet; it will be tracked when it is created")
    added = tracking.track(list(targets))
    for line in added:
        click.echo(f"tracking: {line}")
    if not added:
        click.echo("already tracked; nothing changed")
    repo = Repo.discover()
    files = tracking.expand(repo, list(targets), Path.cwd())
    raw = tracking.committed_raw(repo, files) if files else []
    if raw:
        click.echo("these files are committed as raw bytes; store them per tensor with:\n"
                   f"  git add --renormalize {' '.join(raw)}")
    click.echo("remember to commit .gitattributes")


@click.command("add")
@click.argument("pathspecs", nargs=-1, required=True)
def add_cmd(pathspecs: tuple[str, ...]) -> None:
    """`git add PATHSPEC…`, with tracked models read by git-theta itself instead of piped through git.

    The result is what `git add` stages, byte for byte; a re-add after a fine-tune that changed a few tensors costs
    reading the file once (BLAKE3 recognises the stored blocks) instead of git streaming it through the filter."""
    from gittheta_merge.storage.stage import stage

    stage(Repo.discover(), list(pathspecs), Path.cwd(), echo=lambda line: click.echo(line, err=True))
