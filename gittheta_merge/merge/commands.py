"""Command line: the `merge=theta` git driver, `git theta merge BRANCH…`, and `git theta merge-files`.

The driver is non-interactive: strategy, parameters and rules come from the layered settings of
merge/config.py (.gittheta.toml < .gitattributes < git config `theta.merge.*` < flags); statistics for
Fisher / RegMean / MaTS from each side's metadata (merge/statsflow.py).
It writes the merged metadata to %A only when the whole merge succeeded (temp file + rename), so any
failure, including being killed, leaves ours intact and git reports a conflict.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from gittheta_merge.constants import BLOCK_BYTES, MERGE_CHUNK_BYTES
from gittheta_merge.errors import InputError, ThetaError, UsageError
from gittheta_merge.merge import config
from gittheta_merge.storage.gitutil import Repo
from gittheta_merge.storage.metadata import configured_block_bytes

DEFAULT_STRATEGY = "average"


def parse_sets(items: tuple[str, ...]) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE (e.g. --set density=0.2)")
        params[key.strip()] = value.strip()
    return params


def parse_size(text: str | None) -> int | None:
    """5GB, 500MB, 2.5e9, 4096: bytes (decimal units, as mergekit's --out-shard-size)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([KMGT]?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"--shard-size {text!r}: a size such as 5GB, 500MB or 1000000000")
    value = float(m.group(1)) * 1000 ** " KMGT".index(m.group(2).upper() or " ")
    if value < 1:
        raise UsageError(f"--shard-size {text!r}: must be at least one byte")
    return int(value)


def parse_stats(items: tuple[str, ...]) -> dict[str, list[str | None]]:
    stats: dict[str, list[str | None]] = {}
    for item in items:
        kind, eq, files = item.partition("=")
        if not eq:
            raise UsageError(f"--stats {item!r}: expected KIND=FILE,FILE,… (one file per model, '-' for none)")
        stats[kind] = [None if f in {"", "-"} else f for f in files.split(",")]
    return stats


def report_dir(repo: Repo) -> Path:
    path = repo.git_dir / "theta" / "merge-reports"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_report(repo: Repo, path: str, report: dict[str, Any]) -> None:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", path)
    (report_dir(repo) / f"{name}.json").write_text(json.dumps(report, indent=1))


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _current_branch(repo: Repo) -> str:
    return repo.git("symbolic-ref", "-q", "--short", "HEAD", check=False).decode().strip() or "HEAD"


def _branch_names(repo: Repo) -> tuple[str, str]:
    """Names for ours/theirs in messages: the current branch, and the one git is merging (GITHEAD_<sha>)."""
    ours = _current_branch(repo)
    theirs = [v for k, v in os.environ.items() if k.startswith("GITHEAD_") and v and v != "HEAD"]
    return ours, (theirs[0] if len(theirs) == 1 else "the merged commit")


def check_device(device: str) -> str:
    """Refuse a device this machine lacks before any work (a CUDA merge on a CPU box fails clearly)."""
    if device.strip().lower() == "cpu":
        return "cpu"  # without importing torch: a merge on the torch-free path never needs it
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return str(dev)


def resolve_merge(metas: list[Any], bmeta: Any, store: Any, settings: Any, path: str, labels: list[str],
                  names: list[str], explicit: Any = None, progress: bool | None = None) -> tuple[Any, Any]:
    """The merge options of one path with its statistics resolved (merge/statsflow.py): (options, resolution).
    A fallback for missing statistics replaces the strategy for the whole file, so per-tensor strategy
    rules are dropped with it."""
    from gittheta_merge.merge.sources import StoreSource
    from gittheta_merge.merge.statsflow import resolve_statistics

    options = settings.options(labels=labels, progress=progress)
    check_device(options.device)
    sources = [StoreSource(m, store) for m in metas]
    base_src = StoreSource(bmeta, store) if bmeta is not None else None
    res = resolve_statistics(metas, names, path, store, options, sources, base_src, explicit,
                             settings.allow_stale_stats, settings.missing_stats)
    options.strategy, options.params = res.strategy, res.params
    if res.fallback:
        options.rules = [r for r in options.rules if r.action != "merge"]
    return options, res


def merge_tracked(metas: list[Any], bmeta: Any, store: Any, settings: Any, path: str, labels: list[str],
                  names: list[str], explicit: Any = None, block_bytes: int = BLOCK_BYTES,
                  progress: bool | None = None, resolved: tuple[Any, Any] | None = None, part: Any = None
                  ) -> tuple[Any, dict[str, Any]]:
    """Merge tracked checkpoints of one path with statistics found in their metadata; the merged metadata
    carries the statistics derived for it where that is exact (merge/statsflow.py). Returns (metadata, report).
    `labels` are the sides' short names (ours/theirs, HEAD/branch), `names` how messages call them;
    `resolved` is resolve_merge's result when the caller already has it; `part` a torchrun rank's share
    (merge/distributed.py: every rank returns the whole metadata, only rank 0 derives statistics)."""
    from gittheta_merge.merge.api import merge_metadata
    from gittheta_merge.merge.statsflow import derive_statistics

    options, res = resolved or resolve_merge(metas, bmeta, store, settings, path, labels, names, explicit,
                                             progress)
    merged, result = merge_metadata(metas, bmeta, store, options, res.access, block_bytes=block_bytes, part=part)
    report = result.report
    report["statistics"] = res.report()
    if part is not None and part.rank != 0:
        return merged, report
    if any(t.action == "merge" for t in result.plan.tensors):
        strat = next((s for s in result.plan.strategies.values() if s.name == options.strategy), None)
        derived = strat and derive_statistics(merged, metas, names, result.plan, res.access, strat, store)
        if derived:
            report["statistics"]["derived"] = derived
    if res.fallback:
        print(f"git-theta: {path}: {res.fallback}", file=sys.stderr)
    if part is None or part.shared:  # (sharing nothing, the other ranks' objects are on the remote they uploaded to)
        store.require_present(merged.iter_objects(), path)
    return merged, report


def run_driver(ancestor: str, ours: str, theirs: str, path: str, repo: Repo | None = None) -> int:
    """The merge driver body; returns git's exit status (0 = merged, 1 = conflict)."""
    from gittheta_merge.merge.engine import summary_text
    from gittheta_merge.storage.metadata import Metadata, is_metadata
    from gittheta_merge.storage.store import ObjectStore

    repo = repo or Repo.discover()
    if os.environ.get("GIT_THETA_MERGE_DRIVER") == "ours":
        return 0  # `git theta merge` stages its own N-way result afterwards
    try:
        blobs = [Path(p).read_bytes() for p in (ancestor, ours, theirs)]
        if not all(is_metadata(b[:64]) for b in blobs[1:]):
            raise InputError("one side is not git-theta metadata (a raw checkpoint?); merge it by hand")
        base = Metadata.from_bytes(blobs[0], f"{path} (base)") if is_metadata(blobs[0][:64]) else None
        sides = [Metadata.from_bytes(blobs[1], f"{path} (ours)"), Metadata.from_bytes(blobs[2], f"{path} (theirs)")]
        settings = config.resolve(repo, path)
        store = ObjectStore.for_repo(repo)
        block = configured_block_bytes(repo)
        ours_name, theirs_name = _branch_names(repo)
        with store.guard.session(owner="git"):  # the git merge that called us refers to them after we answer
            merged, report = merge_tracked(sides, base, store, settings, path, ["ours", "theirs"],
                                           [f"ours ({ours_name})", f"theirs ({theirs_name})"], block_bytes=block,
                                           progress=False)
            _atomic_write(Path(ours), merged.to_bytes())
        _write_report(repo, path, report)
        print(f"git-theta: {path}: {summary_text(report)}", file=sys.stderr)
        return 0
    except ThetaError as exc:
        print(f"git-theta: merge of {path} failed, leaving a conflict: {exc}", file=sys.stderr)
        return 1


@click.command("merge-driver", hidden=True)
@click.argument("ancestor")
@click.argument("ours")
@click.argument("theirs")
@click.argument("path")
def merge_driver_cmd(ancestor: str, ours: str, theirs: str, path: str) -> None:
    """git's merge=theta driver: git-theta merge-driver %O %A %B %P."""
    sys.exit(run_driver(ancestor, ours, theirs, path))


def cli_layer(strategy: str | None, sets: tuple[str, ...], rules: tuple[str, ...], max_block_bytes: int | None,
              shortcuts: str | None, device: str | None, allow_stale_stats: bool, missing_stats: str | None
              ) -> dict[str, Any]:
    """The command-line layer of the settings (only what was given on the command line)."""
    from gittheta_merge.merge.rules import parse_rule

    return {"strategy": strategy, "params": parse_sets(sets), "rules": [parse_rule(r) for r in rules],
            "max_block_bytes": max_block_bytes, "shortcuts": shortcuts, "device": device,
            "allow_stale_stats": True if allow_stale_stats else None, "missing_stats": missing_stats}


@click.command("merge")
@click.argument("branches", nargs=-1)
@click.option("--config", "config_file", default=None,
              help="a mergekit YAML configuration: its models and base_model are branches or revisions")
@click.option("--strategy", "-s", default=None, help="merge strategy (default: settings, else average)")
@click.option("--set", "sets", multiple=True, help="strategy parameter KEY=VALUE (repeatable)")
@click.option("--rule", "rules", multiple=True, help="per-tensor rule REGEX=ACTION (repeatable)")
@click.option("--stats", "stats", multiple=True,
              help="KIND=FILE,… statistics per model (HEAD first); default: the ones each branch carries")
@click.option("--allow-stale-stats", is_flag=True, help=config.BY_NAME["allow_stale_stats"].help)
@click.option("--missing-stats", default=None, help=config.BY_NAME["missing_stats"].help)
@click.option("--dry-run", is_flag=True, help="validate and print the plan; read no tensor data")
@click.option("--max-block-bytes", type=int, default=None, help=config.BY_NAME["max_block_bytes"].help)
@click.option("--shortcuts", type=click.Choice(config.BY_NAME["shortcuts"].choices), default=None,
              help=config.BY_NAME["shortcuts"].help)
@click.option("--device", default=None, help=config.BY_NAME["device"].help)
@click.option("--out-dtype", type=click.Choice(config.BY_NAME["out_dtype"].choices), default=None,
              help=config.BY_NAME["out_dtype"].help)
@click.option("--align", "align_data", default=None, metavar="TEXT",
              help="first align each branch's model to HEAD's (models trained from different initializations; needs "
                   "plugins/align) using the sentences in TEXT, and merge the aligned branches (BRANCH-aligned)")
@click.option("--search", "search_space", default=None, metavar="SPACE",
              help="search the strategy's parameters, e.g. 'density=0.1:0.9,lambda=0.5:2.0' (ranges LOW:HIGH[:POINTS], "
                   "choices A|B), scoring each candidate merge with --eval; the best becomes the merge commit")
@click.option("--eval", "eval_command", default=None, metavar="COMMAND",
              help="with --search: a shell command run in each candidate's work tree that prints a score (one number, "
                   "or JSON with --metric)")
@click.option("--trials", type=int, default=None, help="with --search: candidates to score (default 20; grid: all)")
@click.option("--sampler", type=click.Choice(["tpe", "random", "grid"]), default="tpe", show_default=True,
              help="with --search: optuna's sampler")
@click.option("--metric", default=None, help="with --search: the JSON field --eval's score is in")
@click.option("--direction", type=click.Choice(["maximize", "minimize"]), default="maximize", show_default=True)
@click.option("--search-seed", type=int, default=0, show_default=True, help="with --search: the sampler's seed")
@click.option("-m", "--message", default=None)
def merge_cmd(branches: tuple[str, ...], config_file: str | None, strategy: str | None, sets: tuple[str, ...],
              rules: tuple[str, ...], stats: tuple[str, ...], allow_stale_stats: bool, missing_stats: str | None,
              dry_run: bool, max_block_bytes: int | None, shortcuts: str | None, device: str | None,
              out_dtype: str | None, align_data: str | None, search_space: str | None, eval_command: str | None,
              trials: int | None, sampler: str, metric: str | None, direction: str, search_seed: int,
              message: str | None) -> None:
    """Merge one or more branches into HEAD with a model-merging strategy, in one merge commit."""
    from gittheta_merge.distributed import join, quiet_unless_rank0, world_size
    from gittheta_merge.merge.octopus import config_models, octopus_merge

    repo = Repo.discover()
    group = None
    if world_size() > 1:  # under torchrun: this process is one rank of the merge (merge/distributed.py)
        if align_data is not None:
            raise UsageError("--align does not run under torchrun: align first (git theta align), then merge the "
                             "aligned branches with torchrun")
        group, rank_device = join("merge", device or "cpu")
        device = rank_device if device else None
    echo = quiet_unless_rank0(group, click.echo)
    if align_data is not None:
        if config_file or dry_run:
            raise UsageError("--align commits aligned branches first: it does not combine with --config or --dry-run")
        if strategy:
            from gittheta_merge.merge import strategies as strategy_plugins

            strategy_plugins.get(strategy)  # a misspelt strategy fails before minutes of alignment
        branches = tuple(_aligner()(repo, "HEAD", list(branches), align_data, lambda line: click.echo(line, err=True)))
    cli = cli_layer(strategy, sets, rules, max_block_bytes, shortcuts, device, allow_stale_stats, missing_stats)
    cli["out_dtype"] = out_dtype
    explicit = None
    if config_file:
        if branches or strategy or sets:
            raise UsageError("--config names the models, the method and its parameters; drop BRANCH…, --strategy "
                             "and --set")
        branches, explicit = config_models(repo, config_file)
    elif not branches:
        raise UsageError("name at least one branch to merge (or --config merge.yml)")
    if search_space is not None or eval_command is not None:
        if not (search_space and eval_command):
            raise UsageError("--search and --eval go together: the space to search and the command that scores it")
        if config_file or dry_run or group is not None:
            raise UsageError("--search does not combine with --config, --dry-run or torchrun")
        from gittheta_merge.merge.search import run_search

        run_search(repo, list(branches), cli, parse_stats(stats) or None, message, echo, explicit, search_space,
                   eval_command, trials, sampler, search_seed, metric, direction)
        return
    octopus_merge(repo, list(branches), cli, parse_stats(stats) or None, dry_run, message, echo, explicit, group)
    if group is not None:
        group.close()


def _aligner() -> Any:
    """The alignment plugin's `align_branches(repo, reference, branches, data, echo) -> aligned branch names`
    (entry-point group gittheta_merge.aligners)."""
    from importlib.metadata import entry_points

    found = list(entry_points(group="gittheta_merge.aligners"))
    if not found:
        raise UsageError("--align needs the alignment plugin: pip install -e plugins/align")
    return found[0].load()


@click.command("merge-files")
@click.argument("models", nargs=-1)
@click.option("-o", "--output", required=True,
              help="merged .safetensors file (with --config also a directory: a Hugging Face model)")
@click.option("--config", "config_file", default=None,
              help="a mergekit YAML configuration (models are paths); replaces MODELS, --base, --strategy, --set")
@click.option("--shard-size", default=None,
              help="a directory output's largest shard, e.g. 5GB or 500MB (default 5GB, as mergekit)")
@click.option("--adapter", "adapters", multiple=True,
              help="a PEFT LoRA adapter directory (repeatable): each counts as the model --base + its delta weights")
@click.option("--base", default=None, help="the common base checkpoint")
@click.option("--strategy", "-s", default=DEFAULT_STRATEGY, show_default=True)
@click.option("--set", "sets", multiple=True, help="strategy parameter KEY=VALUE (repeatable)")
@click.option("--rule", "rules", multiple=True, help="per-tensor rule REGEX=ACTION (repeatable)")
@click.option("--stats", "stats", multiple=True, help="KIND=FILE,… one statistics file per model")
@click.option("--max-block-bytes", type=int, default=MERGE_CHUNK_BYTES, show_default=True)
@click.option("--report", default=None, help="write the JSON merge report here")
@click.option("--dry-run", is_flag=True, help="validate and print the plan; read no tensor data")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N]: one block at a time there")
def merge_files_cmd(models: tuple[str, ...], output: str, config_file: str | None, shard_size: str | None,
                    adapters: tuple[str, ...], base: str | None, strategy: str,
                    sets: tuple[str, ...],
                    rules: tuple[str, ...], stats: tuple[str, ...], max_block_bytes: int, report: str | None,
                    dry_run: bool, device: str) -> None:
    """Merge plain .safetensors checkpoints outside git (model 0 is the target)."""
    from gittheta_merge.merge.api import merge_files, plan_files
    from gittheta_merge.merge.engine import summary_text

    if config_file:
        from gittheta_merge.merge import mergekit_config

        if models or base or sets or strategy != DEFAULT_STRATEGY:
            raise UsageError("--config names the models, the base, the method and its parameters; "
                             "drop MODELS, --base, --strategy and --set")
        result = mergekit_config.merge_files_config(config_file, output, report_path=report,
                                                    max_block_bytes=max_block_bytes, device=check_device(device),
                                                    shard_bytes=parse_size(shard_size))
        click.echo(summary_text(result))
        return
    if adapters:
        from gittheta_merge.merge.adapters import merge_adapter_models

        if models or not base:
            raise UsageError("--adapter merges adapters onto --base BASE.safetensors: give --base, and no MODELS")
        result = merge_adapter_models(base, list(adapters), output, strategy, parse_sets(sets), list(rules),
                                      report, max_block_bytes=max_block_bytes, device=check_device(device))
        click.echo(summary_text(result))
        return
    if not models:
        raise UsageError("name the models to merge (or --config merge.yml, or --adapter DIR)")
    if dry_run:
        plan = plan_files(list(models), base, strategy, parse_sets(sets), list(rules), parse_stats(stats) or None,
                          max_block_bytes=max_block_bytes)
        click.echo("\n".join(plan.summary_lines()))
        return
    result = merge_files(list(models), output, base, strategy, parse_sets(sets), list(rules),
                         parse_stats(stats) or None, report, shard_bytes=parse_size(shard_size),
                         max_block_bytes=max_block_bytes, device=check_device(device))
    click.echo(summary_text(result))


@click.command("merge-adapters")
@click.argument("adapters", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="the merged adapter's directory")
@click.option("--combination", default="svd", show_default=True,
              help="PEFT's add_weighted_adapter combination: linear, cat, svd, ties, ties_svd, dare_linear, "
                   "dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd")
@click.option("--weights", default=None, help="one weight per adapter, e.g. 1,0.5 (default 1 each)")
@click.option("--density", type=float, default=1.0, show_default=True, help="fraction kept by the pruning kinds")
@click.option("--svd-rank", type=int, default=None, help="rank of the SVD kinds' result (default: the largest rank)")
@click.option("--svd-clamp", type=float, default=None, help="clamp the SVD factors at this quantile of their entries")
@click.option("--majority-sign-method", type=click.Choice(["total", "frequency"]), default="total", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the dare kinds' random masks")
def merge_adapters_cmd(adapters: tuple[str, ...], output: str, combination: str, weights: str | None, density: float,
                       svd_rank: int | None, svd_clamp: float | None, majority_sign_method: str, seed: int) -> None:
    """Merge PEFT LoRA adapter directories into one adapter, as PEFT's add_weighted_adapter does."""
    from gittheta_merge.merge.adapters import merge_adapters
    from gittheta_merge.merge.strategies.base import parse_value

    parsed = parse_value("floats", weights, "--weights") if weights else None
    report = merge_adapters(list(adapters), output, parsed, combination, density, svd_rank, svd_clamp,
                            majority_sign_method, seed)
    click.echo(f"merged {len(adapters)} adapters ({report['combination']}, rank {report['rank']}, "
               f"{report['modules']} modules) into {output}")
