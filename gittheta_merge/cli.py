"""The `git-theta` command line (so `git theta …` works as a git subcommand)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from gittheta_merge import __version__
from gittheta_merge.errors import ThetaError, storage_error
from gittheta_merge.gitutil import Repo

_NO_HINT = {"install", "filter-process", "clean", "smudge", "pre-push", "--help", "--version"}


def _hint_if_not_installed() -> None:
    """A clone made before `git theta install` has metadata text where models should be: say so."""
    try:
        repo = Repo.discover()
    except ThetaError:
        return
    attributes = repo.root / ".gitattributes"
    if not attributes.exists() or "filter=theta" not in attributes.read_text(errors="replace"):
        return
    from gittheta_merge.tracking import is_installed

    if not is_installed(repo):
        click.echo("git-theta: this repository tracks models with gittheta-merge, but the theta filter is "
                   "not configured in this clone, so models are checked out as metadata text and `git add` "
                   "would commit raw files. Run `git theta install` (it also checks the models out).", err=True)


# commands whose modules are imported only when used: the filter process runs inside every
# `git add`/`checkout` and must not pay for importing the merge engine
LAZY_COMMANDS = {"merge": "merge_cmd", "merge-driver": "merge_driver_cmd", "merge-files": "merge_files_cmd"}


class ThetaGroup(click.Group):
    """Turns ThetaError into a one-line message and exit code 1, without a traceback; loads the
    merge commands lazily."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS and name not in self.commands:
            from gittheta_merge.merge import commands

            self.add_command(getattr(commands, LAZY_COMMANDS[name]), name)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> object:
        if ctx.protected_args and ctx.protected_args[0] not in _NO_HINT:
            _hint_if_not_installed()
        try:
            return super().invoke(ctx)
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


@main.command()
@click.option("--scope", type=click.Choice(["repo", "user", "global"]), default="repo", show_default=True,
              help="repo: this repository's .git/config; user: ~/.gitconfig; global: the system config.")
def install(scope: str) -> None:
    """Configure git's theta filter (run once per clone, or once per machine with --scope user)."""
    from gittheta_merge import tracking

    for key, value in tracking.install(scope):
        click.echo(f"set {key} = {value}")
    try:
        repo = Repo.discover()
    except ThetaError:
        return
    restored = tracking.materialise(repo) if tracking.is_installed(repo) else []
    if restored:
        click.echo(f"checked out {len(restored)} tracked file(s) that were still metadata text")


@main.command()
@click.argument("targets", nargs=-1, required=True)
def track(targets: tuple[str, ...]) -> None:
    """Track checkpoint files, globs ('*.safetensors') or Hugging Face model directories."""
    from gittheta_merge import tracking

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


@main.command("ls")
@click.argument("paths", nargs=-1)
@click.option("--rev", default=":", show_default=True, help="commit to read (':' = the index)")
def ls_cmd(paths: tuple[str, ...], rev: str) -> None:
    """List the tensors of tracked checkpoints: name, dtype, shape, size, object."""
    from gittheta_merge import inspect_cmds

    repo = Repo.discover()
    files = _tracked_at(repo, rev, paths)
    if not files:
        what = " ".join(paths) if paths else "files"
        where = "the index" if rev == ":" else rev
        raise ThetaError(f"no tracked checkpoint {what} in {where} (`git theta track` it, then `git add` it)")
    for path, meta in files.items():
        click.echo("\n".join(inspect_cmds.ls_lines(meta, path)))


@main.command("diff")
@click.argument("revs", nargs=-1)
@click.option("--no-stats", is_flag=True, help="metadata only: do not read changed tensors")
def diff_cmd(revs: tuple[str, ...], no_stats: bool) -> None:
    """Tensor-level diff: git theta diff [OLD [NEW]] [-- PATHS]. Defaults: HEAD vs the index."""
    from gittheta_merge import inspect_cmds

    args = list(revs)
    paths: list[str] = []
    if "--" in sys.argv:
        after = sys.argv[sys.argv.index("--") + 1:]
        paths = after
        args = [a for a in args if a not in after]
    old = args[0] if args else "HEAD"
    new = args[1] if len(args) > 1 else inspect_cmds.INDEX
    repo = Repo.discover()
    rel = [_repo_relative(repo, p) for p in paths] or None
    lines = inspect_cmds.diff(repo, old, new, rel, stats=not no_stats)
    click.echo("\n".join(lines) if lines else "no tensor changes")


@main.command()
def fsck() -> None:
    """Verify every stored object by its hash and that every referenced object exists (objects that commits
    on a remote need and this clone has not downloaded yet are reported, not an error)."""
    from gittheta_merge import maintenance

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


@main.command()
@click.option("--prune", default="1.hour", show_default=True,
              help="keep unreferenced objects younger than this (N.second|minute|hour|day, or 'now')")
@click.option("--dry-run", is_flag=True, help="only report what would be removed")
@click.option("--no-wait", is_flag=True, help="refuse (naming it) instead of waiting while a command writes objects")
def gc(prune: str, dry_run: bool, no_wait: bool) -> None:
    """Delete objects no commit, reflog or index entry refers to, and temp files of killed commands. Waits for
    running commands that store objects (git add, merges, stats, downloads) and keeps what they wrote."""
    from gittheta_merge import maintenance
    from gittheta_merge.errors import human_bytes

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
        raise ThetaError(f"--prune {text!r}: use e.g. 30.minute, 2.hour, 1.day or now") from None


def _repo_relative(repo: Repo, path: str) -> str:
    absolute = (Path.cwd() / path).resolve()
    try:
        return absolute.relative_to(repo.root.resolve()).as_posix()
    except ValueError:
        raise ThetaError(f"{path} is outside the repository") from None


@main.group()
def stats() -> None:
    """Statistic blobs (Fisher, Gram, K-FAC) versioned next to the weights they describe."""


@stats.command("add")
@click.argument("blob", type=click.Path(exists=True, dir_okay=False))
@click.argument("paths", nargs=-1, required=True)
@click.option("--kind", required=True, help="fisher, gram, kfac, or your own name")
def stats_add(blob: str, paths: tuple[str, ...], kind: str) -> None:
    """Attach a precomputed statistic (a safetensors file keyed by weight name) to checkpoints."""
    from gittheta_merge.stats import attach

    repo = Repo.discover()
    provenance = attach.provenance_from_blob(Path(blob), blob)
    provenance.setdefault("source", Path(blob).name)
    for info in attach.attach(repo, _expand_tracked(repo, paths), kind, Path(blob), provenance, blob_where=blob):
        click.echo(f"staged {kind} statistics for {info.path} ({info.size / 1e6:,.1f} MB, {info.oid[:12]})")
    click.echo("commit to version them with the weights")


@stats.command("compute")
@click.argument("model_path")
@click.option("--kind", type=click.Choice(["fisher", "gram", "kfac"]), required=True)
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="jsonl or csv with text and label fields")
@click.option("--task", type=click.Choice(["sequence-classification", "token-classification", "causal-lm",
                                           "masked-lm"]), default="sequence-classification", show_default=True)
@click.option("--config", "config_dir", default=None, help="HF config/tokenizer directory when MODEL_PATH is a file")
@click.option("--n-examples", type=int, default=1000, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--max-length", type=int, default=128, show_default=True)
@click.option("--label-policy", type=click.Choice(["empirical", "sampled", "exact"]), default="empirical",
              show_default=True)
@click.option("--text-field", default="text", show_default=True)
@click.option("--text-pair-field", default=None)
@click.option("--label-field", default="label", show_default=True)
@click.option("--dtype", type=click.Choice(["float64", "float64-exact", "float32"]), default="float64",
              show_default=True,
              help="accumulation: float64 running sums of products formed in the model's dtype (float32 for a "
                   "float32 model) over blocks of <= 2048 rows; float64-exact forms every product in float64 "
                   "too (slower on CPU); float32 (sums too)")
@click.option("--diagonal-only", is_flag=True, help="gram/kfac: store only the diagonal (d instead of d² numbers)")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, …")
@click.option("--seed", type=int, default=0, show_default=True)
def stats_compute(model_path: str, kind: str, data_path: str, task: str, config_dir: str | None, n_examples: int,
                  batch_size: int, max_length: int, label_policy: str, text_field: str,
                  text_pair_field: str | None, label_field: str, dtype: str, diagonal_only: bool, device: str,
                  seed: int) -> None:
    """Compute a statistic of a model in the working tree and stage it next to its weights."""
    import tempfile

    from gittheta_merge.stats import attach, save_statistic, workdir
    from gittheta_merge.store import ObjectStore

    repo = Repo.discover()
    tracked = _expand_tracked(repo, (model_path,))
    for path in tracked:
        attach.check_staged(repo, path)  # before minutes of computation, not after
    model, tokenizer = workdir.load_model_and_tokenizer(model_path, task, config_dir)
    stat = workdir.compute_statistic_from_file(
        model, tokenizer, data_path, kind=kind, task=task, label_policy=label_policy, n_examples=n_examples,
        batch_size=batch_size, max_length=max_length, device=device, accumulate_dtype=dtype,
        diagonal_only=diagonal_only, seed=seed, text_field=text_field, text_pair_field=text_pair_field,
        label_field=label_field)
    summary = {k: v for k, v in stat.provenance.items() if isinstance(v, (str, int, float, bool))}
    store = ObjectStore.for_repo(repo)
    tmp_dir = store.tmp_dir
    tmp_dir.mkdir(parents=True, exist_ok=True)
    # the lock from before the temp folder until the index has the blob: gc removes neither meanwhile
    with store.guard.session(eager=True), tempfile.TemporaryDirectory(dir=tmp_dir, prefix="stats-") as tmp:
        blob = Path(tmp) / f"{kind}.safetensors"
        save_statistic(stat, blob)  # written straight to disk: the blob is never a second copy in memory
        for info in attach.attach(repo, tracked, kind, blob, summary,
                                  blob_where=f"{kind} statistics of {model_path}"):
            click.echo(f"staged {kind} statistics for {info.path} ({info.size / 1e6:,.1f} MB, {info.oid[:12]})")
    click.echo("commit to version them with the weights")


@stats.command("ls")
@click.argument("paths", nargs=-1)
@click.option("--rev", default=":", show_default=True, help="commit to read (':' = the index)")
def stats_ls(paths: tuple[str, ...], rev: str) -> None:
    """What statistics exist, for which weights, how computed, and whether they are stale."""
    from gittheta_merge.stats import attach

    repo = Repo.discover()
    rows = []
    for path, meta in _tracked_at(repo, rev, paths).items():
        rows += attach.list_stats(path, meta)
    if not rows:
        click.echo("no statistics attached")
    for info in rows:
        click.echo(attach.describe(info))


@stats.command("rm")
@click.argument("paths", nargs=-1, required=True)
@click.option("--kind", required=True)
def stats_rm(paths: tuple[str, ...], kind: str) -> None:
    """Detach a statistic from checkpoints (staged; commit to record it)."""
    from gittheta_merge.stats import attach

    repo = Repo.discover()
    for path in _expand_tracked(repo, paths):
        attach.detach(repo, path, kind)
        click.echo(f"removed {kind} statistics from {path}")


def _tracked_at(repo: Repo, rev: str, paths: tuple[str, ...]) -> dict[str, Any]:
    """Tracked checkpoints (path → metadata) at a revision, under the given paths (relative to cwd)."""
    from gittheta_merge import inspect_cmds

    return inspect_cmds.tracked_files(repo, rev, [_repo_relative(repo, p) for p in paths] or None)


def _expand_tracked(repo: Repo, paths: tuple[str, ...]) -> list[str]:
    """Tracked checkpoint files staged under the paths (files, or a directory such as an HF model's)."""
    found = list(_tracked_at(repo, ":", paths))
    if not found:
        raise ThetaError(f"no tracked checkpoint staged under {' '.join(paths)}")
    return found


@main.command("pull-objects")
@click.argument("revs", nargs=-1)
@click.option("--remote", default=None, help="remote to fetch from (default: the branch's remote or origin)")
def pull_objects(revs: tuple[str, ...], remote: str | None) -> None:
    """Download the tensor objects the given commits need (default HEAD), for offline work."""
    from gittheta_merge import inspect_cmds, transfer

    repo = Repo.discover()
    needs: dict[str, transfer.Needed] = {}
    for rev in revs or ("HEAD",):
        for path, meta in inspect_cmds.tracked_files(repo, rev).items():
            for need in transfer.needs_of(meta, path, f" at {rev}"):
                needs.setdefault(need.oid, need)
    count = transfer.fetch_objects(repo, list(needs.values()), remote)
    click.echo(f"fetched {count} object(s); {len(needs)} needed by {', '.join(revs or ('HEAD',))} are now local")


@main.command("pre-push", hidden=True)
@click.argument("remote")
@click.argument("url", required=False, default="")
def pre_push_cmd(remote: str, url: str) -> None:
    """The pre-push hook (hooks/pre-push): upload objects, then chain to git-lfs."""
    from gittheta_merge import transfer

    sys.exit(transfer.pre_push(Repo.discover(), remote, url, sys.stdin.buffer.read()))


@main.command("filter-process", hidden=True)
def filter_process() -> None:
    """git's long-running filter (filter.theta.process)."""
    from gittheta_merge.filter import serve

    serve(sys.stdin.buffer, sys.stdout.buffer)


@main.command(hidden=True)
@click.argument("path")
def clean(path: str) -> None:
    """Single-shot clean filter: checkpoint on stdin → metadata on stdout."""
    from gittheta_merge.filter import single_shot

    sys.exit(single_shot("clean", path))


@main.command(hidden=True)
@click.argument("path")
def smudge(path: str) -> None:
    """Single-shot smudge filter: metadata on stdin → checkpoint on stdout."""
    from gittheta_merge.filter import single_shot

    sys.exit(single_shot("smudge", path))


if __name__ == "__main__":
    main(prog_name=os.path.basename(sys.argv[0]))
