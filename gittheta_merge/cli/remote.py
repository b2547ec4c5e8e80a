"""`pull-objects` and the pre-push hook: objects to and from remotes."""

from __future__ import annotations

import sys

import click

from gittheta_merge.storage.gitutil import Repo


@click.command("pull-objects")
@click.argument("revs", nargs=-1)
@click.option("--remote", default=None, help="remote to fetch from (default: the branch's remote or origin)")
def pull_objects(revs: tuple[str, ...], remote: str | None) -> None:
    """Download the tensor objects the given commits need (default HEAD), for offline work."""
    from gittheta_merge.storage import revisions, transfer

    repo = Repo.discover()
    needs: dict[str, transfer.Needed] = {}
    for rev in revs or ("HEAD",):
        for path, meta in revisions.tracked_files(repo, rev).items():
            for need in transfer.needs_of(meta, path, f" at {rev}"):
                needs.setdefault(need.oid, need)
    count = transfer.fetch_objects(repo, list(needs.values()), remote)
    click.echo(f"fetched {count} object(s); {len(needs)} needed by {', '.join(revs or ('HEAD',))} are now local")
    from gittheta_merge.storage.materialize import materialize

    materialize(repo, echo=click.echo)  # placeholders whose objects were missing can be written now


@click.command("pre-push", hidden=True)
@click.argument("remote")
@click.argument("url", required=False, default="")
def pre_push_cmd(remote: str, url: str) -> None:
    """The pre-push hook (hooks/pre-push): upload objects, then chain to git-lfs."""
    from gittheta_merge.storage import transfer

    sys.exit(transfer.pre_push(Repo.discover(), remote, url, sys.stdin.buffer.read()))
