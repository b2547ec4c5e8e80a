"""Command line: the `merge=theta` git driver, `git theta merge BRANCH…`, and `git theta merge-files`.

The driver is non-interactive: strategy, parameters and rules come from git config
(`theta.merge.strategy`, `theta.merge.<param>` with '-' for '_', multi-valued `theta.merge.rule`).
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

from gittheta_merge.errors import ThetaError
from gittheta_merge.gitutil import Repo

RESERVED = {"strategy", "rule", "shortcuts", "maxblockbytes", "max-block-bytes", "report"}
DEFAULT_STRATEGY = "average"


def config_options(repo: Repo) -> tuple[str, dict[str, str], list[str], dict[str, str]]:
    """(strategy, params, rules, settings) from `git config theta.merge.*`."""
    out = repo.git("config", "--get-regexp", r"^theta\.merge\.", check=False).decode()
    strategy = DEFAULT_STRATEGY
    params: dict[str, str] = {}
    rules: list[str] = []
    settings: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        name = key[len("theta.merge."):]
        if name == "strategy":
            strategy = value
        elif name == "rule":
            rules.append(value)
        elif name in RESERVED:
            settings[name.replace("-", "")] = value
        elif "." not in name:
            params[name] = value
    return strategy, params, rules, settings


def parse_sets(items: tuple[str, ...]) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ThetaError(f"--set {item!r}: expected KEY=VALUE (e.g. --set density=0.2)")
        params[key.strip()] = value.strip()
    return params


def parse_stats(items: tuple[str, ...]) -> dict[str, list[str | None]]:
    stats: dict[str, list[str | None]] = {}
    for item in items:
        kind, eq, files = item.partition("=")
        if not eq:
            raise ThetaError(f"--stats {item!r}: expected KIND=FILE,FILE,… (one file per model, '-' for none)")
        stats[kind] = [None if f in {"", "-"} else f for f in files.split(",")]
    return stats


def report_dir(repo: Repo) -> Path:
    path = repo.git_dir / "theta" / "merge-reports"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


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


def run_driver(ancestor: str, ours: str, theirs: str, path: str, repo: Repo | None = None) -> int:
    """The merge driver body; returns git's exit status (0 = merged, 1 = conflict)."""
    from gittheta_merge.merge.api import merge_metadata
    from gittheta_merge.merge.engine import MergeOptions, summary_text
    from gittheta_merge.merge.rules import parse_rule
    from gittheta_merge.metadata import Metadata, is_metadata
    from gittheta_merge.store import ObjectStore

    repo = repo or Repo.discover()
    if os.environ.get("GIT_THETA_MERGE_DRIVER") == "ours":
        return 0  # `git theta merge` stages its own N-way result afterwards
    try:
        blobs = [Path(p).read_bytes() for p in (ancestor, ours, theirs)]
        if not all(is_metadata(b[:64]) for b in blobs[1:]):
            raise ThetaError("one side is not git-theta metadata (a raw checkpoint?); merge it by hand")
        base = Metadata.from_bytes(blobs[0], f"{path} (base)") if is_metadata(blobs[0][:64]) else None
        sides = [Metadata.from_bytes(blobs[1], f"{path} (ours)"), Metadata.from_bytes(blobs[2], f"{path} (theirs)")]
        strategy, params, rule_texts, settings = config_options(repo)
        options = MergeOptions(strategy=strategy, params=params, rules=[parse_rule(r) for r in rule_texts],
                               shortcuts=settings.get("shortcuts", "git"), labels=["ours", "theirs"],
                               max_block_bytes=int(settings.get("maxblockbytes", 64 << 20)), progress=False)
        store = ObjectStore.for_repo(repo)
        block = repo.config_int("theta.blockBytes", 64 << 20)
        merged, result = merge_metadata(sides, base, store, options, block_bytes=block)
        _atomic_write(Path(ours), merged.to_bytes())
        (report_dir(repo) / f"{_safe(path)}.json").write_text(json.dumps(result.report, indent=1))
        print(f"git-theta: {path}: {summary_text(result.report)}", file=sys.stderr)
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


def _git_env(repo: Repo, env: dict[str, str], *args: str) -> bytes:
    """git with a custom environment (a temporary index), which gitutil.run_git does not take."""
    import subprocess

    proc = subprocess.run(["git", *args], cwd=repo.root, env=env, capture_output=True, check=False)
    if proc.returncode != 0:
        raise ThetaError(f"`git {' '.join(args)}` failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def _rev(repo: Repo, rev: str) -> str:
    out = repo.git("rev-parse", "--verify", "-q", f"{rev}^{{commit}}", check=False).decode().strip()
    if not out:
        raise ThetaError(f"{rev}: not a branch or commit")
    return out


def octopus_merge(repo: Repo, branches: list[str], strategy: str, params: dict[str, Any], rules: list[str],
                  stats: dict[str, list[str | None]] | None, dry_run: bool, max_block_bytes: int,
                  shortcuts: str, message: str | None, echo: Any = print) -> dict[str, Any]:
    """N-way merge of branches into HEAD: one merge commit whose parents are HEAD and every branch."""
    from gittheta_merge.inspect_cmds import tracked_files
    from gittheta_merge.merge.api import load_stats, merge_metadata
    from gittheta_merge.merge.engine import MergeOptions, plan_merge, summary_text
    from gittheta_merge.merge.rules import parse_rule
    from gittheta_merge.merge.sources import StoreSource
    from gittheta_merge.store import ObjectStore

    if not branches:
        raise ThetaError("name at least one branch to merge")
    head = _rev(repo, "HEAD")
    commits = [_rev(repo, b) for b in branches]
    base_out = repo.git("merge-base", "--octopus", head, *commits, check=False).decode().split()
    base = base_out[0] if base_out else None
    labels = ["HEAD", *branches]
    revs = [head, *commits]
    per_rev = [tracked_files(repo, r) for r in revs]
    base_files = tracked_files(repo, base) if base else {}
    paths = sorted(set().union(*[set(f) for f in per_rev]))
    options = MergeOptions(strategy=strategy, params=params, rules=[parse_rule(r) for r in rules],
                           max_block_bytes=max_block_bytes, shortcuts=shortcuts, labels=labels)
    store = ObjectStore.for_repo(repo)
    access = load_stats(stats, len(revs))
    todo = []
    for path in paths:
        metas = [f.get(path) for f in per_rev]
        if all(m is not None and m.to_bytes() == metas[0].to_bytes() for m in metas):  # type: ignore[union-attr]
            continue
        if any(m is None for m in metas):
            missing = [labels[i] for i, m in enumerate(metas) if m is None]
            raise ThetaError(f"{path}: not tracked in {', '.join(missing)}; merge it with plain git merge")
        todo.append((path, metas, base_files.get(path)))
    for path, metas, bmeta in todo:  # validate everything before touching anything
        plan = plan_merge([StoreSource(m, store) for m in metas],
                          StoreSource(bmeta, store) if bmeta else None, options, access)
        echo(f"{path}:")
        for line in plan.summary_lines():
            echo(f"  {line}")
    if dry_run:
        return {"paths": [p for p, _, _ in todo], "base": base}
    if repo.git("status", "--porcelain", "--untracked-files=no").strip():
        raise ThetaError("you have uncommitted changes; commit or stash them before git theta merge")
    # 1. plain files: git's own merges, one branch after another, on objects only (nothing checked out);
    #    the theta driver is replaced by `true` (keep ours) because the models are merged N-way below
    current = head
    for label, commit in zip(branches, commits):
        out = repo.git("-c", "merge.theta.driver=true", "merge-tree", "--write-tree", "--no-messages",
                       current, commit, check=False).decode().split()
        if not out or repo.git("cat-file", "-t", out[0], check=False).strip() != b"tree" or len(out) > 1:
            raise ThetaError(f"merging {label}: git reports conflicts in plain (non-model) files "
                             f"({', '.join(out[1:4]) or 'see git merge'}); resolve them with a normal "
                             "git merge first. Nothing was changed")
        current = repo.git("commit-tree", out[0], "-p", current, "-p", commit,
                           input=b"git theta merge (intermediate)").decode().strip()
    tree = repo.git("rev-parse", f"{current}^{{tree}}").decode().strip()
    # 2. models: the N-way merge, staged into a temporary index on top of that tree
    block = repo.config_int("theta.blockBytes", 64 << 20)
    reports: dict[str, Any] = {}
    index = repo.git_dir / "theta" / "merge-index"
    index.parent.mkdir(parents=True, exist_ok=True)
    env_index = {**os.environ, "GIT_INDEX_FILE": str(index)}
    try:
        _git_env(repo, env_index, "read-tree", tree)
        for path, metas, bmeta in todo:
            merged, result = merge_metadata(metas, bmeta, store, options, access, block_bytes=block)
            blob = repo.git("hash-object", "-w", "--no-filters", "--stdin", input=merged.to_bytes()).decode().strip()
            _git_env(repo, env_index, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}")
            (report_dir(repo) / f"{_safe(path)}.json").write_text(json.dumps(result.report, indent=1))
            reports[path] = result.report
            echo(f"{path}: {summary_text(result.report)}")
        final_tree = _git_env(repo, env_index, "write-tree").decode().strip()
    finally:
        index.unlink(missing_ok=True)
    msg = message or f"Merge {', '.join(branches)} (git theta merge, strategy {strategy})"
    parents = [arg for c in revs for arg in ("-p", c)]
    commit = repo.git("commit-tree", final_tree, *parents, input=msg.encode()).decode().strip()
    # 3. one atomic step for the user: fast-forward HEAD to the merge commit (updates the working tree)
    repo.git("merge", "--ff-only", "-q", commit)
    return {"paths": list(reports), "base": base, "commit": commit}


@click.command("merge")
@click.argument("branches", nargs=-1, required=True)
@click.option("--strategy", "-s", default=None, help="merge strategy (default: theta.merge.strategy or average)")
@click.option("--set", "sets", multiple=True, help="strategy parameter KEY=VALUE (repeatable)")
@click.option("--rule", "rules", multiple=True, help="per-tensor rule REGEX=ACTION (repeatable)")
@click.option("--stats", "stats", multiple=True, help="KIND=FILE,… statistics per model (HEAD first)")
@click.option("--dry-run", is_flag=True, help="validate and print the plan; read no tensor data")
@click.option("--max-block-bytes", type=int, default=64 << 20, show_default=True)
@click.option("--shortcuts", type=click.Choice(["git", "exact"]), default="git", show_default=True)
@click.option("-m", "--message", default=None)
def merge_cmd(branches: tuple[str, ...], strategy: str | None, sets: tuple[str, ...], rules: tuple[str, ...],
              stats: tuple[str, ...], dry_run: bool, max_block_bytes: int, shortcuts: str,
              message: str | None) -> None:
    """Merge one or more branches into HEAD with a model-merging strategy, in one merge commit."""
    repo = Repo.discover()
    cfg_strategy, cfg_params, cfg_rules, _ = config_options(repo)
    params = {**(cfg_params if strategy is None else {}), **parse_sets(sets)}
    octopus_merge(repo, list(branches), strategy or cfg_strategy, params, list(rules) or cfg_rules,
                  parse_stats(stats) or None, dry_run, max_block_bytes, shortcuts, message, click.echo)


@click.command("merge-files")
@click.argument("models", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="merged .safetensors file")
@click.option("--base", default=None, help="the common base checkpoint")
@click.option("--strategy", "-s", default=DEFAULT_STRATEGY, show_default=True)
@click.option("--set", "sets", multiple=True, help="strategy parameter KEY=VALUE (repeatable)")
@click.option("--rule", "rules", multiple=True, help="per-tensor rule REGEX=ACTION (repeatable)")
@click.option("--stats", "stats", multiple=True, help="KIND=FILE,… one statistics file per model")
@click.option("--max-block-bytes", type=int, default=64 << 20, show_default=True)
@click.option("--report", default=None, help="write the JSON merge report here")
@click.option("--dry-run", is_flag=True, help="validate and print the plan; read no tensor data")
def merge_files_cmd(models: tuple[str, ...], output: str, base: str | None, strategy: str, sets: tuple[str, ...],
                    rules: tuple[str, ...], stats: tuple[str, ...], max_block_bytes: int, report: str | None,
                    dry_run: bool) -> None:
    """Merge plain .safetensors checkpoints outside git (model 0 is the target)."""
    from gittheta_merge.merge.api import merge_files, plan_files
    from gittheta_merge.merge.engine import summary_text

    if dry_run:
        plan = plan_files(list(models), base, strategy, parse_sets(sets), list(rules), parse_stats(stats) or None,
                          max_block_bytes=max_block_bytes)
        click.echo("\n".join(plan.summary_lines()))
        return
    result = merge_files(list(models), output, base, strategy, parse_sets(sets), list(rules),
                         parse_stats(stats) or None, report, max_block_bytes=max_block_bytes)
    click.echo(summary_text(result))
