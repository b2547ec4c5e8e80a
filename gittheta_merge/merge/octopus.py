"""`git theta merge BRANCH…` (and `--config merge.yml`): an N-way model merge in one merge commit whose parents
are HEAD and every merged commit. Plain files are merged by git's own merge-tree, one commit after another, on
objects only; the models are merged N-way from the object store and staged into a temporary index; HEAD is then
fast-forwarded to the merge commit in one step, so a failure at any point leaves the branch as it was."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from gittheta_merge.errors import InputError, MissingError, UsageError
from gittheta_merge.merge import config
from gittheta_merge.merge.commands import _current_branch, _write_report, merge_tracked, resolve_merge
from gittheta_merge.storage.gitutil import Repo
from gittheta_merge.storage.metadata import configured_block_bytes


def _rev(repo: Repo, rev: str) -> str:
    out = repo.git("rev-parse", "--verify", "-q", f"{rev}^{{commit}}", check=False).decode().strip()
    if not out:
        raise MissingError(f"{rev}: not a branch or commit")
    return out


@dataclass
class ExplicitModels:
    """A merge whose models, their order and the base are named (a mergekit configuration) instead of being HEAD
    plus the branches over their merge base; `cli_for(path, names)` gives the settings layer of one model path
    from its tensor names (the configuration's per-tensor parameters)."""

    refs: list[str]
    base: str | None
    cli_for: Callable[[str, list[str]], dict[str, Any]]


def config_models(repo: Repo, config_path: str) -> tuple[list[str], ExplicitModels]:
    """The branches to record as parents and the explicit models of `git theta merge --config merge.yml`."""
    from gittheta_merge.merge import mergekit_config

    raw = mergekit_config.load(config_path)
    probe = mergekit_config.plan(raw, [], config_path)  # validates the file and orders the models
    head = _rev(repo, "HEAD")
    parents = []
    for ref in [*probe.models, *([probe.base] if probe.base else [])]:
        if _rev(repo, ref) != head and ref not in parents:
            parents.append(ref)

    def cli_for(path: str, names: list[str]) -> dict[str, Any]:
        mk = mergekit_config.plan(raw, names, f"{config_path} ({path})")
        # shortcuts=exact: every tensor goes through the method, as in mergekit (git's "changed on one side only:
        # take that side" would skip the sparsification of a tensor only one fine-tune changed)
        return {"strategy": mk.strategy, "params": mk.params, "rules": mk.rules, "shortcuts": "exact",
                **({"out_dtype": mk.out_dtype} if mk.out_dtype else {})}

    return parents, ExplicitModels(probe.models, probe.base, cli_for)


def octopus_merge(repo: Repo, branches: list[str], cli: dict[str, Any] | None = None,
                  stats: dict[str, list[str | None]] | None = None, dry_run: bool = False,
                  message: str | None = None, echo: Any = print,
                  explicit: ExplicitModels | None = None, group: Any = None, advance: bool = True) -> dict[str, Any]:
    """N-way merge of branches into HEAD: one merge commit whose parents are HEAD and every branch.

    Settings are resolved per model path (merge/config.py: .gittheta.toml < attributes < git config < `cli`);
    statistics come from `stats` files if given, else from each branch's metadata. With `explicit`, the models
    are exactly those it names, in its order, over its base (every model counts, changed or not). With `group`
    (torchrun, gittheta_merge/distributed.py) every rank runs this function: each merges its share of the tensors
    (merge/distributed.py) and rank 0 alone writes to git. With advance=False the merge commit is made but HEAD stays
    where it is (a candidate of `--search`, merge/search.py). Returns the paths, base, commit and reports.
    """
    from gittheta_merge.merge.api import load_stats
    from gittheta_merge.merge.engine import summary_text
    from gittheta_merge.merge.plan import plan_merge
    from gittheta_merge.merge.sources import StoreSource
    from gittheta_merge.storage.revisions import tracked_files
    from gittheta_merge.storage.store import ObjectStore

    if not branches:
        raise UsageError("name at least one branch to merge")
    if cli and cli.get("strategy"):
        from gittheta_merge.merge import strategies

        strategies.get(cli["strategy"])  # an unknown name is an error even when there is nothing to merge
    head = _rev(repo, "HEAD")
    commits = [_rev(repo, b) for b in branches]
    merged_already = [b for b, c in zip(branches, commits) if repo.is_ancestor(c, head)]
    if explicit is None and len(merged_already) == len(branches):
        echo(f"Already up to date ({', '.join(branches)} already in HEAD); nothing to merge.")
        return {"paths": [], "base": None}
    if explicit is None:
        base_out = repo.git("merge-base", "--octopus", head, *commits, check=False).decode().split()
        base = base_out[0] if base_out else None
        labels = ["HEAD", *branches]
        names = [_current_branch(repo), *branches]
        revs = [head, *commits]
    else:
        base = _rev(repo, explicit.base) if explicit.base else None
        labels = names = list(explicit.refs)
        revs = [_rev(repo, r) for r in explicit.refs]
    store = ObjectStore.for_repo(repo)
    shared = True  # one object store for every process (always, without torchrun)
    if group is not None:
        from gittheta_merge.merge.distributed import fetch_statistics, store_is_shared

        group.same_everywhere([head, revs, base], "commits (HEAD, the models, their merge base)",
                              "fetch the same branches and check out the same commit in every rank's clone")
        shared = store_is_shared(group, store.lfs_dir)
    per_rev = [tracked_files(repo, r) for r in revs]
    base_files = tracked_files(repo, base) if base else {}
    paths = sorted(set().union(*[set(f) for f in per_rev]))
    if not shared:  # each rank its own clone: the statistics every rank's planning reads come from the remote
        with group.step("fetching statistics"):
            fetch_statistics(repo, [*per_rev, base_files])
    access = load_stats(stats, len(revs)) if stats else None
    todo = []
    for path in paths:
        metas = [f.get(path) for f in per_rev]
        missing = [labels[i] for i, m in enumerate(metas) if m is None]
        if missing:
            raise MissingError(f"{path}: not tracked in {', '.join(missing)}; merge it with plain git merge")
        first = metas[0].to_bytes()  # type: ignore[union-attr]
        if explicit is None and all(m.to_bytes() == first for m in metas[1:]):  # type: ignore[union-attr]
            continue  # (a configuration's method runs even on equal models: task arithmetic of one, weighted)
        bmeta = base_files.get(path)
        if explicit is not None:
            names_here = [t.name for t in metas[0].tensors]  # type: ignore[union-attr]
            todo.append((path, list(range(len(metas))), bmeta,
                         config.resolve(repo, path, {**(cli or {}),
                                                       **{k: v for k, v in explicit.cli_for(path, names_here).items()
                                                          if v is not None}})))
            continue
        sides = changed_sides(metas, bmeta)
        if len(sides) < len(metas):
            same = ", ".join(labels[i] for i in range(len(metas)) if i not in sides)
            echo(f"{path}: unchanged from the merge base in {same}: not merged (as git does)")
        if len(sides) == 1:
            continue  # only one side changed the file: git's tree merge already took that side's version
        todo.append((path, sides, bmeta, config.resolve(repo, path, cli)))
    strategies_used: set[str] = set()
    resolved = {}
    with group.step("planning") if group is not None else nullcontext():
        for path, sides, bmeta, settings in todo:  # validate everything (statistics included) before writing
            metas, side_labels, side_names = _pick(per_rev, path, labels, names, sides)
            options, res = resolved[path] = resolve_merge(metas, bmeta, store, settings, path, side_labels,
                                                          side_names, _pick_stats(access, sides))
            base_src = StoreSource(bmeta, store) if bmeta is not None else None
            plan = plan_merge([StoreSource(m, store) for m in metas], base_src, options, res.access)
            strategies_used.add(options.strategy)
            echo(f"{path}: strategy {options.strategy}" + (f" ({res.fallback})" if res.fallback else ""))
            for line in plan.summary_lines():
                echo(f"  {line}")
    if dry_run:
        return {"paths": [p for p, _, _, _ in todo], "base": base}
    writer = group is None or group.rank == 0  # the one process that writes to git
    tree = ""
    with group.step("merging plain files") if group is not None else nullcontext():
        if writer:
            tree = _merge_plain_files(repo, head, branches, commits)
    remote = None
    if not shared:
        from gittheta_merge.storage.transfer import default_remote

        remote = default_remote(repo)
    # the merged objects stay locked against gc until the merge commit refers to them
    with store.guard.session():
        # 2. models: the N-way merge, staged into a temporary index on top of that tree
        block = configured_block_bytes(repo)
        reports: dict[str, Any] = {}
        index = repo.git_dir / "theta" / "merge-index"
        index.parent.mkdir(parents=True, exist_ok=True)
        env_index = {"GIT_INDEX_FILE": str(index)}
        try:
            if writer:
                repo.git("read-tree", tree, env=env_index)
            for path, sides, bmeta, settings in todo:
                metas, side_labels, side_names = _pick(per_rev, path, labels, names, sides)
                part = None
                if group is not None:
                    from gittheta_merge.merge.distributed import Part

                    part = Part(group, shared, repo, remote)  # each rank: its own progress lines
                with part.peer_failures() if part is not None else nullcontext():
                    merged, report = merge_tracked(metas, bmeta, store, settings, path, side_labels, side_names,
                                                   block_bytes=block, resolved=resolved[path], part=part)
                reports[path] = report
                if not writer:
                    continue
                blob = repo.git("hash-object", "-w", "--no-filters", "--stdin",
                                input=merged.to_bytes()).decode().strip()
                repo.git("update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env_index)
                _write_report(repo, path, report)
                echo(f"{path}: {summary_text(report)}")
                if part is not None:
                    from gittheta_merge.merge.distributed import rank_summary

                    echo(f"  {rank_summary(report)}")
            final_tree = repo.git("write-tree", env=env_index).decode().strip() if writer else ""
        finally:
            if writer:
                index.unlink(missing_ok=True)
        if not writer:  # wait for rank 0's merge commit, and fail with it
            group.agree(None, "the merge commit")
            return {"paths": list(reports), "base": base, "commit": None}
        with group.step("the merge commit") if group is not None else nullcontext():
            commit = _commit(repo, final_tree, head, commits, revs, branches, explicit, strategies_used, message,
                             advance)
    return {"paths": list(reports), "base": base, "commit": commit, "reports": reports}


def _commit(repo: Repo, tree: str, head: str, commits: list[str], revs: list[str], branches: list[str],
            explicit: ExplicitModels | None, strategies_used: set[str], message: str | None,
            advance: bool = True) -> str:
    """The merge commit of `tree`, and HEAD fast-forwarded to it (one atomic step for the user) if `advance`."""
    what = ", ".join(sorted(strategies_used)) or "none"
    msg = message or f"Merge {', '.join(branches)} (git theta merge, strategy {what})"
    parent_revs = [head, *commits] if explicit is not None else revs
    parents = [arg for c in parent_revs for arg in ("-p", c)]
    commit = repo.git("commit-tree", tree, *parents, input=msg.encode()).decode().strip()
    if not advance:
        return commit
    # 3. one atomic step for the user: fast-forward HEAD to the merge commit (updates the working tree)
    if repo.git("rev-parse", "HEAD").decode().strip() != head:
        raise UsageError("HEAD moved while this merge ran (another command committed on this branch), so its "
                         f"merge commit {commit[:12]} was not applied; the branch, index and work tree are as the "
                         "other command left them. Rerun git theta merge")
    repo.git("merge", "--ff-only", "-q", commit)
    return commit


def _merge_plain_files(repo: Repo, head: str, branches: list[str], commits: list[str]) -> str:
    """1. Plain files: git's own merges, one branch after another, on objects only (nothing checked out); the theta
    driver is replaced by `true` (keep ours) because the models are merged N-way afterwards. Returns the tree."""
    if repo.git("status", "--porcelain", "--untracked-files=no").strip():
        raise UsageError("you have uncommitted changes; commit or stash them before git theta merge")
    current = head
    for label, commit in zip(branches, commits):
        out = repo.git("-c", "merge.theta.driver=true", "merge-tree", "--write-tree", "--no-messages",
                       current, commit, check=False).decode().split()
        if not out or repo.git("cat-file", "-t", out[0], check=False).strip() != b"tree" or len(out) > 1:
            raise InputError(f"merging {label}: git reports conflicts in plain (non-model) files "
                             f"({', '.join(out[1:4]) or 'see git merge'}); resolve them with a normal "
                             "git merge first. Nothing was changed")
        current = repo.git("commit-tree", out[0], "-p", current, "-p", commit,
                           input=b"git theta merge (intermediate)").decode().strip()
    return repo.git("rev-parse", f"{current}^{{tree}}").decode().strip()


def changed_sides(metas: list[Any], bmeta: Any) -> list[int]:
    """Indices of the sides whose weights differ from the merge base's: a side that left the file as it was in
    the base (typically HEAD = the base model when merging fine-tuned branches into main) has no opinion, as
    in git's own merges, and would otherwise count as one more model (e.g. in a plain average). All sides
    when there is no base or nothing changed."""
    if bmeta is None:
        return list(range(len(metas)))
    digest = bmeta.weights_digest()
    changed = [i for i, m in enumerate(metas) if m.weights_digest() != digest]
    return changed or list(range(len(metas)))


def _pick(per_rev: list[dict[str, Any]], path: str, labels: list[str], names: list[str],
          sides: list[int]) -> tuple[list[Any], list[str], list[str]]:
    return [per_rev[i][path] for i in sides], [labels[i] for i in sides], [names[i] for i in sides]


def _pick_stats(access: Any, sides: list[int]) -> Any:
    """Explicit --stats files are given one per side (HEAD first); keep those of the sides that are merged."""
    if access is None:
        return None
    from gittheta_merge.merge.strategies.base import StatsAccess

    return StatsAccess({kind: [srcs[i] for i in sides] for kind, srcs in access.sources.items()})


