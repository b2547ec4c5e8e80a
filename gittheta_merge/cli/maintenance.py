"""`fsck` and `gc`."""

from __future__ import annotations

import sys

import click

from gittheta_merge.errors import UsageError
from gittheta_merge.storage.gitutil import Repo


@click.command()
def fsck() -> None:
    """Verify every stored object by its hash and that every referenced object exists (objects that commits
    on a remote need and this clone has not downloaded yet are reported, not an error)."""
    from gittheta_merge.storage import maintenance

    report = maintenance.fsck(Repo.discover())
    for oid in report.corrupt:
        click.echo(f"corrupt: {oid} (delete it and fetch it again from a remote)")
    for oid, where in report.missing.items():
        click.echo(f"missing: {oid} needed by {where}")
    if report.not_downloaded:
        oid, where = next(iter(report.not_downloaded.items()))
        click.echo(f"not downloaded yet: {len(report.not_downloaded)} object(s) that commits on a remote need "
                   f"(e.g. {oid[:12]}… for {where}); checking those commits out fetches them, or run "
                   "`git theta pull-objects BRANCH…` to have them offline")
    click.echo(f"checked {report.checked} objects: {len(report.corrupt)} corrupt, {len(report.missing)} missing"
               + (f", {len(report.not_downloaded)} not downloaded yet" if report.not_downloaded else ""))
    if not report.ok:
        sys.exit(1)


@click.command()
@click.option("--prune", default="1.hour", show_default=True,
              help="keep unreferenced objects younger than this (N.second|minute|hour|day, or 'now')")
@click.option("--dry-run", is_flag=True, help="only report what would be removed")
@click.option("--no-wait", is_flag=True, help="refuse (naming it) instead of waiting while a command writes objects")
def gc(prune: str, dry_run: bool, no_wait: bool) -> None:
    """Delete objects no commit, reflog or index entry refers to, and temp files of killed commands. Waits for
    running commands that store objects (git add, merges, stats, downloads) and keeps what they wrote."""
    from gittheta_merge.errors import human_bytes
    from gittheta_merge.storage import maintenance

    report = maintenance.gc(Repo.discover(), grace_seconds=_parse_age(prune), dry_run=dry_run, wait=not no_wait)
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {report.removed} objects ({human_bytes(report.removed_bytes)}), kept {report.kept}"
               + (f", spared {report.spared_recent} recent" if report.spared_recent else "")
               + (f", spared {report.spared_pending} not yet in git's index" if report.spared_pending else "")
               + (f"; {verb} {report.tmp_removed} temp file(s) of killed commands ({human_bytes(report.tmp_bytes)})"
                  if report.tmp_removed else ""))


def _parse_age(text: str) -> float:
    if text == "now":
        return 0.0
    units = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 604800}
    try:
        number, unit = text.split(".", 1)
        return float(number) * units[unit.rstrip("s")]
    except (ValueError, KeyError):
        raise UsageError(f"--prune {text!r}: use e.g. 30.minute, 2.hour, 1.day or now") from None
