"""End-to-end benchmark: versioning one checkpoint with gittheta-merge vs plain git-lfs (vs git-theta 0.2.0).

Why this script exists
----------------------
The point of storing a checkpoint per tensor is that everyday git commands on it stay about as cheap
as git-lfs (which stores the file whole) while a small change costs a small ``git add`` and a small
``.git``.  The original git-theta 0.2.0 missed that: on a 48 x 1024x1024 fp32 checkpoint (~201 MB) it
took 16-25 s and 1.1-1.3 GB to ``git add``, 7-8.5 s to check out and ~14 s for the first ``git status``
afterwards.  This script measures the same workflow for this tool and for plain git-lfs, on the same
file, in fresh temporary repositories, and checks the project's targets:

* first ``git add`` within 2x of git-lfs;
* the filter process's peak RSS during add and checkout <= largest tensor + 300 MB;
* ``git add`` after 2 of 48 tensors changed <= 15 % of the first ``git add``;
* checkout <= 2x a plain ``cp`` of the file;

and prints the git-theta 0.2.0 anchors (numbers from the reference machine) as ratios
"git-theta anchor / ours".

Steps, per tool, each in a fresh repository: ``git add`` (first version), ``git commit``, ``git add``
after rewriting the file with 2 tensors perturbed, ``git commit``, size of ``.git``, detached
``git checkout <first commit>`` (started from an index with no "racily clean" entry, see
``settle_index``, so it times the smudge and not an extra clean pass; then the file is compared with
the first version: byte-identical for safetensors, value-identical for .pt, whose bytes depend on the
torch version), the first and second ``git status`` after it (must be clean),
``git diff <c1> <c2> -- file`` and, for this tool, ``git theta diff <c1> <c2>``.  References:
``cp`` of the file, ``cat > copy``, ``sha256sum`` and Python ``hashlib``.  git's racy-clean rule
(same-second mtimes make git re-run the clean filter over the whole file on the next command) is
left in the commit and status steps, as a user would meet it.

Every git command runs under ``/usr/bin/time -f '%e %M'``: %M is the peak RSS of the largest single
process in the tree (git or its filter), which is what the git-theta anchors measured.  Meanwhile the
process tree is polled (``VmHWM`` in ``/proc``, every 20 ms; a high-water mark, so a late sample still
sees an earlier peak; a command done before the first sample shows "-") to split git's own peak from
its filter's, and this tool's filter process reports
its exact peak through ``GIT_THETA_RSS_LOG`` (benchmarks/inject/sitecustomize.py, put on its PYTHONPATH).
During a checkout git itself holds the whole smudged file
in memory before writing it (a git limitation that hits every filter, git-lfs included), so git's peak
is about the file size whatever the filter does; the split makes that visible.

All files are fresh in the page cache (just written), so the numbers compare CPU and memory work, not
the disk.  The machine this runs on is small and shared: compare ratios, not absolute seconds.

Usage::

    python benchmarks/track.py                           # 48 x 1024x1024 fp32 safetensors, ~25 s
    python benchmarks/track.py --size 400M --dtype bf16  # ~400M-param bf16 model, big embedding
    python benchmarks/track.py --format pt               # a torch.save .pt file instead
    python benchmarks/track.py --git-theta-venv /tmp/gt  # also git-theta 0.2.0 from that venv
    python benchmarks/track.py --repeat 3 --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from measure import dir_bytes, settle_index

INJECT = Path(__file__).resolve().parent / "inject"  # sitecustomize: the filter reports its peak RSS

MB = 1_000_000
KB_PER_MB = 1000 / 1024  # /usr/bin/time and VmHWM report KiB; tables show MB (10^6 bytes)
CHUNK_ELEMENTS = 16 << 20  # tensors are generated and written in pieces of at most this many elements
POLL_SECONDS = 0.02
SEED = 1234

# git-theta 0.2.0 on 48 x 1024x1024 fp32 (~201 MB), from the reference measurements.
ANCHORS: dict[str, tuple[float, float]] = {
    "add_s": (16.0, 25.0),
    "add_mb": (1100.0, 1300.0),
    "add2_s": (11.7, 13.2),
    "checkout_s": (7.0, 8.5),
    "status1_s": (14.7, 14.7),
    "diff_s": (13.9, 13.9),
    "git_dir_mb": (196.8, 196.8),
    "lfs_git_dir_mb": (402.8, 402.8),
}

DTYPES = {  # name: (safetensors dtype, bytes per element)
    "fp32": ("F32", 4),
    "bf16": ("BF16", 2),
    "fp16": ("F16", 2),
}

STEPS = [  # (key, label)
    ("add", "git add (first)"),
    ("commit", "git commit"),
    ("add2", "git add (2 changed)"),
    ("commit2", "git commit (2nd)"),
    ("checkout", "git checkout <c1>"),
    ("status1", "git status (1st)"),
    ("status2", "git status (2nd)"),
    ("diff", "git diff c1 c2"),
    ("theta_diff", "git theta diff c1 c2"),
]


# --------------------------------------------------------------------------------------------------
# The synthetic checkpoint
# --------------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """Tensor names and shapes in file order, the dtype, and which tensors change in version 2."""

    tensors: list[tuple[str, tuple[int, ...]]]
    dtype: str
    changed: list[int]
    description: str

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return int(np.prod(shape, dtype=np.int64)) * DTYPES[self.dtype][1]

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes(s) for _, s in self.tensors)

    @property
    def params(self) -> int:
        return sum(int(np.prod(s, dtype=np.int64)) for _, s in self.tensors)

    @property
    def largest_bytes(self) -> int:
        return max(self.nbytes(s) for _, s in self.tensors)


def parse_count(text: str) -> int:
    """'400M' -> 400_000_000 (K, M, G suffixes; plain numbers allowed)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: use a parameter count like 400M or 1.3G")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def default_layout(dtype: str) -> Layout:
    """48 x 1024x1024: the checkpoint git-theta 0.2.0 was measured on (fp32: ~201 MB)."""
    tensors = [(f"layers.{i:02d}.weight", (1024, 1024)) for i in range(48)]
    return Layout(tensors, dtype, [16, 32], "48 x 1024x1024")


def transformer_layout(params: int, dtype: str, hidden: int = 1536, vocab: int = 32000) -> Layout:
    """A decoder-like model of about `params` parameters: a vocab x hidden embedding, then layers of
    attention (4 x hidden^2), MLP (3 x hidden x 4096-ish) and a norm vector, then a final norm."""
    ffn = -(-(8 * hidden // 3) // 256) * 256  # llama-style: 8/3 hidden rounded up to 256 (4096 for 1536)
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden
    embed = vocab * hidden
    layers = max(1, round((params - embed - hidden) / per_layer))
    tensors: list[tuple[str, tuple[int, ...]]] = [("embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"layers.{i}."
        tensors += [
            (p + "input_norm.weight", (hidden,)),
            (p + "attn.q_proj.weight", (hidden, hidden)),
            (p + "attn.k_proj.weight", (hidden, hidden)),
            (p + "attn.v_proj.weight", (hidden, hidden)),
            (p + "attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attn_norm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (ffn, hidden)),
            (p + "mlp.up_proj.weight", (ffn, hidden)),
            (p + "mlp.down_proj.weight", (hidden, ffn)),
        ]
    tensors.append(("norm.weight", (hidden,)))
    # change two big matrices of different layers (like a fine-tuning step that touched two tensors)
    changed = [1 + 9 * (layers // 3) + 7, 1 + 9 * (2 * layers // 3) + 2]
    desc = f"embedding {vocab}x{hidden} + {layers} layers (hidden {hidden}, ffn {ffn})"
    return Layout(tensors, dtype, sorted(set(changed)), desc)


def tensor_chunks(index: int, shape: tuple[int, ...], dtype: str, version: int,
                  layout: Layout) -> Iterator[np.ndarray]:
    """The tensor's little-endian bytes as arrays of at most CHUNK_ELEMENTS elements, deterministic.

    Version 2 of a changed tensor is version 1 plus small noise (a perturbation, not new values)."""
    rows = shape[0] if shape else 1
    row_elems = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    step = max(1, CHUNK_ELEMENTS // max(row_elems, 1))
    perturb = version == 2 and index in layout.changed
    for chunk, start in enumerate(range(0, rows, step)):
        n = min(step, rows - start) * row_elems
        rng = np.random.default_rng([SEED, index, chunk])
        x = rng.standard_normal(n, dtype=np.float32)
        x *= np.float32(0.02)
        if perturb:
            noise = np.random.default_rng([SEED, index, chunk, 2]).standard_normal(n, dtype=np.float32)
            x += noise * np.float32(2e-4)
            del noise
        if dtype == "bf16":
            bits = x.view(np.uint32)
            rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            yield rounded.astype("<u2")
        elif dtype == "fp16":
            yield x.astype("<f2")
        else:
            yield x.astype("<f4", copy=False)


def write_safetensors(path: Path, layout: Layout, version: int) -> None:
    """Stream a safetensors file tensor by tensor; the header is what the safetensors library writes
    (compact JSON, tensors in data order, space padding to a multiple of 8)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in layout.tensors:
        size = layout.nbytes(shape)
        header[name] = {"dtype": DTYPES[layout.dtype][0], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as out:
        out.write(len(text).to_bytes(8, "little"))
        out.write(text)
        for i, (_, shape) in enumerate(layout.tensors):
            for chunk in tensor_chunks(i, shape, layout.dtype, version, layout):
                out.write(memoryview(chunk).cast("B"))


def write_pt(path: Path, layout: Layout, version: int) -> None:
    """torch.save of a state dict (torch.save needs every tensor in memory at once)."""
    import torch

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[layout.dtype]
    state: dict[str, Any] = {}
    for i, (name, shape) in enumerate(layout.tensors):
        tensor = torch.empty(shape, dtype=torch_dtype)
        flat = tensor.view(-1).view(torch.uint8).numpy()
        pos = 0
        for chunk in tensor_chunks(i, shape, layout.dtype, version, layout):
            raw = chunk.view(np.uint8)
            flat[pos:pos + raw.size] = raw
            pos += raw.size
        state[name] = tensor
    torch.save(state, path)


def build_checkpoint(layout: Layout, fmt: str, directory: Path, version: int) -> Path:
    path = directory / f"model-v{version}.{ 'safetensors' if fmt == 'safetensors' else 'pt'}"
    (write_safetensors if fmt == "safetensors" else write_pt)(path, layout, version)
    return path


def same_content(path: Path, reference: Path, fmt: str) -> str:
    """'byte-identical', 'value-identical' (same tensor names, dtypes, shapes and values, other bytes)
    or 'MISMATCH'."""
    if subprocess.run(["cmp", "-s", str(path), str(reference)]).returncode == 0:
        return "byte-identical"
    import torch

    try:
        if fmt == "pt":
            a = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            b = torch.load(reference, map_location="cpu", weights_only=True, mmap=True)
            same = list(a) == list(b) and all(
                a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
            )
        else:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as fa, safe_open(str(reference), "pt") as fb:
                same = sorted(fa.keys()) == sorted(fb.keys()) and all(
                    (x := fa.get_tensor(k)).dtype == (y := fb.get_tensor(k)).dtype and torch.equal(x, y)
                    for k in fb.keys()
                )
    except Exception as exc:  # noqa: BLE001 - an unreadable result is a mismatch, not a crash
        sys.stderr.write(f"{path}: cannot compare values: {exc}\n")
        return "MISMATCH"
    return "value-identical" if same else "MISMATCH"


# --------------------------------------------------------------------------------------------------
# Running one measured command
# --------------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One measured command: wall seconds and peak RSS in KiB (tree max, git's own, its helpers')."""

    seconds: float
    tree_kb: int
    git_kb: int
    helper_kb: int
    helper_anon_kb: int
    filter_log_kb: int | None
    rc: int
    stdout_bytes: int = 0
    helpers: dict[str, int] = field(default_factory=dict)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out.extend(int(c) for c in fh.read().split())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _hwm(pid: int) -> tuple[str, int, int] | None:
    """(name, VmHWM, RssAnon) of a live process, in KiB."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            text = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    name = re.search(r"^Name:\s*(.*)$", text, re.M)
    hwm = re.search(r"^VmHWM:\s*(\d+)", text, re.M)
    anon = re.search(r"^RssAnon:\s*(\d+)", text, re.M)
    if not name or not hwm or not anon:
        return None  # zombie: its memory is already gone
    return name.group(1).strip(), int(hwm.group(1)), int(anon.group(1))


class Runner:
    """Runs commands under /usr/bin/time with a per-tool environment, polling the process tree."""

    def __init__(self, scratch: Path, verbose: bool) -> None:
        self.scratch = scratch
        self.verbose = verbose
        self.count = 0

    def run(self, cmd: list[str], cwd: Path, env: dict[str, str], rss_log: bool = False,
            check: bool = True) -> Step:
        self.count += 1
        tag = self.scratch / f"cmd{self.count:04d}"
        time_out, out_path, err_path = Path(f"{tag}.time"), Path(f"{tag}.out"), Path(f"{tag}.err")
        log_path = Path(f"{tag}.rss")
        env = dict(env)
        if rss_log:
            env["GIT_THETA_RSS_LOG"] = str(log_path)  # read by benchmarks/inject/sitecustomize.py
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(INJECT), env.get("PYTHONPATH", "")]))
        peaks: dict[int, tuple[str, int, int]] = {}  # pid: name, VmHWM, max sampled RssAnon
        git_pid = -1
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(["/usr/bin/time", "-f", "%e %M", "-o", str(time_out), *cmd],
                                    cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
            while True:
                done = proc.poll() is not None
                if not done:
                    kids = _children(proc.pid)
                    if kids and git_pid < 0:
                        git_pid = kids[0]
                    stack = list(kids)
                    while stack:
                        pid = stack.pop()
                        seen = _hwm(pid)
                        if seen:
                            before = peaks.get(pid, ("", 0, 0))
                            peaks[pid] = (seen[0], max(seen[1], before[1]), max(seen[2], before[2]))
                        stack.extend(_children(pid))
                if done:
                    break
                time.sleep(POLL_SECONDS)
            seconds = time.perf_counter() - start
        last = time_out.read_text().strip().splitlines()[-1].split()
        tree_kb = int(last[1])
        rc = proc.returncode
        if self.verbose or (check and rc != 0):
            sys.stderr.write(f"$ {' '.join(cmd)}  (rc={rc}, {seconds:.2f}s, {tree_kb / 1024:.0f} MiB)\n")
        if check and rc != 0:
            sys.stderr.write(err_path.read_text(errors="replace")[-3000:])
            raise RuntimeError(f"command failed: {' '.join(cmd)} (in {cwd})")
        helpers: dict[str, int] = {}
        helper_anon = 0
        for pid, (name, kb, anon_kb) in peaks.items():
            if pid != git_pid:
                helpers[name] = max(helpers.get(name, 0), kb)
                helper_anon = max(helper_anon, anon_kb)
        git_kb = peaks.get(git_pid, ("", 0, 0))[1]
        filter_log_kb = None
        if rss_log and log_path.exists():
            entries = [int(line.split()[1]) for line in log_path.read_text().splitlines() if line.strip()]
            filter_log_kb = max(entries) if entries else None
        return Step(seconds, tree_kb, git_kb, max(helpers.values(), default=0), helper_anon, filter_log_kb, rc,
                    out_path.stat().st_size, helpers)

    def output(self) -> str:
        return Path(f"{self.scratch / f'cmd{self.count:04d}'}.out").read_text(errors="replace")


# --------------------------------------------------------------------------------------------------
# One tool's workflow
# --------------------------------------------------------------------------------------------------


def tool_env(tool: str, home: Path, venv: Path | None, fmt: str) -> dict[str, str]:
    """An isolated environment: its own HOME (git-theta 0.2.0 writes its filter to ~/.gitconfig), no
    system git config, and for git-theta 0.2.0 its venv first on PATH."""
    home.mkdir(parents=True, exist_ok=True)
    (home / ".gitconfig").write_text("[user]\n\tname = bench\n\temail = bench@example.com\n"
                                     "[init]\n\tdefaultBranch = main\n[gc]\n\tauto = 0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(HOME=str(home), GIT_CONFIG_NOSYSTEM="1", LC_ALL="C")
    if tool == "git-theta" and venv is not None:
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(venv)
        env["GIT_THETA_CHECKPOINT_TYPE"] = "pytorch" if fmt == "pt" else "safetensors"
    return env


def run_tool(tool: str, runner: Runner, work: Path, v1: Path, v2: Path, fmt: str,
             venv: Path | None) -> dict[str, Any]:
    """The whole workflow for one tool in a fresh repository; returns steps and checks."""
    repo = work / f"repo-{tool}"
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    env = tool_env(tool, work / f"home-{tool}", venv, fmt)
    name = "model." + ("safetensors" if fmt == "safetensors" else "pt")
    target = repo / name
    ours = tool in ("ours", "ours-add")

    def git(*args: str, check: bool = True) -> Step:
        return runner.run(["git", *args], repo, env, rss_log=ours, check=check)

    def rev(spec: str) -> str:
        return subprocess.run(["git", "rev-parse", spec], cwd=repo, env=env, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    shutil.copyfile(v1, target)  # `track` wants the file to exist
    if tool == "git-lfs":
        runner.run(["git", "lfs", "install", "--local"], repo, env)
        runner.run(["git", "lfs", "track", name], repo, env)
    else:
        runner.run(["git", "theta", "install"], repo, env)
        runner.run(["git", "theta", "track", name], repo, env)
    git("add", ".gitattributes")
    git("commit", "-q", "-m", "track")

    steps: dict[str, Step] = {}
    def add() -> Step:  # ours-add: `git theta add`, which reads the model itself instead of git piping it to the filter
        return git("theta", "add", name) if tool == "ours-add" else git("add", name)

    steps["add"] = add()
    steps["commit"] = git("commit", "-q", "-m", "v1")
    c1 = rev("HEAD")
    shutil.copyfile(v2, target)
    steps["add2"] = add()
    steps["commit2"] = git("commit", "-q", "-m", "v2")
    c2 = rev("HEAD")
    blobs_differ = rev(f"{c1}:{name}") != rev(f"{c2}:{name}")
    git_dir = dir_bytes(repo / ".git")
    lfs_dir = dir_bytes(repo / ".git" / "lfs")
    settle_index(repo, env)
    steps["checkout"] = git("checkout", "-q", "--detach", c1)
    content = same_content(target, v1, fmt)
    steps["status1"] = git("status", "--porcelain")
    status1_out = runner.output().strip()
    steps["status2"] = git("status", "--porcelain")
    status2_out = runner.output().strip()
    steps["diff"] = git("diff", c1, c2, "--", name)
    if ours:
        steps["theta_diff"] = runner.run(["git", "theta", "diff", c1, c2], repo, env)
        theta_diff_head = runner.output().splitlines()[:1]
    else:
        theta_diff_head = []
    checks = {
        "checkout_content": content,
        "status_clean": not status1_out and not status2_out,
        "status_output": (status1_out or status2_out)[:500],
        "commits_differ": blobs_differ,
        "theta_diff_head": theta_diff_head,
    }
    shutil.rmtree(repo, ignore_errors=True)
    return {"steps": {k: asdict(v) for k, v in steps.items()}, "git_dir_bytes": git_dir,
            "lfs_dir_bytes": lfs_dir, "checks": checks}


def references(runner: Runner, work: Path, v1: Path, times: int = 3) -> dict[str, dict[str, float]]:
    """cp (the checkout target's yardstick; may copy inside the kernel), a read/write copy through user
    space (cat), sha256sum and in-process hashlib: each the median of `times` runs."""
    env = dict(os.environ)
    copy = work / "copy.bin"
    samples: dict[str, list[tuple[float, float]]] = {"cp": [], "cat": [], "sha256sum": [], "hashlib": []}
    for _ in range(times):
        cp = runner.run(["cp", str(v1), str(copy)], work, env)
        copy.unlink()
        cat = runner.run(["sh", "-c", 'cat "$0" > "$1"', str(v1), str(copy)], work, env)
        copy.unlink()
        sha = runner.run(["sha256sum", str(v1)], work, env)
        start = time.perf_counter()
        digest = hashlib.sha256()
        with open(v1, "rb") as fh:
            while chunk := fh.read(8 << 20):
                digest.update(chunk)
        samples["cp"].append((cp.seconds, cp.tree_kb))
        samples["cat"].append((cat.seconds, cat.tree_kb))
        samples["sha256sum"].append((sha.seconds, sha.tree_kb))
        samples["hashlib"].append((time.perf_counter() - start, 0))
    return {name: {"seconds": statistics.median(x[0] for x in got), "tree_kb": statistics.median(x[1] for x in got)}
            for name, got in samples.items()}


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------


def median_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per step, the median of each number over the repeats (checks: all repeats must pass)."""
    steps: dict[str, dict[str, float | None]] = {}
    for key in runs[0]["steps"]:
        values = [r["steps"][key] for r in runs]
        merged: dict[str, float | None] = {}
        for metric in ("seconds", "tree_kb", "git_kb", "helper_kb", "helper_anon_kb", "filter_log_kb"):
            nums = [v[metric] for v in values if v[metric] is not None]
            merged[metric] = statistics.median(nums) if nums else None
        steps[key] = merged
    checks = {
        "checkout_content": sorted({r["checks"]["checkout_content"] for r in runs}),
        "status_clean": all(r["checks"]["status_clean"] for r in runs),
        "commits_differ": all(r["checks"]["commits_differ"] for r in runs),
        "status_output": next((r["checks"]["status_output"] for r in runs if r["checks"]["status_output"]), ""),
        "theta_diff_head": runs[0]["checks"]["theta_diff_head"],
    }
    return {"steps": steps, "git_dir_bytes": statistics.median(r["git_dir_bytes"] for r in runs),
            "lfs_dir_bytes": statistics.median(r["lfs_dir_bytes"] for r in runs), "checks": checks}


def mb(kb: float | None) -> float | None:
    return None if kb is None else kb * 1024 / MB


def fmt_num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            + " |" for r in rows]
    return "\n".join([line, sep, *body])


def report(result: dict[str, Any]) -> str:
    tools = result["medians"]
    ours, lfs, gt = tools.get("ours"), tools.get("git-lfs"), tools.get("git-theta")
    refs = result["references"]
    layout = result["checkpoint"]
    out: list[str] = []
    out.append(f"checkpoint: {layout['description']}, {layout['dtype']}, {layout['format']}, "
               f"{layout['tensors']} tensors, {layout['params'] / 1e6:.1f}M params, "
               f"{layout['bytes'] / MB:.1f} MB (largest tensor {layout['largest_bytes'] / MB:.1f} MB), "
               f"{len(layout['changed'])} changed in v2 ({layout['changed_bytes'] / MB:.1f} MB); "
               f"median of {result['repeat']} run(s)")
    header = ["step", "ours s", "ours MB", "git-lfs s", "git-lfs MB", "ours/lfs s", "ours/lfs MB"]
    if gt:
        header += ["git-theta s", "git-theta MB"]
    rows = []
    for key, label in STEPS:
        a = ours["steps"].get(key) if ours else None
        b = lfs["steps"].get(key) if lfs else None
        c = gt["steps"].get(key) if gt else None
        if not a and not b and not c:
            continue
        row = [label,
               fmt_num(a and a["seconds"]), fmt_num(mb(a and a["tree_kb"]), 0),
               fmt_num(b and b["seconds"]), fmt_num(mb(b and b["tree_kb"]), 0),
               ratio(a and a["seconds"], b and b["seconds"]), ratio(a and a["tree_kb"], b and b["tree_kb"])]
        if gt:
            row += [fmt_num(c and c["seconds"]), fmt_num(mb(c and c["tree_kb"]), 0)]
        rows.append(row)
    size_row = [".git size after 2 commits (MB)",
                fmt_num(ours and ours["git_dir_bytes"] / MB, 1), "",
                fmt_num(lfs and lfs["git_dir_bytes"] / MB, 1), "",
                ratio(ours and ours["git_dir_bytes"], lfs and lfs["git_dir_bytes"]), ""]
    if gt:
        size_row += [fmt_num(gt["git_dir_bytes"] / MB, 1), ""]
    rows.append(size_row)
    ref_labels = {"cp": "reference: cp", "cat": "reference: cat > copy", "sha256sum": "reference: sha256sum",
                  "hashlib": "reference: hashlib (in-process)"}
    for name, label in ref_labels.items():
        ref = refs[name]
        row = [label,
               fmt_num(ref["seconds"]), fmt_num(mb(ref["tree_kb"]), 0) if ref["tree_kb"] else "-",
               "", "", "", ""]
        if gt:
            row += ["", ""]
        rows.append(row)
    out.append("")
    out.append("MB = peak RSS of the largest single process (/usr/bin/time %M); s = wall seconds")
    out.append(table(rows, header))
    if ours_add := tools.get("ours-add"):
        first, again = ours_add["steps"]["add"], ours_add["steps"]["add2"]
        out.append(f"`git theta add` instead of `git add`: first {first['seconds']:.2f} s "
                   f"({fmt_num(mb(first['tree_kb']), 0)} MB), after 2 changed {again['seconds']:.2f} s "
                   f"({fmt_num(mb(again['tree_kb']), 0)} MB) = {100 * again['seconds'] / first['seconds']:.0f}% of its "
                   "first" + (f", {100 * again['seconds'] / ours['steps']['add']['seconds']:.0f}% of a first `git add`"
                             if ours else ""))

    # who holds the memory
    split_rows = []
    for key in ("add", "add2", "checkout", "status1"):
        row = [dict(STEPS)[key]]
        for t in tools.values():
            s = t["steps"][key]
            filt = s["filter_log_kb"] if s["filter_log_kb"] is not None else s["helper_kb"]
            row += [fmt_num(mb(s["git_kb"]), 0) if s["git_kb"] else "-", fmt_num(mb(filt), 0) if filt else "-",
                    fmt_num(mb(s["helper_anon_kb"]), 0) if s["helper_anon_kb"] else "-"]
        split_rows.append(row)
    split_header = ["step"] + [f"{name}: {what}" for name in tools for what in ("git", "filter", "filter anon")]
    out.append("")
    out.append("peak RSS by process, MB: git's own (polled VmHWM) vs the filter (ours: GIT_THETA_RSS_LOG; "
               "others: polled VmHWM);\nfilter anon = largest sampled RssAnon (excludes mmap'ed file pages, "
               "which the page cache can reclaim)")
    out.append(table(split_rows, split_header))

    out.append("")
    out.append("checks:")
    for t_name, t in tools.items():
        ch = t["checks"]
        out.append(f"  {t_name}: checkout {'/'.join(ch['checkout_content'])}; status after checkout "
                   f"{'clean' if ch['status_clean'] else 'NOT clean: ' + ch['status_output']!r}; "
                   f"commits differ: {ch['commits_differ']}"
                   + (f"; theta diff: {ch['theta_diff_head'][0]}" if ch["theta_diff_head"] else ""))

    out.append("")
    out.append("targets:")
    for line in result["targets"]:
        out.append(f"  [{line['verdict']}] {line['text']}")
    if result.get("anchors"):
        out.append("")
        out.append("git-theta 0.2.0 anchors (reference machine) / ours (this machine): >1 means ours is better")
        for line in result["anchors"]:
            out.append(f"  {line}")
    return "\n".join(out)


def evaluate(result: dict[str, Any]) -> None:
    """Fill result['targets'] and result['anchors']."""
    tools = result["medians"]
    ours, lfs = tools.get("ours"), tools.get("git-lfs")
    layout = result["checkpoint"]
    targets: list[dict[str, str]] = []

    def target(ok: bool | None, text: str) -> None:
        targets.append({"verdict": "n/a" if ok is None else "PASS" if ok else "FAIL", "text": text})

    if ours and lfs:
        a, b = ours["steps"]["add"]["seconds"], lfs["steps"]["add"]["seconds"]
        target(a <= 2 * b, f"first git add within 2x of git-lfs: {a:.2f}s vs {b:.2f}s = {a / b:.2f}x (<= 2)")
    if ours:
        limit_mb = layout["largest_bytes"] / MB + 300
        for key in ("add", "checkout"):
            s = ours["steps"][key]
            filt = mb(s["filter_log_kb"] if s["filter_log_kb"] is not None else s["helper_kb"])
            target(None if filt is None else filt <= limit_mb,
                   f"{key} filter-process peak RSS <= largest tensor + 300 MB: {fmt_num(filt, 0)} MB "
                   f"(limit {limit_mb:.0f} MB; git's own process: {mb(s['git_kb']):.0f} MB, tree max "
                   f"{mb(s['tree_kb']):.0f} MB)")
        full, inc = ours["steps"]["add"]["seconds"], ours["steps"]["add2"]["seconds"]
        target(inc <= 0.15 * full, f"incremental git add <= 15% of the first: {inc:.2f}s / {full:.2f}s "
                                   f"= {100 * inc / full:.0f}%")
        co, cp = ours["steps"]["checkout"]["seconds"], result["references"]["cp"]["seconds"]
        target(co <= 2 * cp, f"checkout <= 2x cp: {co:.2f}s vs cp {cp:.2f}s = {co / cp:.1f}x")
        wanted = {"byte-identical"} if layout["format"] == "safetensors" else {"byte-identical", "value-identical"}
        got = ours["checks"]["checkout_content"]
        target(set(got) <= wanted, f"checkout restores the first version: {'/'.join(got)} "
                                   f"(required: {' or '.join(sorted(wanted))})")
        target(ours["checks"]["status_clean"], "git status clean after checkout")
    if ours_add := tools.get("ours-add"):
        full, inc = ours_add["steps"]["add"]["seconds"], ours_add["steps"]["add2"]["seconds"]
        target(inc <= 0.15 * full, f"incremental `git theta add` <= 15% of the first: {inc:.2f}s / {full:.2f}s "
                                   f"= {100 * inc / full:.0f}%")
        if ours:
            plain = ours["steps"]["add"]["seconds"]
            target(inc <= 0.15 * plain, f"incremental `git theta add` <= 15% of a first `git add`: {inc:.2f}s / "
                                        f"{plain:.2f}s = {100 * inc / plain:.0f}%")
    result["targets"] = targets

    anchors: list[str] = []
    if ours and layout["description"] == "48 x 1024x1024" and layout["dtype"] == "fp32":
        s = ours["steps"]

        def anchor(label: str, key: str, value: float | None, unit: str) -> None:
            lo, hi = ANCHORS[key]
            if value is None or value <= 0:
                return
            span = f"{lo:g}-{hi:g}" if lo != hi else f"{lo:g}"
            ratios = f"{lo / value:.1f}-{hi / value:.1f}" if lo != hi else f"{lo / value:.1f}"
            anchors.append(f"{label}: git-theta {span} {unit} / ours {value:.2f} {unit} = {ratios}x")

        anchor("first git add", "add_s", s["add"]["seconds"], "s")
        anchor("first git add peak RSS", "add_mb", mb(s["add"]["tree_kb"]), "MB")
        anchor("incremental git add", "add2_s", s["add2"]["seconds"], "s")
        anchor("checkout", "checkout_s", s["checkout"]["seconds"], "s")
        anchor("first git status", "status1_s", s["status1"]["seconds"], "s")
        anchor("git diff", "diff_s", s["diff"]["seconds"], "s")
        anchor(".git size", "git_dir_mb", ours["git_dir_bytes"] / MB, "MB")
        if lfs:
            anchor("git-lfs .git size (sanity: same data?)", "lfs_git_dir_mb", lfs["git_dir_bytes"] / MB, "MB")
    result["anchors"] = anchors


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_count, default=None,
                        help="parameter count (e.g. 400M) for a decoder-like layout with a 32000x1536 "
                             "embedding; default: 48 x 1024x1024")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--format", choices=["safetensors", "pt"], default="safetensors", dest="fmt")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool; tables show the median")
    parser.add_argument("--tools", default="ours,git-lfs",
                        help="comma-separated subset of ours,ours-add,git-lfs (ours-add: ours with `git theta add` "
                             "instead of `git add`; git-theta is added by --git-theta-venv)")
    parser.add_argument("--git-theta-venv", type=Path, default=None,
                        help="a venv with git-theta 0.2.0 installed: also benchmark it")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temp dir (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every command")
    args = parser.parse_args(argv)
    # bytecode caching as on a user's machine: this sandbox sets PYTHONDONTWRITEBYTECODE, under which every filter,
    # hook and CLI start compiles our modules again (~0.1 s each); the runs after the first find the .pyc files
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if unknown := set(tools) - {"ours", "ours-add", "git-lfs"}:
        parser.error(f"unknown tools: {sorted(unknown)}")
    if args.git_theta_venv is not None:
        if not (args.git_theta_venv / "bin" / "git-theta").exists():
            parser.error(f"{args.git_theta_venv}/bin/git-theta not found")
        tools.append("git-theta")
    if not Path("/usr/bin/time").exists():
        parser.error("/usr/bin/time (GNU time) is needed: apt-get install time")

    layout = default_layout(args.dtype) if args.size is None else transformer_layout(args.size, args.dtype)
    work = Path(tempfile.mkdtemp(prefix="gtm-bench-", dir=args.workdir))
    runner = Runner(work / "log", args.verbose)
    runner.scratch.mkdir()
    try:
        t0 = time.perf_counter()
        data = work / "data"
        data.mkdir()
        v1 = build_checkpoint(layout, args.fmt, data, 1)
        v2 = build_checkpoint(layout, args.fmt, data, 2)
        gen_s = time.perf_counter() - t0
        sys.stderr.write(f"built {v1.name} and {v2.name} ({v1.stat().st_size / MB:.1f} MB each) in {gen_s:.1f}s\n")

        runs: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
        ref_runs: list[dict[str, dict[str, float]]] = []
        for rep in range(args.repeat):
            ref_runs.append(references(runner, work, v1))
            for tool in tools:
                t1 = time.perf_counter()
                venv = args.git_theta_venv if tool == "git-theta" else None
                try:
                    runs[tool].append(run_tool(tool, runner, work, v1, v2, args.fmt, venv))
                except RuntimeError as exc:
                    sys.stderr.write(f"{tool}: {exc}\n")
                    continue
                sys.stderr.write(f"run {rep + 1}/{args.repeat} {tool}: {time.perf_counter() - t1:.1f}s\n")

        refs = {name: {m: statistics.median(r[name][m] for r in ref_runs) for m in ("seconds", "tree_kb")}
                for name in ref_runs[0]}
        changed_bytes = sum(layout.nbytes(layout.tensors[i][1]) for i in layout.changed)
        result: dict[str, Any] = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(),
                        "git": subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip(),
                        "git_lfs": subprocess.run(["git", "lfs", "version"], capture_output=True,
                                                  text=True).stdout.strip()},
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "checkpoint": {"description": layout.description, "dtype": layout.dtype, "format": args.fmt,
                           "tensors": len(layout.tensors), "params": layout.params,
                           "bytes": v1.stat().st_size, "largest_bytes": layout.largest_bytes,
                           "changed": [layout.tensors[i][0] for i in layout.changed],
                           "changed_bytes": changed_bytes},
            "repeat": args.repeat,
            "generate_seconds": gen_s,
            "references": refs,
            "runs": runs,
            "medians": {t: median_runs(r) for t, r in runs.items() if r},
        }
        evaluate(result)
        text = report(result)
        print(text)
        sys.stderr.write(f"total {time.perf_counter() - t0:.0f}s\n")
        if args.json:
            args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
        # exit 1 when ours restores a wrong file or leaves a dirty status, or ours/git-lfs crashed;
        # missed performance targets only print FAIL
        broken = any(t["verdict"] == "FAIL" and t["text"].startswith(("checkout restores", "git status clean"))
                     for t in result["targets"])
        return 1 if broken or any(not runs[t] for t in tools if t != "git-theta") else 0
    finally:
        if args.keep:
            sys.stderr.write(f"kept {work}\n")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
