"""`stats add|compute|ls|rm`: statistic blobs versioned next to the weights."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import click

from gittheta_merge.cli.common import expand_tracked, tracked_at
from gittheta_merge.errors import MissingError, UsageError
from gittheta_merge.storage.gitutil import Repo


@click.group()
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
    for info in attach.attach(repo, expand_tracked(repo, paths), kind, Path(blob), provenance, blob_where=blob):
        click.echo(f"staged {kind} statistics for {info.path} ({info.size / 1e6:,.1f} MB, {info.oid[:12]})")
    click.echo("commit to version them with the weights")


@stats.command("compute")
@click.argument("model_path")
@click.option("--kind", type=click.Choice(["fisher", "gram", "kfac"]), required=True)
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="jsonl or csv with text and label fields")
@click.option("--task", type=click.Choice(["sequence-classification", "token-classification", "causal-lm",
                                           "masked-lm"]), default="sequence-classification", show_default=True)
@click.option("--config", "config_dir", default=None,
              help="HF config/tokenizer directory when MODEL_PATH is a file; the base model's directory when "
                   "MODEL_PATH is a PEFT adapter")
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
@click.option("--device-map", default=None, metavar="auto|balanced|sequential",
              help="a model larger than one device, split by accelerate over the GPUs, the CPU and "
                   "--offload-folder (needs `pip install accelerate`; fisher and kfac then run one block at a "
                   "time); the placement is printed first")
@click.option("--max-memory", default=None, metavar="DEV=SIZE,…",
              help="with --device-map: what each device may hold, e.g. 0=20GB,cpu=8GB (the rest goes to disk)")
@click.option("--offload-folder", default=None, type=click.Path(file_okay=False),
              help="with --device-map: where layers that fit no device wait on disk (default: a temporary folder)")
@click.option("--seed", type=int, default=0, show_default=True)
def stats_compute(model_path: str, kind: str, data_path: str, task: str, config_dir: str | None, n_examples: int,
                  batch_size: int, max_length: int, label_policy: str, text_field: str,
                  text_pair_field: str | None, label_field: str, dtype: str, diagonal_only: bool, device: str,
                  device_map: str | None, max_memory: str | None, offload_folder: str | None, seed: int) -> None:
    """Compute a statistic of a model in the working tree and stage it next to its weights."""
    import tempfile

    from gittheta_merge.stats import attach, save_statistic, workdir
    from gittheta_merge.storage.store import ObjectStore

    repo = Repo.discover()
    tracked = expand_tracked(repo, (model_path,))
    for path in tracked:
        attach.check_staged(repo, path)  # before minutes of computation, not after
    from gittheta_merge.distributed import join

    group, device = join("stats compute", device)  # under torchrun: shard the examples, all-reduce the sums
    rank = group.rank if group else 0
    with contextlib.ExitStack() as cleanup:
        load: dict[str, Any] = {}
        if device_map:  # a model larger than one device: accelerate places it (fisher/kfac layer by layer)
            from gittheta_merge.stats import placement

            placement.check(kind, group is not None)
            folder = offload_folder or cleanup.enter_context(tempfile.TemporaryDirectory(prefix="theta-offload-"))
            load = placement.load_kwargs(device_map, max_memory, folder)
        elif max_memory or offload_folder:
            raise UsageError("--max-memory and --offload-folder go with --device-map")
        model, tokenizer = workdir.load_model_and_tokenizer(model_path, task, config_dir, **load)
        if device_map:
            click.echo(f"git-theta: {model_path} placed by accelerate (--device-map {device_map}):\n"
                       f"{placement.describe(model)}", err=True)
        stat = workdir.adapter_keys(model, workdir.compute_statistic_from_file(
            model, tokenizer, data_path, kind=kind, task=task, label_policy=label_policy, n_examples=n_examples,
            batch_size=batch_size, max_length=max_length, device=device, accumulate_dtype=dtype,
            diagonal_only=diagonal_only, seed=seed, text_field=text_field, text_pair_field=text_pair_field,
            label_field=label_field))  # under torchrun: a progress line per rank
    if group is not None:
        group.close()
    if rank != 0:
        return  # rank 0 holds the same reduced sums and stages the one blob
    summary = {k: v for k, v in stat.provenance.items() if isinstance(v, (str, int, float, bool))}
    if device_map:
        summary["device_map"] = device_map
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
    tracked = tracked_at(repo, rev, paths)
    if paths and not tracked:
        raise MissingError(f"no tracked checkpoint under {' '.join(paths)} at {rev} (see `git theta ls`)")
    for path, meta in tracked.items():
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
    for path in expand_tracked(repo, paths):
        attach.detach(repo, path, kind)
        click.echo(f"removed {kind} statistics from {path}")
