"""`git theta install` (filter driver in git config) and `git theta track` (.gitattributes lines)."""

from __future__ import annotations

import glob as globmod
import os
import shutil
import sys
from pathlib import Path

from gittheta_merge.errors import StorageError, ThetaError, UsageError
from gittheta_merge.storage.gitutil import Repo, iter_index_blobs, iter_tree_blobs, run_git

# the same text as hooks/pre-push (a test keeps them equal); embedded so wheels carry it
PRE_PUSH_HOOK = """#!/bin/sh
# gittheta-merge pre-push hook: uploads the tensor objects referenced by the commits being pushed,
# then chains to git-lfs's own pre-push (and to any hook that was here before, saved as
# pre-push.local), so plain git-lfs files and tracked models push side by side.
command -v git-theta >/dev/null 2>&1 || {
  echo >&2 "This repository stores models with gittheta-merge, but 'git-theta' is not on your path."
  echo >&2 "Install it (pip install gittheta-merge) or remove .git/hooks/pre-push."
  exit 2
}
exec git-theta pre-push "$@"
"""
# git's hooks after commands that write the work tree: they write models checked out as placeholders
# (storage/materialize.py) and chain to git-lfs's hook of the same name and to any hook that was here before
POST_HOOKS = ("post-checkout", "post-merge", "post-rewrite")
POST_HOOK = """#!/bin/sh
# gittheta-merge {name} hook: writes tracked models that git checked out as placeholders (models above
# theta.materializeBytes) straight from the object store, then chains to git-lfs's {name} hook and to any
# hook that was here before (saved as {name}.local).
if {check}; then
  exec {cmd} hook {name} "$@"
fi
echo >&2 "gittheta-merge is not installed here, so models above theta.materializeBytes stay placeholders;"
echo >&2 "install it (pip install gittheta-merge) and run git theta checkout."
local_hook="$(dirname "$0")/{name}.local"
if [ -x "$local_hook" ]; then
  exec "$local_hook" "$@"
fi
exit 0
"""
HOOK_MARKER = "# gittheta-merge {name} hook"  # how install recognises our hooks (and never saves one as .local)


def post_hook_text(name: str) -> str:
    """Our hook, calling the tool as the filter does (the console script, or this interpreter with -m)."""
    cmd = command_prefix()
    check = "command -v git-theta >/dev/null 2>&1" if cmd == "git-theta" else f"[ -x {cmd.split(' -m ')[0]} ]"
    return POST_HOOK.format(name=name, cmd=cmd, check=check)


SCOPES = {"repo": "--local", "user": "--global", "global": "--system"}
ATTRS = "filter=theta diff=theta merge=theta -text"
HF_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def command_prefix() -> str:
    """How git should call us: the console script if it is on PATH, else this interpreter."""
    if shutil.which("git-theta"):
        return "git-theta"
    return f'"{sys.executable}" -m gittheta_merge'


def install(scope: str = "repo", cwd: str | None = None) -> list[tuple[str, str]]:
    """Write the filter configuration; returns what was set."""
    if scope not in SCOPES:
        raise UsageError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    if scope == "repo":
        Repo.discover(cwd)  # clear error outside a repository
    cmd = command_prefix()
    settings = [
        ("filter.theta.process", f"{cmd} filter-process"),
        ("filter.theta.clean", f"{cmd} clean %f"),
        ("filter.theta.smudge", f"{cmd} smudge %f"),
        ("filter.theta.required", "true"),
        ("merge.theta.name", "git-theta per-tensor model merge"),
        ("merge.theta.driver", f"{cmd} merge-driver %O %A %B %P"),
    ]
    for key, value in settings:
        run_git("config", SCOPES[scope], key, value, cwd=cwd)
    try:
        repo: Repo | None = Repo.discover(cwd)
    except ThetaError:
        repo = None  # user/global scope outside a repository: hooks are installed per clone, lazily
    if repo is not None:
        install_hooks(repo)
    return settings


def hooks_dir(repo: Repo) -> Path:
    path = Path(repo.git("rev-parse", "--git-path", "hooks").decode().strip())
    return path if path.is_absolute() else repo.root / path


def install_hooks(repo: Repo) -> Path:
    """Install our hooks, chaining to whatever was there (git-lfs's hook, or a custom one).

    git-lfs's own hooks are replaced because ours run `git lfs <hook>` themselves; any other hook is kept
    as `<hook>.local` and run by ours. Called by `install` and, lazily, by the filter process so a fresh
    clone with a user-scope install gets them too. Returns the pre-push hook's path."""
    directory = hooks_dir(repo)
    directory.mkdir(parents=True, exist_ok=True)
    _install_hook(directory, "pre-push", PRE_PUSH_HOOK, "git-theta pre-push")
    for name in POST_HOOKS:
        _install_hook(directory, name, post_hook_text(name), HOOK_MARKER.format(name=name))
    _exclude_temp_files(repo)
    return directory / "pre-push"


def _install_hook(directory: Path, name: str, text: str, ours: str) -> None:
    """Write our hook; a foreign one is first linked to `<name>.local` (os.link fails if that exists, so two
    processes installing at once never save our own hook as the user's, which would then call itself)."""
    target = directory / name
    if target.exists():
        current = target.read_text(errors="replace")
        if ours in current:
            return
        commands = [ln.strip() for ln in current.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        is_lfs_hook = any(f"git lfs {name}" in c for c in commands) and len(commands) <= 3
        if not is_lfs_hook:
            saved = directory / f"{name}.local"
            try:
                os.link(target, saved)
            except FileExistsError:
                if saved.read_bytes() != target.read_bytes():
                    raise StorageError(f"{target} exists and {saved} too; merge them by hand, then rerun") from None
    tmp = directory / f"{name}.theta-tmp.{os.getpid()}"
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, target)


def _exclude_temp_files(repo: Repo) -> None:
    """A materialization killed mid-write leaves `.theta-materialize-*` beside the model until the next run: keep
    `git add -A` from committing it (.git/info/exclude, once)."""
    exclude = Path(repo.git("rev-parse", "--git-path", "info/exclude").decode().strip())
    exclude = exclude if exclude.is_absolute() else repo.root / exclude
    line = ".theta-materialize-*"
    try:
        text = exclude.read_text() if exclude.exists() else ""
        if line not in text.splitlines():
            exclude.parent.mkdir(parents=True, exist_ok=True)
            with open(exclude, "a") as fh:
                fh.write(("" if not text or text.endswith("\n") else "\n") + line + "\n")
    except OSError:
        pass  # an unwritable .git/info: the temp file is still removed by the next materialization


def run_chained_hook(repo: Repo, name: str, args: list[str], stdin_data: bytes) -> int:
    """After our part of a hook: the hook that was here before (`<name>.local`), then git-lfs's."""
    import subprocess

    local = hooks_dir(repo) / f"{name}.local"
    ours = HOOK_MARKER.format(name=name)
    if local.exists() and os.access(local, os.X_OK) and ours not in local.read_text(errors="replace"):
        rc = subprocess.run([str(local), *args], cwd=repo.root, input=stdin_data).returncode
        if rc != 0:
            return rc
    if shutil.which("git-lfs") and repo.config_get("filter.lfs.process"):
        return subprocess.run(["git", "lfs", name, *args], cwd=repo.root, input=stdin_data).returncode
    return 0


def materialise(repo: Repo) -> list[str]:
    """Check out again tracked files that are still plain metadata text (cloned before install)."""
    from gittheta_merge.storage.metadata import is_metadata

    files = [p for _, p in iter_index_blobs(repo)]
    attrs = repo.check_attr("filter", files)
    stale = []
    for path in files:
        if attrs.get(path) != "theta":
            continue
        full = repo.root / path
        try:
            with open(full, "rb") as handle:
                if is_metadata(handle.read(64)):
                    stale.append(path)
        except OSError:
            continue
    if stale:
        for path in stale:
            (repo.root / path).unlink()
        repo.git("checkout", "--", *stale)
        from gittheta_merge.storage.materialize import materialize

        materialize(repo, stale)  # models above theta.materializeBytes came back as placeholders: write them
    return stale


def is_installed(repo: Repo) -> bool:
    return bool(repo.config_get("filter.theta.process") or repo.config_get("filter.theta.clean"))


def _escape_pattern(path: str) -> str:
    """gitattributes has no quoting: spaces must be written as a character class."""
    return path.replace(" ", "[[:space:]]")


def patterns_for(repo: Repo, target: str, cwd: Path) -> list[str]:
    """gitattributes patterns (relative to the repo root) for a file, directory or glob."""
    absolute = (cwd / target).resolve() if not os.path.isabs(target) else Path(target).resolve()
    is_glob = any(ch in target for ch in "*?[")
    if not is_glob and absolute.is_dir():
        rel = absolute.relative_to(repo.root.resolve()).as_posix()
        prefix = "" if rel == "." else rel + "/"
        return [prefix + pattern for pattern in HF_WEIGHT_PATTERNS]
    if is_glob:
        base = (cwd.resolve()).relative_to(repo.root.resolve()).as_posix()
        if "/" not in target and base == ".":
            return [target]  # a bare glob matches at any depth, like git itself
        return [target if base == "." else f"{base}/{target}"]
    try:
        rel = absolute.relative_to(repo.root.resolve()).as_posix()
    except ValueError:
        raise UsageError(f"{target} is outside the repository {repo.root}") from None
    return [_escape_pattern(rel)]


def track(targets: list[str], cwd: str | None = None) -> list[str]:
    """Append tracking lines to .gitattributes; refuses when the filter is not installed."""
    repo = Repo.discover(cwd)
    if not is_installed(repo):
        raise UsageError(
            "the theta filter is not configured for this repository, so git would commit the raw "
            "checkpoint instead of per-tensor objects. Run `git theta install` first "
            "(once per clone, or `git theta install --scope user` once per machine)"
        )
    here = Path(cwd or os.getcwd())
    attributes = repo.root / ".gitattributes"
    existing = attributes.read_text().splitlines() if attributes.exists() else []
    added: list[str] = []
    for target in targets:
        for pattern in patterns_for(repo, target, here):
            line = f"{pattern} {ATTRS}"
            if line not in existing and line not in added:
                added.append(line)
    if added:
        text = "\n".join(existing + added) + "\n"
        tmp = attributes.with_suffix(".theta-tmp")
        tmp.write_text(text)
        os.replace(tmp, attributes)
    return added


def committed_raw(repo: Repo, paths: list[str]) -> list[str]:
    """Tracked paths whose committed version is a raw file (they need `git add --renormalize`)."""
    from gittheta_merge.storage.revisions import tracked_files

    if not repo.git("rev-parse", "--verify", "-q", "HEAD", check=False).strip():
        return []
    committed = [path for _, path in iter_tree_blobs(repo, "HEAD", paths)]
    as_metadata = tracked_files(repo, "HEAD", paths)
    return [path for path in committed if path not in as_metadata]


def expand(repo: Repo, targets: list[str], cwd: Path) -> list[str]:
    """Existing files matched by the targets (for hints after tracking)."""
    found: list[str] = []
    for target in targets:
        for match in globmod.glob(str(cwd / target), recursive=True):
            path = Path(match)
            files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
            for f in files:
                found.append(f.resolve().relative_to(repo.root.resolve()).as_posix())
    return found
