"""Direct materialization (storage/materialize.py): above theta.materializeBytes git checks out a placeholder and
our hooks write the real file from the object store. Here the threshold is 1,000 bytes so small models take that
path through every git command that writes the work tree."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import git, pause_env, sha, store_objects
from safetensors.torch import save_file

from gittheta_merge.storage.metadata import is_metadata


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(128, 64, generator=g) for i in range(6)}


def _is_placeholder(path: Path) -> bool:
    return is_metadata(path.read_bytes()[:64])


@pytest.fixture
def mrepo(repo: Path) -> Path:
    git(repo, "config", "theta.materializeBytes", "1000")
    git(repo, "config", "theta.blockBytes", str(16 << 10))
    git(repo, "theta", "track", "model.safetensors")
    save_file(_state(0), repo / "model.safetensors")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "v1")
    return repo


def _commit(repo: Path, seed: int, msg: str) -> str:
    save_file(_state(seed), repo / "model.safetensors")
    git(repo, "commit", "-qam", msg)
    return sha(repo / "model.safetensors")


def _clean(repo: Path) -> None:
    assert git(repo, "status", "--porcelain").stdout == b""
    assert git(repo, "diff", "--stat").stdout == b""


def test_git_commands_that_write_the_work_tree(mrepo: Path) -> None:
    repo = mrepo
    v1 = sha(repo / "model.safetensors")
    v2 = _commit(repo, 1, "v2")
    git(repo, "checkout", "-q", "HEAD~1")  # post-checkout
    assert sha(repo / "model.safetensors") == v1
    _clean(repo)
    git(repo, "switch", "-q", "main")
    assert sha(repo / "model.safetensors") == v2
    _clean(repo)
    git(repo, "restore", "--source", "HEAD~1", "model.safetensors")  # post-checkout runs for restore too? no:
    if _is_placeholder(repo / "model.safetensors"):  # restore runs no hook: the placeholder stays, listed
        assert b"placeholder: model.safetensors" in git(repo, "theta", "status").stdout
        git(repo, "theta", "checkout")
    assert sha(repo / "model.safetensors") == v1
    git(repo, "checkout", "-q", "--", "model.safetensors")
    git(repo, "theta", "checkout")
    assert sha(repo / "model.safetensors") == v2
    _clean(repo)

    git(repo, "branch", "side", "HEAD~1")
    git(repo, "switch", "-q", "side")
    v3 = _commit(repo, 3, "side")
    git(repo, "switch", "-q", "main")
    git(repo, "rebase", "-q", "side", check=False)  # both changed the model: a conflict git's driver resolves
    git(repo, "rebase", "--abort", check=False)
    git(repo, "reset", "-q", "--hard", "side")  # no hook at all: a placeholder, listed and written on demand
    assert _is_placeholder(repo / "model.safetensors")
    assert b"placeholder: model.safetensors" in git(repo, "theta", "status").stdout
    _clean(repo)  # a placeholder is as good as the model for git: cleaning it gives the same metadata
    git(repo, "theta", "checkout", "model.safetensors")
    assert sha(repo / "model.safetensors") == v3
    _clean(repo)

    git(repo, "switch", "-q", "main")
    git(repo, "cherry-pick", "--strategy-option=theirs", "side", check=False)  # post-rewrite / post-checkout
    git(repo, "cherry-pick", "--abort", check=False)
    git(repo, "merge", "-q", "--no-edit", "side")  # the merge driver averages; post-merge writes the result
    assert not _is_placeholder(repo / "model.safetensors")
    _clean(repo)
    assert "0 corrupt, 0 missing" in git(repo, "theta", "fsck").stdout.decode()


def test_stash_and_a_committed_placeholder_keep_the_model(mrepo: Path) -> None:
    repo = mrepo
    v1 = sha(repo / "model.safetensors")
    save_file(_state(7), repo / "model.safetensors")
    git(repo, "stash", "-q")
    if _is_placeholder(repo / "model.safetensors"):
        git(repo, "theta", "checkout")
    assert sha(repo / "model.safetensors") == v1
    git(repo, "stash", "pop", "-q")
    git(repo, "theta", "checkout")
    edited = sha(repo / "model.safetensors")
    git(repo, "commit", "-qam", "edited")
    git(repo, "reset", "-q", "--hard", "HEAD")  # leaves the model as it is (unchanged) or a placeholder
    (repo / "notes.txt").write_text("hello\n")
    git(repo, "add", "notes.txt")
    blob = git(repo, "rev-parse", "HEAD:model.safetensors").stdout
    git(repo, "commit", "-qam", "notes, with whatever the model file is now")
    assert git(repo, "rev-parse", "HEAD:model.safetensors").stdout == blob  # never a text file in its place
    git(repo, "theta", "checkout")
    assert sha(repo / "model.safetensors") == edited


def test_status_after_materialization_does_not_restore_or_rehash(mrepo: Path) -> None:
    repo = mrepo
    _commit(repo, 1, "v2")
    git(repo, "checkout", "-q", "HEAD~1")
    objects = store_objects(repo)
    # the model's index entry (stat data and oid): the rest of the index may change under git's own racy-git rule
    # (an entry written in the index file's second, here .gitattributes, is stored with size 0 until re-checked)
    entry = git(repo, "ls-files", "--debug", "model.safetensors").stdout
    git(repo, "add", "-A")
    _clean(repo)
    assert store_objects(repo) == objects and git(repo, "ls-files", "--debug", "model.safetensors").stdout == entry
    # the record lost or corrupt: one real clean, the same answer
    (repo / ".git" / "theta" / "materialized.json").write_text("{not json")
    os.utime(repo / "model.safetensors")  # git must look at the file again
    _clean(repo)
    assert store_objects(repo) == objects


def test_a_file_changed_behind_our_back_is_detected(mrepo: Path) -> None:
    repo = mrepo
    _commit(repo, 1, "v2")
    git(repo, "checkout", "-q", "HEAD~1")
    model = repo / "model.safetensors"
    before = store_objects(repo)
    st = model.stat()
    data = bytearray(model.read_bytes())
    data[-5] ^= 0xFF  # same size
    with open(model, "r+b") as fh:  # in place: same inode
        fh.write(bytes(data))
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime: only the ctime tells
    assert model.stat().st_size == st.st_size and model.stat().st_mtime_ns == st.st_mtime_ns
    assert git(repo, "status", "--porcelain").stdout.strip() == b"M model.safetensors"  # cleaned for real
    git(repo, "add", "model.safetensors")
    assert len(store_objects(repo) - before) == 1  # the one changed block


def test_killed_materialization_leaves_the_placeholder(mrepo: Path, tmp_path: Path) -> None:
    repo = mrepo
    v2 = _commit(repo, 1, "v2")
    git(repo, "reset", "-q", "--hard", "HEAD~1")  # placeholder of v1
    git(repo, "reset", "-q", "--hard", "main@{1}")  # placeholder of v2
    assert _is_placeholder(repo / "model.safetensors")
    pidfile = tmp_path / "pid"
    proc = subprocess.Popen(["git", "theta", "checkout"], cwd=repo, env=pause_env("object-opened", pidfile, 3),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not pidfile.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert _is_placeholder(repo / "model.safetensors")  # never a half-written model under the real name
    git(repo, "theta", "checkout")  # the rerun writes it, and clears the dead run's temporary file
    assert sha(repo / "model.safetensors") == v2
    assert not list(repo.glob(".theta-materialize-*"))
    _clean(repo)


def test_hooks_chain_to_what_was_there(repo: Path) -> None:
    hooks = repo / ".git" / "hooks"
    marker = repo / ".git" / "custom-ran"
    for name in ("post-checkout", "post-merge"):
        (hooks / name).unlink(missing_ok=True)
    (hooks / "post-checkout").write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\n")
    (hooks / "post-checkout").chmod(0o755)
    git(repo, "theta", "install")
    assert (hooks / "post-checkout.local").exists() and "git-theta hook" in (hooks / "post-checkout").read_text()
    git(repo, "commit", "-qm", "x", "--allow-empty")
    git(repo, "checkout", "-qb", "other")
    assert marker.read_text().strip().endswith(" 1")  # the user's hook ran, with git's arguments
    git(repo, "theta", "install")  # idempotent: nothing saved twice
    assert "git-theta hook" in (hooks / "post-checkout").read_text()


@pytest.mark.skipif(__import__("shutil").which("git-lfs") is None, reason="git-lfs not installed")
def test_with_git_lfs_hooks_both_tools_check_out(repo: Path) -> None:
    """git-lfs installed in the same repository (its post-checkout/post-merge hooks): ours replace them and call
    `git lfs <hook>` themselves; a plain git-lfs file and a materialized model both check out exactly."""
    git(repo, "lfs", "install", "--local", "--force")
    git(repo, "theta", "install")
    hooks = repo / ".git" / "hooks"
    for name in ("post-checkout", "post-merge", "pre-push"):
        assert "git-theta" in (hooks / name).read_text(), name
    git(repo, "config", "theta.materializeBytes", "1000")
    git(repo, "lfs", "track", "*.bin")
    git(repo, "theta", "track", "model.safetensors")
    (repo / "data.bin").write_bytes(b"v1" * 5000)
    save_file(_state(0), repo / "model.safetensors")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "v1")
    v1 = sha(repo / "model.safetensors")
    (repo / "data.bin").write_bytes(b"v2" * 5000)
    save_file(_state(1), repo / "model.safetensors")
    git(repo, "commit", "-qam", "v2")
    proc = git(repo, "checkout", "-q", "HEAD~1")
    assert b"error" not in proc.stderr.lower(), proc.stderr
    assert (repo / "data.bin").read_bytes() == b"v1" * 5000 and sha(repo / "model.safetensors") == v1
    _clean(repo)


def test_every_git_theta_command_writes_placeholders_first(mrepo: Path) -> None:
    """After a hook-less `git reset --hard`, the next git theta command (here `ls`) writes the model first."""
    repo = mrepo
    v2 = _commit(repo, 1, "v2")
    git(repo, "reset", "-q", "--hard", "HEAD~1")
    git(repo, "reset", "-q", "--hard", "main@{1}")
    assert _is_placeholder(repo / "model.safetensors")
    git(repo, "theta", "status")  # listing them leaves them
    assert _is_placeholder(repo / "model.safetensors")
    proc = git(repo, "theta", "ls")
    assert b"wrote model.safetensors" in proc.stderr
    assert sha(repo / "model.safetensors") == v2
    _clean(repo)


def test_statistics_staged_after_a_checkout_stay_attached(mrepo: Path, tmp_path: Path) -> None:
    """The clean shortcut answers with the metadata recorded at checkout; statistics staged since then are carried
    over as by a real clean (found in review)."""
    repo = mrepo
    _commit(repo, 1, "v2")
    git(repo, "checkout", "-q", "HEAD~1")
    fisher = tmp_path / "fisher.safetensors"
    save_file({k: v.abs() for k, v in _state(0).items()}, fisher)
    git(repo, "theta", "stats", "add", str(fisher), "model.safetensors", "--kind", "fisher")
    os.utime(repo / "model.safetensors")  # git looks at the file again: clean runs (the shortcut)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "stats")
    assert b"fisher" in git(repo, "theta", "stats", "ls", "model.safetensors").stdout
    assert ".theta-materialize-*" in (repo / ".git" / "info" / "exclude").read_text()


def test_an_edit_in_the_second_the_file_was_written_is_still_seen(mrepo: Path) -> None:
    """The edit lands after the file is written but before git's index gets its stat, in the same second and with
    the same size and mtime: the index must not record the edited file as the one we wrote."""
    from gittheta_merge.storage import materialize as mat
    from gittheta_merge.storage.gitutil import Repo

    repo = mrepo
    _commit(repo, 1, "v2")
    git(repo, "-c", "core.hooksPath=/dev/null", "checkout", "-q", "HEAD~1")  # leaves the placeholder
    assert _is_placeholder(repo / "model.safetensors")
    r = Repo.discover(repo)
    blob = git(repo, "rev-parse", ":model.safetensors").stdout.decode().strip()
    done = mat.materialize(r, refresh=False)
    assert done == ["model.safetensors"]
    model = repo / "model.safetensors"
    st = model.stat()
    data = bytearray(model.read_bytes())
    data[-3] ^= 0xFF
    with open(model, "r+b") as fh:
        fh.write(bytes(data))
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    mat.settle_index(r, [("model.safetensors", blob, mat.load_records(r)["model.safetensors"].blob)])
    assert git(repo, "status", "--porcelain").stdout.strip() == b"M model.safetensors"


def test_rewriting_the_index_keeps_git_checking_racily_clean_files(tmp_path: Path) -> None:
    """Another file added and edited (same size) in the second the index was last written looks clean to git only
    by stat; git's next index write smudges such entries so their content is compared. Ours must do the same."""
    from gittheta_merge.storage.gitindex import record_stat
    from gittheta_merge.storage.gitutil import Repo

    repo = tmp_path / "r"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "x.txt").write_text("aaaa")
    (repo / "a.bin").write_bytes(b"A" * 100)
    git(repo, "add", "-A")
    git(repo, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "one")
    time.sleep(1.1)
    time.sleep(int(time.time()) + 1.05 - time.time())  # the start of a second
    (repo / "x.txt").write_text("aaaa")
    git(repo, "update-index", "-q", "--refresh")  # the index is written in this second, x.txt's entry with it
    (repo / "x.txt").write_text("bbbb")  # same second, same size: git must still look at its content
    st = os.stat(repo / "a.bin")
    time.sleep(1.05)
    blob = git(repo, "rev-parse", ":a.bin").stdout.decode().strip()
    assert record_stat(Repo.discover(repo), {"a.bin": (blob, st)}) == {"a.bin"}
    assert git(repo, "status", "--porcelain", "-uno").stdout.decode().strip() == "M x.txt"


def test_a_corrupt_object_stops_the_write_and_keeps_the_placeholder(repo: Path) -> None:
    """Blocks of 256 KiB and more are copied by the kernel and hashed beside the copy: a block flipped by one bit
    on disk (same size) is still caught, the temporary file is deleted, the path keeps its placeholder and the
    error names the object; once the object is good again, `git theta checkout` writes the model."""
    git(repo, "config", "theta.materializeBytes", "1000")
    git(repo, "theta", "track", "model.safetensors")
    big = {f"w{i}": torch.randn(512, 256, generator=torch.Generator().manual_seed(i)) for i in range(3)}
    save_file(big, repo / "model.safetensors")
    v1 = sha(repo / "model.safetensors")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "v1")
    before = store_objects(repo)
    save_file({k: v + 1 for k, v in big.items()}, repo / "model.safetensors")
    git(repo, "commit", "-qam", "v2")
    victim = next(p for p in (repo / ".git" / "lfs" / "objects").rglob("*")
                  if p.name in before and p.stat().st_size >= 256 << 10)
    good = victim.read_bytes()
    victim.chmod(0o644)
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 1
    victim.write_bytes(bytes(bad))

    out = git(repo, "checkout", "-q", "HEAD~1", check=False)
    assert victim.name[:12] in out.stderr.decode(), out.stderr
    assert _is_placeholder(repo / "model.safetensors")
    assert not list(repo.glob(".theta-materialize-*"))
    victim.write_bytes(good)
    git(repo, "theta", "checkout")
    assert sha(repo / "model.safetensors") == v1
    _clean(repo)


def test_the_filter_installs_hooks_only_into_the_repositorys_own_folder(mrepo: Path) -> None:
    """The filter process re-installs missing hooks, but a core.hooksPath outside .git (a committed .githooks/, or
    one given with `git -c` for a single command) belongs to the user: nothing is written there, and the model
    stays a placeholder that `git theta checkout` writes. `git theta install` itself does install there."""
    repo = mrepo
    own = repo / ".githooks"
    own.mkdir()
    (own / "pre-commit").write_text("#!/bin/sh\nexit 0\n")
    git(repo, "add", ".githooks")
    git(repo, "commit", "-qm", "the team's hooks")
    _commit(repo, 1, "v2")
    git(repo, "config", "core.hooksPath", ".githooks")
    git(repo, "checkout", "-q", "HEAD~1")
    assert sorted(p.name for p in own.iterdir()) == ["pre-commit"]
    assert _is_placeholder(repo / "model.safetensors")
    transient = repo.parent / "transient-hooks"
    git(repo, "-c", f"core.hooksPath={transient}", "checkout", "-q", "main")
    assert not transient.exists()
    git(repo, "theta", "checkout")
    assert not _is_placeholder(repo / "model.safetensors")
    _clean(repo)
    git(repo, "theta", "install")
    assert (own / "post-checkout").exists() and (own / "pre-commit").exists()
