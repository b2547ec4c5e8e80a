"""A merge driver killed mid-merge, rebase and cherry-pick over tracked models, and the settings layers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import git, pause_env
from safetensors.torch import load_file
from test_merge_git import commit_model, setup

from gittheta_merge.merge import config
from gittheta_merge.storage.gitutil import Repo


def start_paused_merge(repo: Path, branch: str, pidfile: Path) -> tuple[subprocess.Popen, int]:
    """`git merge BRANCH` whose driver stops after its first merged tensor; returns (git, driver pid)."""
    env = pause_env("object-written", pidfile)  # after the driver stored its first merged block
    proc = subprocess.Popen(["git", "merge", "--no-edit", branch], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while not pidfile.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the driver never reached the pause point"
        time.sleep(0.05)
    return proc, int(pidfile.read_text())


def fsck_clean(repo: Path) -> None:
    proc = git(repo, "theta", "fsck", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_driver_killed_mid_merge_leaves_a_conflict_and_ours_intact(repo: Path, tmp_path: Path) -> None:
    base, models = setup(repo)
    git(repo, "checkout", "-q", "t0")
    ours = (repo / "model.safetensors").read_bytes()
    proc, driver = start_paused_merge(repo, "t1", tmp_path / "pid")
    os.kill(driver, signal.SIGKILL)  # the driver dies after writing some merged objects, before the metadata
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert (repo / "model.safetensors").read_bytes() == ours
    assert b"UU model.safetensors" in git(repo, "status", "--porcelain").stdout
    git(repo, "merge", "--abort")
    fsck_clean(repo)
    git(repo, "merge", "-q", "--no-edit", "t1")  # and the merge then works
    got = load_file(str(repo / "model.safetensors"))
    assert torch.allclose(got["l0.weight"], (models[0]["l0.weight"] + models[1]["l0.weight"]) / 2, atol=1e-6)


def test_git_merge_killed_mid_merge_leaves_the_branch_untouched(repo: Path, tmp_path: Path) -> None:
    setup(repo)
    git(repo, "checkout", "-q", "t0")
    head = git(repo, "rev-parse", "HEAD").stdout
    ours = (repo / "model.safetensors").read_bytes()
    proc, _ = start_paused_merge(repo, "t1", tmp_path / "pid")
    os.killpg(proc.pid, signal.SIGKILL)  # git and the driver at once (a crash, Ctrl-\, OOM killer)
    proc.communicate(timeout=60)
    assert git(repo, "rev-parse", "HEAD").stdout == head
    assert (repo / "model.safetensors").read_bytes() == ours
    (repo / ".git" / "index.lock").unlink(missing_ok=True)  # git's own lock, as git tells the user
    fsck_clean(repo)
    assert git(repo, "diff", "HEAD", "--stat").stdout == b""
    git(repo, "merge", "-q", "--no-edit", "t1")
    fsck_clean(repo)


def test_rebase_and_cherry_pick_over_a_tracked_model(repo: Path) -> None:
    base, models = setup(repo)
    git(repo, "config", "theta.merge.strategy", "task_arithmetic")
    git(repo, "config", "theta.merge.lambda", "1")
    git(repo, "checkout", "-q", "-b", "feat", "main")
    feat = dict(base, **{"l0.weight": models[0]["l0.weight"], "ln.weight": models[0]["ln.weight"]})
    commit_model(repo, feat, "feat: l0 and ln")
    git(repo, "checkout", "-q", "main")
    upstream = dict(base, **{"l1.weight": models[1]["l1.weight"], "ln.weight": models[1]["ln.weight"]})
    commit_model(repo, upstream, "main: l1 and ln")
    want = dict(base, **{"l0.weight": feat["l0.weight"], "l1.weight": upstream["l1.weight"],
                         "ln.weight": base["ln.weight"] + (feat["ln.weight"] - base["ln.weight"])
                         + (upstream["ln.weight"] - base["ln.weight"])})

    git(repo, "checkout", "-q", "-b", "picked", "main")
    git(repo, "cherry-pick", "feat")
    check(load_file(str(repo / "model.safetensors")), want)
    git(repo, "checkout", "-q", "feat")
    git(repo, "rebase", "-q", "main")
    check(load_file(str(repo / "model.safetensors")), want)
    assert git(repo, "rev-parse", "HEAD~1").stdout == git(repo, "rev-parse", "main").stdout
    assert git(repo, "status", "--porcelain").stdout == b""
    fsck_clean(repo)


def check(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.allclose(got[k], v, atol=1e-6), k


def test_settings_precedence(repo: Path) -> None:
    (repo / ".gittheta.toml").write_text('''
[merge]
strategy = "ties"
params = { density = 0.3 }
rules = ["classifier=ours"]
missing_stats = "average"

[[merge.path]]
match = "bert/*.safetensors"
strategy = "regmean"
params = { alpha = 0.9 }
tensor = [{ pattern = "pooler", strategy = "average" }]
''')
    (repo / ".gitattributes").write_text("special.bin theta-merge-strategy=dare\n")
    r = Repo.discover(repo)
    s = config.resolve(r, "model.safetensors")
    assert (s.strategy, s.params, s.missing_stats) == ("ties", {"density": 0.3}, "average")
    assert [x.pattern for x in s.rules] == ["classifier"]
    s = config.resolve(r, "bert/model.safetensors")  # the path entry replaces strategy and its params
    assert (s.strategy, s.params) == ("regmean", {"alpha": 0.9})
    assert [x.pattern for x in s.rules] == ["pooler", "classifier"]  # more specific rules first
    assert config.resolve(r, "special.bin").strategy == "dare"  # attribute over the file
    git(repo, "config", "theta.merge.density", "0.5")  # git config refines the file's strategy
    assert config.resolve(r, "model.safetensors").params == {"density": "0.5"}
    git(repo, "config", "theta.merge.strategy", "average")  # and overrides the attribute and the file
    assert config.resolve(r, "special.bin").strategy == "average"
    s = config.resolve(r, "model.safetensors", {"strategy": "ties", "params": {"density": "0.1"}})
    assert (s.strategy, s.params, s.origin["strategy"]) == ("ties", {"density": "0.1"}, "command line")


def test_device_option(tmp_path: Path) -> None:
    """--device cpu goes through the device path (chunks moved, results back on the CPU); a missing CUDA
    is refused up front with a clear message instead of failing mid-merge."""
    from merge_helpers import family, write_files

    from gittheta_merge.merge.api import merge_files

    base, models = family(2, seed=5)
    bpath, paths = write_files(tmp_path, base, models)
    a = merge_files(paths, tmp_path / "a.safetensors", base=bpath, strategy="ties", device="cpu")
    assert a["n_models"] == 2
    got = load_file(str(tmp_path / "a.safetensors"))
    merge_files(paths, tmp_path / "b.safetensors", base=bpath, strategy="ties")
    want = load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    proc = subprocess.run([sys.executable, "-m", "gittheta_merge", "merge-files", *paths, "--base", str(bpath),
                           "-o", str(tmp_path / "c.safetensors"), "--device", "cpu"], capture_output=True)
    assert proc.returncode == 0, proc.stderr
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, "-m", "gittheta_merge", "merge-files", *paths, "-o",
                               str(tmp_path / "d.safetensors"), "--device", "cuda"], capture_output=True)
        assert proc.returncode != 0 and b"CUDA is not available" in proc.stderr
        assert not (tmp_path / "d.safetensors").exists()
