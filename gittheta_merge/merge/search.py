"""`git theta merge A B C --strategy S --search "density=0.1:0.9,lambda=0.5:2" --eval "python eval.py"`: choose a
strategy's parameters by scoring candidate merges with the user's own evaluation, and commit the best.

The Fisher-merging paper tuned its coefficients by a search on validation data; mergekit-evolve made that a tool.
Here it is git-native:
- every candidate is a real N-way merge commit (merge/octopus.py with HEAD left alone), kept under
  refs/theta/search/<key>/<trial> while the search runs, so its objects are safe from gc and an unchanged tensor is
  stored once for all candidates (the store is content-addressed);
- the user's command runs in the candidate's work tree (a temporary `git worktree`) and prints one number, or JSON
  with the metric named by --metric; higher is better unless --direction minimize;
- the sampler is optuna's (grid, random or TPE), its study in .git/theta/search/<key>.db (SQLite): a search that was
  interrupted resumes where it stopped when run again (the same branches' commits, strategy, space, command and
  sampler give the same key); a trial cut off mid-way is marked failed and not counted;
- the parameters as configured (--set, settings, the strategy's defaults) are the first trial, so the table shows
  what the search gained over them; a point already scored is not merged again;
- at the end HEAD is fast-forwarded to the best candidate (one merge commit, as a plain `git theta merge`), the
  table (parameters -> score, merge and evaluation seconds, commit) goes into the merge report and
  .git/theta/search/<key>.json, and the other candidates' refs are deleted (`git theta gc` can then free them).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gittheta_merge.errors import InputError, ThetaError, UsageError
from gittheta_merge.storage.gitutil import Repo

GRID_POINTS = 5  # points per range in a grid search unless the range says how many (lo:hi:n)


@dataclass
class Dimension:
    """One searched parameter: a range (float, or int for integer parameters) or a list of choices."""

    name: str
    low: float | None = None
    high: float | None = None
    points: int = GRID_POINTS
    choices: tuple[str, ...] = ()
    integer: bool = False

    def distribution(self) -> Any:
        import optuna

        if self.choices:
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.integer:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high))  # type: ignore[arg-type]
        return optuna.distributions.FloatDistribution(self.low, self.high)  # type: ignore[arg-type]

    def grid(self) -> list[Any]:
        if self.choices:
            return list(self.choices)
        assert self.low is not None and self.high is not None
        if self.points == 1:
            return [int(self.low) if self.integer else self.low]
        values = [self.low + (self.high - self.low) * i / (self.points - 1) for i in range(self.points)]
        return sorted({int(round(v)) for v in values}) if self.integer else [round(v, 10) for v in values]

    def contains(self, value: Any) -> bool:
        if self.choices:
            return str(value) in self.choices
        try:
            return self.low <= float(value) <= self.high  # type: ignore[operator]
        except (TypeError, ValueError):
            return False


def parse_space(text: str, strategy: str) -> list[Dimension]:
    """`density=0.1:0.9,lambda=0.5:2.0:4,normalize=true|false`: ranges lo:hi (lo:hi:n = n grid points) and choices
    a|b|c, checked against the strategy's parameters before anything runs."""
    from gittheta_merge.merge import strategies

    spec = strategies.get(strategy).params_spec
    dims: list[Dimension] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not value:
            raise UsageError(f"--search {item!r}: write NAME=LOW:HIGH, NAME=LOW:HIGH:POINTS or NAME=A|B|C")
        if name not in spec:
            raise UsageError(f"--search: strategy {strategy} has no parameter {name!r} "
                             f"(it has: {', '.join(sorted(spec)) or 'none'})")
        if any(d.name == name for d in dims):
            raise UsageError(f"--search: {name} is given twice")
        param = spec[name]
        if "|" in value:
            choices = tuple(v.strip() for v in value.split("|"))
            for choice in choices:  # each must be a value the strategy accepts
                strategies.get(strategy)({name: choice})
            dims.append(Dimension(name, choices=choices))
            continue
        parts = value.split(":")
        if len(parts) not in (2, 3) or param.kind not in ("float", "int", "floats"):
            raise UsageError(f"--search {item!r}: a range LOW:HIGH[:POINTS] needs a numeric parameter "
                             f"({name} is {param.kind}; give choices A|B instead)")
        try:
            low, high = float(parts[0]), float(parts[1])
            points = int(parts[2]) if len(parts) == 3 else GRID_POINTS
        except ValueError:
            raise UsageError(f"--search {item!r}: LOW, HIGH must be numbers and POINTS an integer") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high and points >= 1):
            raise UsageError(f"--search {item!r}: need finite LOW < HIGH and POINTS >= 1")
        integer = param.kind == "int"
        if integer and not (low.is_integer() and high.is_integer()):
            raise UsageError(f"--search {item!r}: {name} takes whole numbers")
        dims.append(Dimension(name, low, high, points, integer=integer))
        for end in (low, high):  # a range outside what the strategy accepts fails now, not at trial 7
            strategies.get(strategy)({name: str(int(end)) if integer else str(end)})
    if not dims:
        raise UsageError("--search names no parameter")
    return dims


def parse_score(stdout: str, metric: str | None, command: str) -> float:
    """The score an evaluation printed: its last non-empty line, a number or a JSON object (with --metric NAME, or
    its only numeric field)."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise InputError(f"--eval {command!r} printed nothing; it must print a number (or JSON with --metric)")
    last = lines[-1]
    try:
        value: Any = json.loads(last)
    except json.JSONDecodeError:
        raise InputError(f"--eval {command!r}: the last line {last[:80]!r} is neither a number nor JSON") from None
    if isinstance(value, dict):
        numeric = {k: v for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if metric is None:
            if len(numeric) != 1:
                raise UsageError(f"--eval printed JSON with fields {', '.join(value) or 'none'}: name the score "
                                 "with --metric NAME")
            metric = next(iter(numeric))
        if metric not in numeric:
            raise InputError(f"--eval printed JSON without a numeric {metric!r} (fields: {', '.join(value)})")
        value = numeric[metric]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"--eval {command!r}: score {last[:80]!r} is not a finite number")
    return float(value)


def evaluate(repo: Repo, commit: str, command: str, metric: str | None, trial: int, params: dict[str, Any]
             ) -> tuple[float, float]:
    """(score, seconds) of `command` run in a temporary worktree of `commit` (removed afterwards)."""
    scratch = Path(tempfile.mkdtemp(prefix="theta-search-", dir=repo.common_dir / "theta"))
    tree = scratch / "candidate"
    started = time.monotonic()
    try:
        repo.git("worktree", "add", "--detach", "-q", str(tree), commit)
        env = {**os.environ, "THETA_SEARCH_TRIAL": str(trial), "THETA_SEARCH_PARAMS": json.dumps(params)}
        proc = subprocess.run(command, shell=True, cwd=tree, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise InputError(f"--eval {command!r} failed on trial {trial} (exit {proc.returncode}): "
                             + (proc.stderr.strip().splitlines() or ["no message"])[-1][:300])
        return parse_score(proc.stdout, metric, command), time.monotonic() - started
    finally:
        repo.git("worktree", "remove", "--force", str(tree), check=False)
        shutil.rmtree(scratch, ignore_errors=True)
        repo.git("worktree", "prune", check=False)


def search_key(repo: Repo, branches: list[str], cli: dict[str, Any], space: str, command: str, sampler: str,
               seed: int, metric: str | None, direction: str) -> str:
    """What makes two runs the same search (so the second resumes the first): the commits, the settings, the space,
    the evaluation and the sampler."""
    commits = [repo.git("rev-parse", f"{b}^{{commit}}").decode().strip() for b in ["HEAD", *branches]]
    rules = [str(r) for r in cli.get("rules") or []]
    text = json.dumps([commits, cli.get("strategy"), cli.get("params") or {}, rules, space, command,
                       sampler, seed, metric, direction], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_search(repo: Repo, branches: list[str], cli: dict[str, Any], stats: Any, message: str | None, echo: Any,
               explicit: Any, space_text: str, command: str, trials: int | None, sampler_name: str, seed: int,
               metric: str | None, direction: str) -> dict[str, Any]:
    """The search (module docstring); returns the table and the committed best trial."""
    try:
        import optuna
    except ImportError:
        raise UsageError("--search needs optuna: pip install 'gittheta-merge[search]'") from None
    from gittheta_merge.merge import strategies
    from gittheta_merge.merge.commands import _write_report
    from gittheta_merge.merge.octopus import octopus_merge

    strategy = cli.get("strategy")
    if not strategy:
        raise UsageError("--search needs --strategy: the parameters searched are that strategy's")
    dims = parse_space(space_text, strategy)
    searched = {d.name for d in dims}
    spec = strategies.get(strategy).params_spec
    fixed = {k: v for k, v in (cli.get("params") or {}).items() if k.replace("-", "_") not in searched}
    defaults = {d.name: (cli.get("params") or {}).get(d.name, spec[d.name].default) for d in dims}
    grid = {d.name: d.grid() for d in dims}
    if sampler_name == "grid":  # every grid point queued (optuna's GridSampler stops studies only inside optimize)
        sampler: Any = optuna.samplers.RandomSampler(seed=seed)
        trials = min(trials or math.prod(len(v) for v in grid.values()), math.prod(len(v) for v in grid.values()))
    elif sampler_name == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed)
    trials = trials or 20
    if repo.git("status", "--porcelain", "--untracked-files=no").strip():
        raise UsageError("you have uncommitted changes; commit or stash them before git theta merge --search")
    key = search_key(repo, branches, cli, space_text, command, sampler_name, seed, metric, direction)
    folder = repo.common_dir / "theta" / "search"
    folder.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{folder / key}.db", study_name=key, sampler=sampler,
                                direction="maximize" if direction == "maximize" else "minimize", load_if_exists=True)
    State = optuna.trial.TrialState
    if study.get_trials(deepcopy=False):  # a resumed search draws new points, not the first run's sequence again
        study.sampler = type(sampler)(seed=seed + len(study.get_trials(deepcopy=False)))
    for stale in study.get_trials(deepcopy=False, states=(State.RUNNING,)):
        study.tell(stale.number, state=State.FAIL)  # cut off by an interruption: not counted
    done = study.get_trials(deepcopy=False, states=(State.COMPLETE,))
    if done:
        echo(f"resuming search {key}: {len(done)} of {trials} trials already scored")
    elif sampler_name != "grid" and all(d.contains(defaults[d.name]) for d in dims):
        study.enqueue_trial({d.name: _typed(d, defaults[d.name]) for d in dims}, user_attrs={"default": True})
    if sampler_name == "grid":  # the points neither scored nor queued (a failed trial's point is queued again)
        have = {_point(t.params) for t in study.get_trials(deepcopy=False, states=(State.COMPLETE, State.WAITING))}
        for values in itertools.product(*grid.values()):
            point = dict(zip(grid, values))
            if _point(point) not in have:
                study.enqueue_trial(point, user_attrs={"default": all(defaults[k] == v for k, v in point.items())})
    distributions = {d.name: d.distribution() for d in dims}
    echo(f"search {key}: {strategy} over {', '.join(d.name for d in dims)}, {sampler_name} sampler, {trials} trials; "
         f"scored by `{command}` ({direction})")
    head = repo.git("rev-parse", "HEAD").decode().strip()
    while len(scored := study.get_trials(deepcopy=False, states=(State.COMPLETE,))) < trials:
        trial = study.ask(distributions)
        params = dict(trial.params)
        same = next((t for t in scored if t.params == params and "commit" in t.user_attrs), None)
        if same is not None:  # e.g. TPE proposing a point again: the candidate exists and was scored
            for k, v in same.user_attrs.items():
                trial.set_user_attr(k, v)
            trial.set_user_attr("same_as_trial", same.number)
            study.tell(trial, same.value)
            echo(f"trial {trial.number}: {_fmt(params)} -> {same.value:.6g} (as trial {same.number})")
            continue
        started = time.monotonic()
        label = f"search trial {trial.number}: {_fmt(params)}"
        try:
            result = octopus_merge(repo, branches, {**cli, "params": {**fixed, **params}}, stats, False,
                                   (message or f"Merge {', '.join(branches)} (git theta merge, strategy {strategy})")
                                   + f"\n\n{label}", lambda *a, **k: None, explicit, advance=False)
        except ThetaError:
            study.tell(trial, state=State.FAIL)
            raise
        merge_s = time.monotonic() - started
        commit = result.get("commit")
        if not commit:
            study.tell(trial, state=State.FAIL)
            raise UsageError("nothing to merge (the branches are already in HEAD or unchanged): nothing to search")
        repo.git("update-ref", f"refs/theta/search/{key}/{trial.number}", commit)
        (folder / key).mkdir(exist_ok=True)
        (folder / key / f"trial-{trial.number}.json").write_text(json.dumps(result["reports"]))
        try:
            score, eval_s = evaluate(repo, commit, command, metric, trial.number, params)
        except BaseException:
            study.tell(trial, state=State.FAIL)
            raise
        for k, v in (("commit", commit), ("merge_seconds", round(merge_s, 3)), ("eval_seconds", round(eval_s, 3))):
            trial.set_user_attr(k, v)
        study.tell(trial, score)
        echo(f"trial {trial.number}: {_fmt(params)} -> {score:.6g} (merge {merge_s:.1f} s, eval {eval_s:.1f} s)"
             + (" [the parameters as configured]" if trial.user_attrs.get("default") else ""))
    complete = study.get_trials(deepcopy=False, states=(State.COMPLETE,))
    if not complete:
        raise ThetaError("no trial was scored")
    best = study.best_trial
    table = [{"trial": t.number, "params": t.params, "score": t.value, "default": bool(t.user_attrs.get("default")),
              "merge_seconds": t.user_attrs.get("merge_seconds"), "eval_seconds": t.user_attrs.get("eval_seconds"),
              "commit": t.user_attrs.get("commit"), **({"same_as_trial": t.user_attrs["same_as_trial"]}
                                                       if "same_as_trial" in t.user_attrs else {})}
             for t in complete]
    summary = {"key": key, "strategy": strategy, "space": space_text, "fixed": fixed, "sampler": sampler_name,
               "seed": seed, "direction": direction, "metric": metric, "command": command, "trials": table,
               "best": {"trial": best.number, "params": best.params, "score": best.value,
                        "commit": best.user_attrs["commit"]}}
    (folder / f"{key}.json").write_text(json.dumps(summary, indent=1))
    for line in table_lines(table, direction):
        echo(line)
    if repo.git("rev-parse", "HEAD").decode().strip() != head:
        raise UsageError(f"HEAD moved while the search ran, so its best candidate {best.user_attrs['commit'][:12]} "
                         f"was not applied; it stays at refs/theta/search/{key}/{best.number}")
    repo.git("merge", "--ff-only", "-q", best.user_attrs["commit"])
    reports_file = folder / key / f"trial-{best.user_attrs.get('same_as_trial', best.number)}.json"
    if reports_file.exists():
        for path, report in json.loads(reports_file.read_text()).items():
            _write_report(repo, path, {**report, "search": summary})
    for ref in repo.git("for-each-ref", "--format=%(refname)", f"refs/theta/search/{key}/").decode().split():
        repo.git("update-ref", "-d", ref)
    echo(f"committed trial {best.number} ({_fmt(best.params)}, score {best.value:.6g}) as the merge commit "
         f"{best.user_attrs['commit'][:12]}; the table is in .git/theta/search/{key}.json")
    return summary


def _typed(dim: Dimension, value: Any) -> Any:
    if dim.choices:
        return str(value)
    return int(value) if dim.integer else float(value)


def _point(params: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


def _fmt(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def table_lines(table: list[dict[str, Any]], direction: str) -> list[str]:
    """The results table, best first."""
    rows = sorted(table, key=lambda r: -r["score"] if direction == "maximize" else r["score"])
    out = ["trial  score       merge s  eval s  parameters"]
    for r in rows:
        note = " (as configured)" if r["default"] else ""
        out.append(f"{r['trial']:>5}  {r['score']:<10.6g}  {r['merge_seconds'] or 0:>7.1f}  "
                   f"{r['eval_seconds'] or 0:>6.1f}  {_fmt(r['params'])}{note}")
    return out
