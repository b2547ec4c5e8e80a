"""Benchmark candidate on-disk formats for one per-tensor object.

Why this script exists
----------------------
``gittheta-merge`` stores every tensor of a checkpoint as one
content-addressed object: the object id (oid) is the sha256 of the *stored
bytes*, laid out like git-lfs (``objects/ab/cd/<oid>``).  The original request
was to use ``tensorstore`` (chunked arrays, optional compression, partial
reads) for that object "unless you measure something better; record the
measurement in docs/".  This script is that measurement; its output is pasted
into ``docs/object-format.md``.

Candidates (all measured in one run, same data, same process):

* ``raw``: the little-endian tensor bytes themselves.  Stored with
  sha256 + write to a temp file + ``os.replace``.  A partial read of a row
  range is one ``seek`` + one ``read``.
* ``zarr2-dir`` / ``zarr3-dir``: tensorstore ``zarr`` / ``zarr3`` drivers on a
  local ``file`` kvstore, with one chunk per tensor (``whole``) or row chunks
  (``rowsN``), with codecs ``none``, ``blosc-lz4`` (byte shuffle, what
  git-theta used), ``zstd`` and ``blosc-zstd`` (byte shuffle).  tensorstore
  writes a *directory* (metadata + chunk files), so the oid is computed by
  hashing the directory (sorted relative paths, sizes and contents) and the
  directory is then renamed into place.
* ``zarr2-zip``: "one object" variant.  tensorstore writes into an in-memory
  ``memory://`` kvstore, the keys are packed into a deterministic
  ``ZIP_STORED`` archive (fixed timestamps, sorted names), hashed and
  renamed into place.  tensorstore reads it back through its read-only
  ``zip`` kvstore driver, which still allows partial (per-chunk) reads.

Reported per (case, format): median over ``--reps`` repetitions of write
time (encode + oid + temp/rename), whole-tensor read time, and the time to
read rows ``100:200`` of every tensor, both with the open included (one-shot
access) and through handles opened beforehand (repeated access); MB/s, s/GB, stored
bytes, compression ratio, ratios relative to ``raw``, and peak RSS above the
resident input data (``resource.getrusage`` after resetting the kernel's
high-water mark through ``/proc/self/clear_refs``).

Reads are served from the page cache (the objects were just written), so the
numbers compare the CPU cost of each format, not the disk.  Nothing is
fsync'ed unless ``--fsync`` is given (then both raw and tensorstore sync).

Usage::

    python benchmarks/object_format.py            # full run, ~2-3 minutes
    python benchmarks/object_format.py --quick    # smoke run, a few seconds
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.metadata
import io
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    import tensorstore as ts
except ImportError:  # pragma: no cover - exercised only without tensorstore
    ts = None

try:
    import ml_dtypes

    BF16: np.dtype[Any] | None = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes ships with tensorstore
    BF16 = None

MB = 1_000_000
GB = 1_000_000_000
PARTIAL_ROWS = (100, 200)
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


# --------------------------------------------------------------------------
# Test data
# --------------------------------------------------------------------------


@dataclass
class Case:
    """A named set of tensors that every format stores and reads back."""

    name: str
    description: str
    tensors: list[np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def _bf16_from_fp32(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even fp32 -> bf16 (ml_dtypes if present, else uint16)."""
    if BF16 is not None:
        return x.astype(BF16)
    bits = x.view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def make_cases(count: int, extra_count: int, rows: int, cols: int, selected: set[str] | None) -> list[Case]:
    """Build the benchmark cases deterministically (seeded).

    The two "random" cases use ``count`` tensors; the fine-tuned-like and
    sparse cases use ``extra_count`` to keep the default run short.
    """
    shape = (rows, cols)

    def fp32_random(rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    def bf16_random(rng: np.random.Generator) -> np.ndarray:
        return _bf16_from_fp32(rng.standard_normal(shape, dtype=np.float32))

    def fp16_finetuned(rng: np.random.Generator) -> np.ndarray:
        # Pretrained-scale weights plus a small fine-tuning update, saved in fp16
        # the way a fine-tuned checkpoint would be.
        base = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        base += rng.standard_normal(shape, dtype=np.float32) * np.float32(2e-4)
        return base.astype(np.float16)

    def bf16_finetuned(rng: np.random.Generator) -> np.ndarray:
        base = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        base += rng.standard_normal(shape, dtype=np.float32) * np.float32(2e-4)
        return _bf16_from_fp32(base)

    def fp32_sparse90(rng: np.random.Generator) -> np.ndarray:
        x = rng.standard_normal(shape, dtype=np.float32)
        x[rng.random(shape, dtype=np.float32) < np.float32(0.9)] = 0.0
        return x

    builders: list[tuple[str, str, int, Callable[[np.random.Generator], np.ndarray]]] = [
        ("fp32-random", "fp32 N(0,1)", count, fp32_random),
        ("bf16-random", "bf16 N(0,1)", count, bf16_random),
        ("fp16-finetuned", "fp16 N(0,.02)+N(0,2e-4)", extra_count, fp16_finetuned),
        ("bf16-finetuned", "bf16 N(0,.02)+N(0,2e-4)", extra_count, bf16_finetuned),
        (
            "fp32-sparse90",
            "fp32 N(0,1) with 90% exact zeros",
            extra_count,
            fp32_sparse90,
        ),
    ]
    cases = []
    for seed, (name, desc, n, build) in enumerate(builders):
        if selected is not None and name not in selected:
            continue
        rng = np.random.default_rng(seed)
        tensors = [np.ascontiguousarray(build(rng)) for _ in range(n)]
        cases.append(Case(name, f"{n} x {rows}x{cols} {desc}", tensors))
    if selected is not None and (unknown := selected - {b[0] for b in builders}):
        raise SystemExit(f"unknown case(s): {sorted(unknown)}")
    return cases


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def le_view(arr: np.ndarray) -> memoryview:
    """Little-endian, C-contiguous byte view of ``arr`` (no copy on x86)."""
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder == "big"):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    # uint8 view: bfloat16 (ml_dtypes) does not support the buffer protocol.
    return memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def object_path(store: Path, oid: str) -> Path:
    """git-lfs local layout: ``objects/ab/cd/<oid>``."""
    return store / "objects" / oid[:2] / oid[2:4] / oid


def write_atomic(store: Path, chunks: Sequence[bytes | memoryview], fsync: bool) -> str:
    """sha256 the bytes, write them to a temp file and rename to the oid path."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    oid = h.hexdigest()
    tmp_dir = store / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir)
    with os.fdopen(fd, "wb") as f:
        for c in chunks:
            f.write(c)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    dest = object_path(store, oid)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return oid


def hash_directory(root: Path) -> str:
    """Deterministic sha256 over a directory tree (sorted paths, sizes, bytes)."""
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for p in files:
        rel = p.relative_to(root).as_posix().encode()
        data = p.read_bytes()
        h.update(len(rel).to_bytes(4, "little") + rel + len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel RSS high-water mark (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# --------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------


class Format:
    """One storage candidate: write() returns a ref that read*() accept."""

    name: str = "?"

    def write(self, arr: np.ndarray, store: Path) -> Any:
        raise NotImplementedError

    def read(self, ref: Any) -> np.ndarray:
        raise NotImplementedError

    def read_rows(self, ref: Any, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def open(self, ref: Any) -> Any:
        """Open a handle once, for repeated partial reads (not timed)."""
        raise NotImplementedError

    def rows_from(self, handle: Any, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def close(self, handle: Any) -> None:
        """Release a handle returned by open()."""


RawRef = tuple[Path, "np.dtype[Any]", tuple[int, ...]]


class RawFormat(Format):
    """Plain little-endian bytes; the oid is the sha256 of the tensor bytes."""

    name = "raw"

    def __init__(self, fsync: bool) -> None:
        self.fsync = fsync

    def write(self, arr: np.ndarray, store: Path) -> tuple[Path, np.dtype[Any], tuple[int, ...]]:
        oid = write_atomic(store, [le_view(arr)], self.fsync)
        # dtype/shape would live in the (small) metadata file, not the object.
        return object_path(store, oid), arr.dtype, arr.shape

    def read(self, ref: RawRef) -> np.ndarray:
        path, dtype, shape = ref
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(os.fstat(f.fileno()).st_size)
            f.readinto(buf)
        return np.frombuffer(buf, dtype=dtype).reshape(shape)

    def read_rows(self, ref: RawRef, start: int, stop: int) -> np.ndarray:
        with open(ref[0], "rb", buffering=0) as f:
            return self.rows_from((f.fileno(), ref[1], ref[2]), start, stop)

    def open(self, ref: RawRef) -> tuple[int, np.dtype[Any], tuple[int, ...]]:
        return os.open(ref[0], os.O_RDONLY), ref[1], ref[2]

    def rows_from(self, handle: tuple[int, np.dtype[Any], tuple[int, ...]], start: int, stop: int) -> np.ndarray:
        fd, dtype, shape = handle
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        buf = os.pread(fd, (stop - start) * row_bytes, start * row_bytes)
        return np.frombuffer(buf, dtype=dtype).reshape((stop - start, *shape[1:]))

    def close(self, handle: tuple[int, np.dtype[Any], tuple[int, ...]]) -> None:
        os.close(handle[0])


CODECS_V2: dict[str, dict[str, Any] | None] = {
    "none": None,
    "blosc-lz4": {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1},
    "zstd": {"id": "zstd", "level": 3},
    "blosc-zstd": {"id": "blosc", "cname": "zstd", "clevel": 3, "shuffle": 1},
}
CODECS_V3: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "blosc-lz4": [
        {
            "name": "blosc",
            "configuration": {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"},
        }
    ],
    "zstd": [{"name": "zstd", "configuration": {"level": 3}}],
    "blosc-zstd": [
        {
            "name": "blosc",
            "configuration": {"cname": "zstd", "clevel": 3, "shuffle": "shuffle"},
        }
    ],
}


def ts_dtype(dtype: np.dtype[Any], driver: str) -> str:
    if dtype == BF16:
        return "bfloat16"
    if driver == "zarr":
        return dtype.newbyteorder("<").str
    return dtype.name


@dataclass
class TensorstoreFormat(Format):
    """tensorstore zarr/zarr3; ``packing`` is ``dir`` (file kvstore) or ``zip``."""

    driver: str  # "zarr" or "zarr3"
    codec: str
    row_chunk: int | None  # None = one chunk per tensor
    packing: str  # "dir" or "zip"
    fsync: bool
    name: str = field(init=False)

    def __post_init__(self) -> None:
        version = "zarr2" if self.driver == "zarr" else "zarr3"
        chunk = "whole" if self.row_chunk is None else f"rows{self.row_chunk}"
        self.name = f"{version}-{self.packing}/{chunk}/{self.codec}"
        self.context = ts.Context({"file_io_sync": self.fsync})

    def _metadata(self, arr: np.ndarray) -> dict[str, Any]:
        chunks = list(arr.shape)
        if self.row_chunk is not None:
            chunks[0] = min(self.row_chunk, arr.shape[0])
        dtype = ts_dtype(arr.dtype, self.driver)
        if self.driver == "zarr":
            return {
                "dtype": dtype,
                "shape": list(arr.shape),
                "chunks": chunks,
                "compressor": CODECS_V2[self.codec],
                "fill_value": None,
            }
        return {
            "data_type": dtype,
            "shape": list(arr.shape),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
            "codecs": [
                {"name": "bytes", "configuration": {"endian": "little"}},
                *CODECS_V3[self.codec],
            ],
        }

    def _create(self, arr: np.ndarray, kvstore: Any, context: Any) -> None:
        spec = {
            "driver": self.driver,
            "kvstore": kvstore,
            "metadata": self._metadata(arr),
        }
        store = ts.open(spec, create=True, context=context).result()
        store.write(arr).result()

    def write(self, arr: np.ndarray, store: Path) -> Path:
        if self.packing == "dir":
            tmp = Path(tempfile.mkdtemp(dir=_mkdir(store / "tmp")))
            self._create(arr, {"driver": "file", "path": str(tmp)}, self.context)
            oid = hash_directory(tmp)
            dest = object_path(store, oid)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
            return dest
        # zip: encode in memory, pack into one deterministic stored archive.
        mem_ctx = ts.Context()
        self._create(arr, "memory://", mem_ctx)
        kv = ts.KvStore.open("memory://", context=mem_ctx).result()
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for key in sorted(kv.list().result()):
                info = zipfile.ZipInfo(key.decode(), date_time=ZIP_DATE)
                zf.writestr(info, kv.read(key).result().value)
        oid = write_atomic(store, [buf.getbuffer()], self.fsync)
        return object_path(store, oid)

    def _open(self, path: Path) -> Any:
        if self.packing == "dir":
            kvstore: dict[str, Any] = {"driver": "file", "path": str(path)}
        else:
            kvstore = {"driver": "zip", "base": {"driver": "file", "path": str(path)}}
        return ts.open({"driver": self.driver, "kvstore": kvstore}, open=True, context=self.context).result()

    def read(self, ref: Path) -> np.ndarray:
        return self._open(ref).read().result()

    def read_rows(self, ref: Path, start: int, stop: int) -> np.ndarray:
        return self._open(ref)[start:stop].read().result()

    def open(self, ref: Path) -> Any:
        return self._open(ref)

    def rows_from(self, handle: Any, start: int, stop: int) -> np.ndarray:
        return handle[start:stop].read().result()


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def build_formats(args: argparse.Namespace) -> list[Format]:
    formats: list[Format] = [RawFormat(args.fsync)]
    if ts is None:
        print("tensorstore not installed: only 'raw' is measured", file=sys.stderr)
        return formats
    rc = args.row_chunk
    combos: list[tuple[str, str, int | None, str]] = [
        ("zarr", "none", None, "dir"),
        ("zarr", "blosc-lz4", None, "dir"),
        ("zarr", "zstd", None, "dir"),
        ("zarr", "blosc-zstd", None, "dir"),
        ("zarr", "none", rc, "dir"),
        ("zarr", "blosc-lz4", rc, "dir"),
        ("zarr3", "none", None, "dir"),
        ("zarr3", "blosc-lz4", None, "dir"),
        ("zarr", "none", None, "zip"),
        ("zarr", "blosc-lz4", None, "zip"),
        ("zarr", "none", rc, "zip"),
    ]
    for driver, codec, chunk, packing in combos:
        formats.append(TensorstoreFormat(driver, codec, chunk, packing, args.fsync))
    return formats


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------


@dataclass
class Result:
    case: str
    fmt: str
    logical: int
    stored: int
    write_s: float
    read_s: float
    partial_s: float
    partial_open_s: float
    peak_extra: int | None
    n: int


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(np.frombuffer(le_view(a), np.uint8), np.frombuffer(le_view(b), np.uint8))


def verify(fmt: Format, refs: list[Any], case: Case) -> None:
    lo, hi = PARTIAL_ROWS
    for ref, t in zip(refs, case.tensors, strict=True):
        whole = fmt.read(ref)
        part = fmt.read_rows(ref, lo, hi)
        if whole.shape != t.shape or whole.dtype != t.dtype or not same_bytes(whole, t):
            raise AssertionError(f"{fmt.name}: whole read mismatch")
        handle = fmt.open(ref)
        part_open = fmt.rows_from(handle, lo, hi)
        fmt.close(handle)
        if not (same_bytes(part, t[lo:hi]) and same_bytes(part_open, t[lo:hi])):
            raise AssertionError(f"{fmt.name}: partial read mismatch")


def measure(fmt: Format, case: Case, workdir: Path, reps: int) -> Result:
    lo, hi = PARTIAL_ROWS
    writes: list[float] = []
    reads: list[float] = []
    partials: list[float] = []
    partials_open: list[float] = []
    stored = 0
    gc.collect()
    can_reset = reset_peak_rss()
    baseline = current_rss()
    for rep in range(reps):
        store = workdir / f"store-{rep}"
        refs: list[Any] = []

        def do_write(store: Path = store, refs: list[Any] = refs) -> None:
            for t in case.tensors:
                refs.append(fmt.write(t, store))

        def do_read(refs: list[Any] = refs) -> None:
            for ref in refs:
                fmt.read(ref)

        def do_partial(refs: list[Any] = refs) -> None:
            for ref in refs:
                fmt.read_rows(ref, lo, hi)

        writes.append(timed(do_write))
        stored = tree_size(store / "objects")
        reads.append(timed(do_read))
        partials.append(timed(do_partial))
        handles = [fmt.open(ref) for ref in refs]

        def do_partial_open(handles: list[Any] = handles) -> None:
            for h in handles:
                fmt.rows_from(h, lo, hi)

        partials_open.append(timed(do_partial_open))
        for h in handles:
            fmt.close(h)
        del handles
        if rep == 0:
            verify(fmt, refs, case)
        shutil.rmtree(store)
    extra = max(0, peak_rss() - baseline) if can_reset else None
    return Result(
        case=case.name,
        fmt=fmt.name,
        logical=case.nbytes,
        stored=stored,
        write_s=statistics.median(writes),
        read_s=statistics.median(reads),
        partial_s=statistics.median(partials),
        partial_open_s=statistics.median(partials_open),
        peak_extra=extra,
        n=len(case.tensors),
    )


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def machine_description(workdir: Path) -> Iterator[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    system = f"{platform.system()} {platform.release()}"
    yield f"machine: {cpu}, {os.cpu_count()} logical CPUs, {system}"
    versions = [f"python {platform.python_version()}", f"numpy {np.__version__}"]
    for pkg in ("tensorstore", "ml_dtypes"):
        try:
            versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{pkg} missing")
    yield ", ".join(versions)
    yield f"workdir: {workdir}"


def format_table(results: list[Result]) -> list[str]:
    header = [
        "case",
        "format",
        "stored MB",
        "ratio",
        "write MB/s",
        "write s/GB",
        "read MB/s",
        "read s/GB",
        "rows100:200 ms",
        "same, open ms",
        "write x raw",
        "read x raw",
        "partial x raw",
        "peak +MB",
    ]
    raw = {r.case: r for r in results if r.fmt == "raw"}
    rows: list[list[str]] = []
    for r in results:
        base = raw.get(r.case)
        gb = r.logical / GB
        rows.append(
            [
                r.case,
                r.fmt,
                f"{r.stored / MB:.1f}",
                f"{r.logical / r.stored:.3f}" if r.stored else "-",
                f"{r.logical / MB / r.write_s:.0f}",
                f"{r.write_s / gb:.2f}",
                f"{r.logical / MB / r.read_s:.0f}",
                f"{r.read_s / gb:.2f}",
                f"{1000 * r.partial_s / r.n:.3f}",
                f"{1000 * r.partial_open_s / r.n:.3f}",
                f"{r.write_s / base.write_s:.2f}" if base else "-",
                f"{r.read_s / base.read_s:.2f}" if base else "-",
                f"{r.partial_s / base.partial_s:.1f}" if base else "-",
                f"{r.peak_extra / MB:.0f}" if r.peak_extra is not None else "n/a",
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, c in enumerate(cells):
            out.append(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]))
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" if i >= 2 else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return [line(header), sep, *(line(r) for r in rows)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Measure raw bytes vs tensorstore zarr as the per-tensor object.",
    )
    p.add_argument(
        "--tensors",
        type=int,
        default=48,
        help="tensors in the *-random cases (default 48)",
    )
    p.add_argument(
        "--extra-tensors",
        type=int,
        default=16,
        help="tensors in the fine-tuned and sparse cases (default 16)",
    )
    p.add_argument("--rows", type=int, default=1024, help="rows per tensor (default 1024)")
    p.add_argument("--cols", type=int, default=1024, help="columns per tensor (default 1024)")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the median is reported")
    p.add_argument("--row-chunk", type=int, default=64, help="rows per chunk for rowsN variants")
    p.add_argument("--cases", help="comma-separated subset of cases")
    p.add_argument("--formats", help="comma-separated substrings; keep formats matching any")
    p.add_argument("--fsync", action="store_true", help="fsync every object (raw and tensorstore)")
    p.add_argument("--dir", type=Path, help="scratch directory (default: a new temp dir)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (4 x 256x1024, 1 rep)")
    args = p.parse_args(argv)
    if args.quick:
        args.tensors, args.extra_tensors, args.rows, args.cols, args.reps = (
            4,
            4,
            256,
            1024,
            1,
        )
    if args.rows < PARTIAL_ROWS[1]:
        p.error(f"--rows must be >= {PARTIAL_ROWS[1]} for the partial-read test")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    selected = set(args.cases.split(",")) if args.cases else None
    cases = make_cases(args.tensors, args.extra_tensors, args.rows, args.cols, selected)
    formats = build_formats(args)
    if args.formats:
        wanted = [w.strip() for w in args.formats.split(",") if w.strip()]
        formats = [f for f in formats if f.name == "raw" or any(w in f.name for w in wanted)]
    workdir = Path(tempfile.mkdtemp(prefix="objfmt-", dir=args.dir))
    results: list[Result] = []
    try:
        for case in cases:
            print(
                f"# {case.name}: {case.description} = {case.nbytes / MB:.1f} MB",
                file=sys.stderr,
            )
            for fmt in formats:
                res = measure(fmt, case, workdir, args.reps)
                results.append(res)
                print(
                    f"  {fmt.name:<28} write {res.write_s:6.3f}s "
                    f"read {res.read_s:6.3f}s partial {res.partial_s:6.3f}s "
                    f"stored {res.stored / MB:7.1f} MB",
                    file=sys.stderr,
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for line in machine_description(workdir):
        print(line)
    print(
        f"run: {args.tensors}/{args.extra_tensors} tensors x {args.rows}x{args.cols}, "
        f"median of {args.reps}, row chunk {args.row_chunk}, fsync={args.fsync}, "
        f"total {time.perf_counter() - t_start:.0f}s"
    )
    print()
    for case in cases:
        print(f"- {case.name}: {case.description} = {case.nbytes / MB:.1f} MB")
    print()
    print("\n".join(format_table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
