"""The `git-theta` command line (so `git theta …` works as a git subcommand): the group, its error handling and
the lazily loaded merge commands; each command group lives in its own module here, thin: parse, call, print."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import click

from gittheta_merge import __version__
from gittheta_merge.errors import ThetaError, storage_error
from gittheta_merge.storage.gitutil import Repo

_NO_HINT = {"install", "filter-process", "clean", "smudge", "pre-push", "hook", "--help", "--version"}
# commands that leave placeholders alone: git's own filter and hooks, listing them, writing them, the merge driver
# (git writes the work tree after it), and the ones that work without a repository
_NO_MATERIALIZE = _NO_HINT | {"status", "checkout", "merge-driver", "merge-files", "merge-adapters", "strategies"}


def _hint_if_not_installed() -> None:
    """A clone made before `git theta install` has metadata text where models should be: say so."""
    try:
        repo = Repo.discover()
    except ThetaError:
        return
    attributes = repo.root / ".gitattributes"
    if not attributes.exists() or "filter=theta" not in attributes.read_text(errors="replace"):
        return
    from gittheta_merge.storage.tracking import is_installed

    if not is_installed(repo):
        click.echo("git-theta: this repository tracks models with gittheta-merge, but the theta filter is "
                   "not configured in this clone, so models are checked out as metadata text and `git add` "
                   "would commit raw files. Run `git theta install` (it also checks the models out).", err=True)


def _write_placeholders() -> None:
    """Every git theta command first writes models a hook-less git command left as placeholders (git reset --hard),
    so what it reads from the work tree is the model; a failure here is a warning, never the command's end."""
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun rank 0 alone writes to the work tree
    try:
        repo = Repo.discover()
    except ThetaError:
        return  # outside a repository (e.g. `git theta merge --help`): nothing to write
    try:
        from gittheta_merge.storage.materialize import materialize, placeholders
        from gittheta_merge.storage.tracking import is_installed

        if is_installed(repo) and placeholders(repo):
            materialize(repo, echo=lambda line: click.echo(line, err=True))
    except ThetaError as exc:
        click.echo(f"git-theta: warning: could not write the placeholders in the work tree: {exc}", err=True)


def _interrupted(signum: int, frame: object) -> None:
    """Ctrl-C: raise KeyboardInterrupt once, so the cleanup code (temp files, locks) runs, and ignore the repeats:
    git forwards the signal to the command it runs (`git theta …`) besides the terminal sending it, and a second
    KeyboardInterrupt would break off that cleanup."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


# commands whose modules are imported only when used: the filter process runs inside every
# `git add`/`checkout` and must not pay for importing the merge engine
LAZY_COMMANDS = {"merge": "merge_cmd", "merge-driver": "merge_driver_cmd", "merge-files": "merge_files_cmd",
                 "merge-adapters": "merge_adapters_cmd"}


def _plugin_commands() -> list[Any]:
    """Commands that installed plugins add (entry-point group `gittheta_merge.commands`, e.g. `git theta align`)."""
    from importlib.metadata import entry_points

    return list(entry_points(group="gittheta_merge.commands"))


class ThetaGroup(click.Group):
    """Turns ThetaError into a one-line message and exit code 1, without a traceback; loads the
    merge commands lazily."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS) | {ep.name for ep in _plugin_commands()})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS and name not in self.commands:
            from gittheta_merge.merge import commands

            self.add_command(getattr(commands, LAZY_COMMANDS[name]), name)
        if name not in self.commands and name not in LAZY_COMMANDS:
            for ep in _plugin_commands():
                if ep.name == name:
                    self.add_command(ep.load(), name)  # a plugin's command (entry point), imported when used
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> object:
        if ctx.protected_args and ctx.protected_args[0] not in _NO_HINT:
            _hint_if_not_installed()
        if ctx.protected_args and ctx.protected_args[0] not in _NO_MATERIALIZE:
            _write_placeholders()
        signal.signal(signal.SIGINT, _interrupted)
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("git-theta: interrupted; what was done so far is intact (a rerun completes it)", err=True)
            sys.exit(130)
        except ThetaError as exc:
            click.echo(f"git-theta: error: {exc}", err=True)
            sys.exit(1)
        except OSError as exc:  # disk full, quota, read-only, permissions: the user's to fix, in one line
            err = storage_error(exc)
            if err is None:
                raise
            click.echo(f"git-theta: error: {err}", err=True)
            sys.exit(1)


@click.group(cls=ThetaGroup)
@click.version_option(__version__, prog_name="git-theta")
def main() -> None:
    """Version model checkpoints in git as per-tensor objects, and merge them."""


def _register() -> None:
    from gittheta_merge.cli import filters, inspect, maintenance, materialize, remote, stats, strategies, tracking

    for command in (tracking.install, tracking.track, tracking.add_cmd, inspect.ls_cmd, inspect.diff_cmd,
                    maintenance.fsck, maintenance.gc, stats.stats, remote.pull_objects, remote.pre_push_cmd,
                    filters.filter_process, filters.clean, filters.smudge, strategies.strategies_cmd,
                    materialize.checkout_cmd, materialize.status_cmd, materialize.hook_cmd):
        main.add_command(command)


_register()
