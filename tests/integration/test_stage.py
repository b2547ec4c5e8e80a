"""`git theta add` (storage/stage.py): tracked models staged by reading the file ourselves, not piped through git.

The proof that git never streams the model through the filter: the command (and `git status` after it) run with the
theta filter replaced by one that fails (`false`, required), so any clean git attempted would be an error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import git, random_state, store_objects
from safetensors.torch import save_file

from gittheta_merge.errors import InputError

BROKEN_FILTER = {"GIT_CONFIG_COUNT": "2", "GIT_CONFIG_KEY_0": "filter.theta.process", "GIT_CONFIG_VALUE_0": "false",
                 "GIT_CONFIG_KEY_1": "filter.theta.clean", "GIT_CONFIG_VALUE_1": "false"}


def _staged_blob(repo: Path, path: str) -> str:
    return git(repo, "ls-files", "-s", "--", path).stdout.split()[1].decode()


def _blob_by_git_add(repo: Path, path: str) -> str:
    """What plain `git add` stores for the same file (the reference), leaving the index as it was."""
    index = repo / ".git" / "index"
    saved = index.read_bytes()
    try:
        git(repo, "rm", "-q", "--cached", "--", path)
        git(repo, "add", "--", path)
        return _staged_blob(repo, path)
    finally:
        index.write_bytes(saved)


def _status_without_filter(repo: Path) -> bytes:
    return git(repo, "status", "--porcelain", env=BROKEN_FILTER).stdout


@pytest.fixture
def trepo(repo: Path) -> Path:
    git(repo, "config", "theta.blockBytes", str(16 << 10))
    git(repo, "theta", "track", "model.safetensors", "sub/*.safetensors")
    git(repo, "add", ".gitattributes")
    git(repo, "commit", "-qm", "track")
    return repo


def test_first_add_and_re_add_stage_what_git_add_stages(trepo: Path) -> None:
    repo = trepo
    state = random_state(n=8, shape=(128, 64))
    save_file(state, repo / "model.safetensors")
    (repo / "notes.txt").write_text("fine-tune notes\n")
    git(repo, "theta", "add", ".", env=BROKEN_FILTER)  # would fail if git cleaned the model itself
    assert git(repo, "diff", "--cached", "--name-only").stdout.split() == [b"model.safetensors", b"notes.txt"]
    assert _staged_blob(repo, "model.safetensors") == _blob_by_git_add(repo, "model.safetensors")
    assert _status_without_filter(repo) == b"A  model.safetensors\nA  notes.txt\n"
    debug = git(repo, "ls-files", "--debug", "model.safetensors").stdout.decode()
    assert f"size: {(repo / 'model.safetensors').stat().st_size}\t" in debug  # the file's stat, not a placeholder's
    git(repo, "commit", "-qm", "v1")

    before = store_objects(repo)
    state["layer2.weight"] += 1
    state["layer5.weight"] *= 2
    save_file(state, repo / "model.safetensors")
    os.remove(repo / "notes.txt")
    git(repo, "theta", "add", ".", env=BROKEN_FILTER)
    new = store_objects(repo) - before
    rows_per_block = (16 << 10) // (64 * 4)
    assert len(new) == 2 * (128 // rows_per_block)  # only the two changed tensors' blocks were stored
    assert _staged_blob(repo, "model.safetensors") == _blob_by_git_add(repo, "model.safetensors")
    assert _status_without_filter(repo) == b"M  model.safetensors\nD  notes.txt\n"
    git(repo, "commit", "-qm", "v2")
    ls = git(repo, "theta", "diff", "HEAD~1", "HEAD").stdout.decode()
    assert "2 of 8 tensors changed" in ls

    # the commit round-trips byte for byte through a fresh checkout
    expected = (repo / "model.safetensors").read_bytes()
    os.remove(repo / "model.safetensors")
    git(repo, "checkout", "--", "model.safetensors")
    assert (repo / "model.safetensors").read_bytes() == expected


def test_pathspecs_from_a_subdirectory_and_unchanged_files(trepo: Path) -> None:
    repo = trepo
    (repo / "sub").mkdir()
    save_file(random_state(seed=1), repo / "sub" / "a.safetensors")
    save_file(random_state(seed=2), repo / "sub" / "b.safetensors")
    save_file(random_state(seed=3), repo / "model.safetensors")
    out = git(repo / "sub", "theta", "add", "a.safetensors", ".", env=BROKEN_FILTER)
    assert b"staged sub/a.safetensors" in out.stderr and b"staged sub/b.safetensors" in out.stderr
    assert git(repo, "diff", "--cached", "--name-only").stdout.split() == [b"sub/a.safetensors", b"sub/b.safetensors"]
    assert _staged_blob(repo, "sub/a.safetensors") == _blob_by_git_add(repo, "sub/a.safetensors")
    again = git(repo / "sub", "theta", "add", ".", env=BROKEN_FILTER)  # nothing changed: nothing read
    assert b"staged" not in again.stderr


def test_a_placeholder_is_staged_as_the_metadata_it_holds(trepo: Path) -> None:
    repo = trepo
    save_file(random_state(seed=4), repo / "model.safetensors")
    git(repo, "theta", "add", "model.safetensors")
    git(repo, "commit", "-qm", "v1")
    blob = _staged_blob(repo, "model.safetensors")
    # a placeholder in the work tree (what a hook-less git command leaves above the threshold)
    (repo / "model.safetensors").write_bytes(git(repo, "cat-file", "blob", blob).stdout)
    git(repo, "config", "theta.materializeBytes", "1000")
    git(repo, "theta", "add", "model.safetensors")  # writes the placeholder first, like every git theta command
    assert _staged_blob(repo, "model.safetensors") == blob
    assert git(repo, "status", "--porcelain").stdout == b""


def test_a_file_that_changes_while_read_is_refused_and_nothing_is_staged(trepo: Path, monkeypatch) -> None:
    from gittheta_merge.filter import process
    from gittheta_merge.storage.gitutil import Repo
    from gittheta_merge.storage.stage import stage

    repo = trepo
    save_file(random_state(seed=5), repo / "model.safetensors")
    index_before = (repo / ".git" / "index").read_bytes()
    original = process.Filter.clean

    def clean_then_touch(self, path, stream, out):  # a training run still appending to the file meanwhile
        original(self, path, stream, out)
        with open(repo / path, "ab") as fh:
            fh.write(b"\0")

    monkeypatch.setattr(process.Filter, "clean", clean_then_touch)
    monkeypatch.chdir(repo)
    with pytest.raises(InputError, match="model.safetensors: the file changed while it was being read"):
        stage(Repo.discover(repo), ["model.safetensors"], repo)
    assert (repo / ".git" / "index").read_bytes() == index_before


def test_bad_input_names_the_file_and_stages_nothing(trepo: Path) -> None:
    repo = trepo
    (repo / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    proc = git(repo, "theta", "add", "model.safetensors", check=False)
    assert proc.returncode == 1
    assert b"model.safetensors" in proc.stderr
    assert git(repo, "diff", "--cached", "--name-only").stdout == b""
    save_file(random_state(n=8, shape=(128, 64), seed=7), repo / "model.safetensors")
    whole = (repo / "model.safetensors").read_bytes()
    (repo / "model.safetensors").write_bytes(whole[: len(whole) - 5000])  # the header promises more than is there
    proc = git(repo, "theta", "add", "model.safetensors", check=False)
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr
    assert b"model.safetensors: tensor 'layer7.weight'" in proc.stderr and b"truncated" in proc.stderr
    assert git(repo, "diff", "--cached", "--name-only").stdout == b""
    proc = git(repo, "theta", "add", "missing.bin", check=False)
    assert proc.returncode == 1 and b"did not match any files" in proc.stderr


def test_a_file_truncated_while_mapped_kills_the_add_loudly_and_loses_nothing(trepo: Path, tmp_path: Path) -> None:
    """A training run saving the checkpoint again in place truncates it under `git theta add`'s mapping: the
    command dies of SIGBUS, with a traceback, and leaves the index and every stored object as they were meant to be."""
    from test_gc_concurrency import Paused

    repo = trepo  # 16 KiB blocks: stored in order on the main thread, so the pause below is a known block
    save_file(random_state(n=8, shape=(128, 64), seed=6), repo / "model.safetensors")
    index_before = (repo / ".git" / "index").read_bytes()
    adding = Paused(["git", "theta", "add", "model.safetensors"], repo, "object-written", tmp_path, count=2)
    os.truncate(repo / "model.safetensors", 0)  # the trainer's save starts over the file being read
    returncode, output = adding.resume()
    assert returncode != 0
    assert "Fatal Python error: Bus error" in output and "in _clean_file" in output  # loud, with the traceback
    assert (repo / ".git" / "index").read_bytes() == index_before
    assert git(repo, "theta", "fsck").returncode == 0  # every object stored matches its oid
