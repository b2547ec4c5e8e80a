"""Push, fresh clone and incremental push of a tracked model to a file:// remote: this tool vs plain git-lfs.

Issue 3's figures in one run: wall time and peak RSS (largest single process, /usr/bin/time %M) of
`git push` and of `git clone` + checkout, and the bytes that an incremental push after 2 of 48 tensors
change adds to the remote (must be about the changed bytes, not the model). Each tool runs with its own
HOME (user-scope install) so neither sees the other's configuration.

    python benchmarks/remote.py                 # 48 × 1024×1024 fp32 (201 MB), about a minute
    python benchmarks/remote.py --tensors 8     # quicker
    python benchmarks/remote.py --http          # objects over HTTP to a real git-lfs server (giftless on
                                                # localhost, one per tool; bash scripts/reference-tools.sh)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from measure import dir_bytes, time_command
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from lfs_server import LfsServer  # noqa: E402 - the test suite's giftless fixture, reused


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """(seconds, peak RSS MB) of a command."""
    seconds, kib = time_command(cmd, cwd, env)
    return seconds, kib / 1024


def write_model(path: Path, n: int, rows: int, cols: int, changed: int = 0, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    state = {f"layer{i}.weight": torch.randn(rows, cols, generator=gen) for i in range(n)}
    for i in range(changed):
        state[f"layer{i * 7 % n}.weight"] += 0.01
    save_file(state, path)


servers: list[LfsServer] = []


def bench(tool: str, work: Path, args: argparse.Namespace) -> dict[str, float]:
    home = work / f"home-{tool}"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1", "XDG_CONFIG_HOME": str(home / ".cfg")}
    env.pop("GIT_DIR", None)
    git = ["git", "-c", "user.email=b@example.com", "-c", "user.name=bench"]
    subprocess.run(["git", "config", "--global", "init.defaultBranch", "main"], env=env, check=True)
    if tool == "theta":
        subprocess.run(["git", "theta", "install", "--scope", "user"], env=env, check=True, cwd=home,
                       stdout=subprocess.DEVNULL)
    else:
        subprocess.run(["git", "lfs", "install"], env=env, check=True, cwd=home, stdout=subprocess.DEVNULL)
    remote = work / f"{tool}-remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], env=env, check=True)
    repo = work / f"{tool}-repo"
    subprocess.run(["git", "init", "-q", str(repo)], env=env, check=True)
    if tool == "theta":
        subprocess.run(["git", "theta", "install"], cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["git", "theta", "track", "model.safetensors"], cwd=repo, env=env, check=True,
                       stdout=subprocess.DEVNULL)
    else:
        subprocess.run(["git", "lfs", "install", "--local"], cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["git", "lfs", "track", "model.safetensors"], cwd=repo, env=env, check=True,
                       stdout=subprocess.DEVNULL)
    objects_dir = remote / "lfs" / "objects"
    if args.http:  # the objects go to the server named in a committed .lfsconfig; git's refs to the bare repo
        server = LfsServer(work / f"{tool}-giftless").start()
        servers.append(server)
        subprocess.run(["git", "config", "-f", ".lfsconfig", "lfs.url", server.url()], cwd=repo, env=env, check=True)
        objects_dir = server.storage
    write_model(repo / "model.safetensors", args.tensors, args.rows, args.cols)
    subprocess.run([*git, "add", "."], cwd=repo, env=env, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "base"], cwd=repo, env=env, check=True)
    subprocess.run(["git", "remote", "add", "origin", remote.as_uri()], cwd=repo, env=env, check=True)
    out: dict[str, float] = {}
    out["push_s"], out["push_mb"] = run(["git", "push", "-q", "origin", "main"], repo, env)
    out["remote_mb_after_push"] = dir_bytes(objects_dir) / 1e6

    clone = work / f"{tool}-clone"
    out["clone_s"], out["clone_mb"] = run(["git", "clone", "-q", remote.as_uri(), str(clone)], work, env)
    same = (clone / "model.safetensors").read_bytes() == (repo / "model.safetensors").read_bytes()
    out["clone_byte_identical"] = float(same)

    write_model(repo / "model.safetensors", args.tensors, args.rows, args.cols, changed=2)
    subprocess.run([*git, "commit", "-q", "-am", "ft"], cwd=repo, env=env, check=True)
    before = dir_bytes(objects_dir)
    out["push2_s"], out["push2_mb"] = run(["git", "push", "-q", "origin", "main"], repo, env)
    out["incremental_push_mb"] = (dir_bytes(objects_dir) - before) / 1e6
    out["fetch_checkout_s"], out["fetch_checkout_mb"] = run(
        ["sh", "-c", "git pull -q --ff-only origin main"], clone, env)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=48)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--http", action="store_true", help="objects to a giftless git-lfs server on localhost")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="theta-remote-bench-") as tmp:
        try:
            results = {tool: bench(tool, Path(tmp), args) for tool in ("theta", "lfs")}
        finally:
            for server in servers:
                server.kill()
    print(f"objects to: {'giftless over HTTP on localhost' if args.http else 'file:// remotes'}")
    model_mb = args.tensors * args.rows * args.cols * 4 / 1e6
    changed_mb = 2 * args.rows * args.cols * 4 / 1e6
    print(f"model {model_mb:.1f} MB ({args.tensors} fp32 tensors), 2 changed tensors = {changed_mb:.1f} MB")
    print(f"{'step':28s} {'ours':>10s} {'git-lfs':>10s} {'ours/lfs':>9s}")
    rows = [("push (first) s", "push_s"), ("push (first) peak MB", "push_mb"),
            ("clone + checkout s", "clone_s"), ("clone + checkout peak MB", "clone_mb"),
            ("incremental push s", "push2_s"), ("incremental push MB sent", "incremental_push_mb"),
            ("pull of the change s", "fetch_checkout_s"), ("pull of the change peak MB", "fetch_checkout_mb")]
    for label, key in rows:
        a, b = results["theta"][key], results["lfs"][key]
        print(f"{label:28s} {a:10.2f} {b:10.2f} {a / b if b else float('nan'):9.2f}")
    print(f"clone byte-identical: ours={bool(results['theta']['clone_byte_identical'])} "
          f"git-lfs={bool(results['lfs']['clone_byte_identical'])}")
    ratio = results["theta"]["incremental_push_mb"] / changed_mb
    print(f"target: incremental push ≈ changed bytes: {results['theta']['incremental_push_mb']:.1f} MB sent "
          f"for {changed_mb:.1f} MB changed ({ratio:.2f}×) — {'PASS' if ratio < 1.1 else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
