"""The compiled linear-combination kernel (merge/_lincomb.c via merge/fused.py): built by the install, equal to
the numpy path bit for bit on every F32/BF16 combination and on edge values, safe with bad buffers; its file
loop (the kernel reading and writing files itself) equal to the in-memory kernel, naming the file and tensor
when a read or write fails; and merges over files (ranges on several threads) and over the object store (two
helper threads) changing no byte and losing no error."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from merge_helpers import family, write_files
from safetensors.torch import load_file

from gittheta_merge.errors import ThetaError
from gittheta_merge.merge import fused, npkernels
from gittheta_merge.merge.api import merge_files
from gittheta_merge.merge.buffers import Pool
from gittheta_merge.merge.strategies.average import Average
from gittheta_merge.merge.strategies.base import Chunk, StatsAccess
from gittheta_merge.merge.strategies.task_arithmetic import TaskArithmetic


def test_kernel_is_built() -> None:
    """The install compiles it (setup.py); a missing build would silently fall back to numpy, so say so here."""
    assert fused.available(), f"compiled merge kernel not loaded: {fused.unavailable_reason()}"


def _edge_bits(n: int, seed: int) -> np.ndarray:
    """float32 bit patterns: random normals and random bits (every exponent), with NaNs of both signs and odd
    payloads, infinities, signed zeros, subnormals, the largest finite values and bf16 rounding ties."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 0.05).astype(np.float32).view(np.uint32)
    wild = rng.integers(0, 2**32, n // 4, dtype=np.uint64).astype(np.uint32)
    x[rng.choice(n, n // 4, replace=False)] = wild
    special = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7F800000, 0xFF800000, 0, 0x80000000,
                        0x00000001, 0x807FFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x3F808000, 0x3F818000,
                        0x3F80FFFF, 0x3F817FFF, 0x00008000, 0x80018000], np.uint32)
    x[rng.choice(n, min(n, 3 * len(special)), replace=False)] = np.resize(special, min(n, 3 * len(special)))
    return x


def _raw(bits: np.ndarray, dtype: str) -> np.ndarray:
    """float32 bit patterns -> stored bytes of `dtype` (bf16: the numpy path's own rounding)."""
    x = bits.view(np.float32)
    if dtype == "F32":
        return x.copy().view(np.uint8)
    return np.ascontiguousarray(npkernels.from_f32(x, "BF16", Pool())).view(np.uint8).copy()


def _numpy_path(strat, raws, base_raw, out_dtype: str, n: int) -> np.ndarray:
    """What the numpy path writes: upcast, strat.merge_np, cast back."""
    def up(raw, dtype):
        out = np.empty(n, np.float32)
        return npkernels.to_f32(raw, dtype, out)

    models = [up(r, d) for r, d in raws]
    base = up(*base_raw) if base_raw is not None else None
    chunk = Chunk("t", [n], 0, n, base, models, StatsAccess(), {})
    merged = strat.merge_np(chunk)
    return np.ascontiguousarray(npkernels.from_f32(merged, out_dtype, Pool())).view(np.uint8)


STRATEGIES = [
    (Average, {}, 2), (Average, {"weights": [0.3, 1.7, 0.9]}, 3), (Average, {"weights": [1, 1], "normalize": False}, 2),
    (Average, {"weights": [2, -1, 1], "normalize": False}, 3), (TaskArithmetic, {}, 2),
    (TaskArithmetic, {"lambda": 0.37, "weights": [0.7, 0.2, 1.1]}, 3), (TaskArithmetic, {"lambda": 1.0}, 3),
]


@pytest.mark.parametrize("cls,params,m", STRATEGIES)
@pytest.mark.parametrize("in_dtypes,out_dtype", [("BF16", "BF16"), ("F32", "F32"), ("F32", "BF16"), ("BF16", "F32"),
                                                 ("mixed", "BF16"), ("mixed", "F32")])
@pytest.mark.parametrize("n", [0, 1, 2047, 5003])
def test_kernel_equals_numpy_path_bit_for_bit(cls, params, m, in_dtypes, out_dtype, n) -> None:
    strat = cls(params, m)
    spec = strat.lincomb()
    dts = ["BF16" if (in_dtypes == "BF16" or (in_dtypes == "mixed" and i % 2 == 0)) else "F32" for i in range(m + 1)]
    raws = [(_raw(_edge_bits(n, seed=i), dts[i]), dts[i]) for i in range(m)]
    base_raw = (_raw(_edge_bits(n, seed=99), dts[m]), dts[m]) if strat.needs_base else None
    want = _numpy_path(strat, raws, base_raw, out_dtype, n)
    out = np.empty(n, np.float32 if out_dtype == "F32" else np.uint16)
    got = fused.run(spec, raws, base_raw, out, out_dtype, n)
    if out_dtype == "BF16":  # NaNs are canonical (0x7FC0) in bf16: every byte equal
        assert got.view(np.uint8).tobytes() == want.tobytes()
    else:  # F32 keeps NaN payloads, and which of two NaN operands an add returns is the compiler's choice
        g, w = got.view(np.float32), want.view(np.float32)
        assert np.array_equal(np.isnan(g), np.isnan(w))
        assert np.array_equal(g.view(np.uint32)[~np.isnan(w)], w.view(np.uint32)[~np.isnan(w)])


def test_kernel_handles_exactly_n_elements_of_larger_buffers() -> None:
    """Pooled buffers are often larger than the chunk: only the first n elements are read and written."""
    a, b = (_raw(_edge_bits(300, seed=s), "BF16") for s in (1, 2))
    out = np.full(400, 0xABCD, np.uint16)
    fused.run(fused.LinComb((0.5, 0.5)), [(a, "BF16"), (b, "BF16")], None, out, "BF16", 200)
    want = _numpy_path(Average({}, 2), [(a[:400], "BF16"), (b[:400], "BF16")], None, "BF16", 200)
    assert out[:200].view(np.uint8).tobytes() == want.tobytes()
    assert (out[200:] == 0xABCD).all()


def test_kernel_refuses_bad_buffers() -> None:
    """The C side indexes raw pointers, so every size and kind is checked before the call."""
    a = np.zeros(20, np.uint8)  # 10 bf16
    out = np.empty(10, np.uint16)
    spec = fused.LinComb((1.0, 1.0))
    with pytest.raises(ValueError, match="for 11 BF16"):
        fused.run(spec, [(a, "BF16"), (a, "BF16")], None, out, "BF16", 11)
    with pytest.raises(ValueError, match="for 10 F32"):
        fused.run(spec, [(a, "F32"), (a, "BF16")], None, out, "BF16", 10)
    with pytest.raises(ValueError, match="3 inputs for 2 scales"):
        fused.run(spec, [(a, "BF16")] * 3, None, out, "BF16", 10)
    with pytest.raises(ValueError, match="base"):
        fused.run(spec, [(a, "BF16")] * 2, (a, "BF16"), out, "BF16", 10)
    with pytest.raises(ValueError, match="no F16"):
        fused.run(spec, [(a, "F16")] * 2, None, out, "BF16", 10)
    with pytest.raises(ValueError, match="read-only"):
        ro = np.empty(10, np.uint16)
        ro.flags.writeable = False
        fused.run(spec, [(a, "BF16")] * 2, None, ro, "BF16", 10)
    with pytest.raises(ValueError, match="bytes for"):
        fused.run(spec, [(a[::2], "BF16"), (a, "BF16")], None, out, "BF16", 5)  # not contiguous


def _spans(tmp_path: Path, arrays: list[tuple[np.ndarray, str]], pad: int) -> list[fused.FileSpan]:
    """Each raw array written after `pad` bytes of junk in a file of its own, as an open file span."""
    spans = []
    for i, (raw, dtype) in enumerate(arrays):
        path = tmp_path / f"in{i}.bin"
        path.write_bytes(b"\xee" * pad + raw.tobytes() + b"\xdd" * 3)
        spans.append(fused.FileSpan(os.open(path, os.O_RDONLY), pad, dtype, f"{path.name}: tensor 't'"))
    return spans


@pytest.mark.parametrize("cls,params,m", [STRATEGIES[1], STRATEGIES[5]])
@pytest.mark.parametrize("in_dtypes,out_dtype", [("BF16", "BF16"), ("mixed", "F32")])
@pytest.mark.parametrize("n,step", [(0, 4), (1, 4), (5003, 7), (5003, 2048), (5003, 1 << 18)])
def test_file_loop_equals_in_memory_kernel(tmp_path: Path, cls, params, m, in_dtypes, out_dtype, n, step) -> None:
    """fused.run_files (the kernel reading `step` elements of each input from its file, combining and writing
    them) writes exactly the bytes fused.run computes in memory (itself checked against the numpy path above),
    at the output offset, touching nothing around it; steps that do not divide n included."""
    strat = cls(params, m)
    spec = strat.lincomb()
    dts = ["BF16" if (in_dtypes == "BF16" or i % 2 == 0) else "F32" for i in range(m + 1)]
    raws = [(_raw(_edge_bits(n, seed=10 + i), dts[i]), dts[i]) for i in range(m)]
    base_raw = (_raw(_edge_bits(n, seed=77), dts[m]), dts[m]) if strat.needs_base else None
    want = np.empty(n, np.float32 if out_dtype == "F32" else np.uint16)
    fused.run(spec, raws, base_raw, want, out_dtype, n)
    spans = _spans(tmp_path, [*raws, *([base_raw] if base_raw else [])], pad=13)
    out_path = tmp_path / "out.bin"
    out_path.write_bytes(b"\x11" * 5)
    out_fd = os.open(out_path, os.O_WRONLY)
    try:
        fused.run_files(spec, spans[:m], spans[m] if base_raw else None,
                        fused.FileSpan(out_fd, 5, out_dtype, "out.bin: tensor 't'"), n, step)
    finally:
        for sp in [*spans, fused.FileSpan(out_fd, 0, "F32", "")]:
            os.close(sp.fd)
    got = out_path.read_bytes()
    assert got[:5] == b"\x11" * 5 and len(got) == 5 + want.nbytes
    assert got[5:] == want.tobytes()  # F32 too: the same compiled arithmetic, NaN payloads included


def test_file_loop_names_the_file_and_tensor_that_failed(tmp_path: Path) -> None:
    """A file that ends early, an unreadable input or an unwritable output is an error naming which one (not a
    crash and not zeros): the C side reports the failing input and errno, fused.py the span's label."""
    a, b = (_raw(_edge_bits(1000, seed=s), "BF16") for s in (3, 4))
    spans = _spans(tmp_path, [(a, "BF16"), (b[:1200], "BF16")], pad=0)  # the second holds 600 of 1000 elements
    out_fd = os.open(tmp_path / "out.bin", os.O_WRONLY | os.O_CREAT)
    ro_fd = os.open(tmp_path / "in0.bin", os.O_RDONLY)
    spec = fused.LinComb((0.5, 0.5))
    out = fused.FileSpan(out_fd, 0, "BF16", "out.bin: tensor 't'")
    try:
        with pytest.raises(ThetaError, match=r"in1.bin: tensor 't': read failed \(file ended early\)"):
            fused.run_files(spec, spans, None, out, 1000, 256)
        bad = fused.FileSpan(out_fd, 0, "BF16", "in0.bin: tensor 't'")  # write-only: reading it fails
        with pytest.raises(ThetaError, match=r"in0.bin: tensor 't': read failed \(Bad file descriptor\)"):
            fused.run_files(spec, [bad, spans[1]], None, out, 100, 256)
        with pytest.raises(ThetaError, match=r"out.bin: tensor 't': write failed \(Bad file descriptor\)"):
            fused.run_files(spec, spans, None, fused.FileSpan(ro_fd, 0, "BF16", "out.bin: tensor 't'"), 100, 256)
        with pytest.raises(ValueError, match="no F16"):
            fused.run_files(spec, [spans[0], fused.FileSpan(spans[1].fd, 0, "F16", "x")], None, out, 10, 4)
        with pytest.raises(ValueError, match="3 inputs for 2 scales"):
            fused.run_files(spec, [spans[0]] * 3, None, out, 10, 4)
    finally:
        for fd in (spans[0].fd, spans[1].fd, out_fd, ro_fd):
            os.close(fd)


SHAPES = {"emb.weight": (301, 37), "l0.weight": (64, 48), "l0.bias": (64,), "scale": (), "empty": (0, 4)}


def _set_chunk(monkeypatch, nbytes: int) -> None:
    for cls in (Average, TaskArithmetic):
        monkeypatch.setattr(cls, "chunk_bytes", nbytes)


def _small_file_ranges(monkeypatch, threads: int = 3) -> None:
    """The file loop with tiny steps and ranges, so even these small tensors split over `threads` threads."""
    from gittheta_merge.merge import runner

    monkeypatch.setattr(runner, "FILE_STEP_ELEMS", 37)
    monkeypatch.setattr(runner, "FILE_PART_MIN_ELEMS", 50)
    monkeypatch.setattr(runner, "worker_threads", lambda: threads)


@pytest.mark.parametrize("strategy,params", [("average", {"weights": [0.2, 0.5, 0.3]}),
                                             ("task_arithmetic", {"lambda": 0.8})])
def test_merge_files_file_loop_equals_numpy_and_torch_paths(tmp_path: Path, monkeypatch, strategy, params) -> None:
    """Over plain files the kernel reads and writes itself, each large tensor cut into ranges on three threads
    (one thread with prefetch off): the file equals the numpy path's and the torch path's byte for byte. A
    model with one F16 tensor among BF16 ones merges that tensor on numpy ("compiled+numpy")."""
    _small_file_ranges(monkeypatch)
    base, models = family(3, seed=41, dtype=torch.bfloat16, shapes=SHAPES)
    for t in [base, *models]:
        t["l0.bias"] = t["l0.bias"].to(torch.float16)
    bpath, paths = write_files(tmp_path, base, models)
    outs = {}
    kernels = {"compiled": "compiled+numpy", "serial": "compiled+numpy", "numpy": "numpy", "torch": "torch"}
    for tag, kw in (("compiled", {}), ("numpy", {"fused_kernel": False}), ("serial", {"prefetch": False}),
                    ("torch", {"numpy_kernels": False})):
        rep = merge_files(paths, tmp_path / f"{tag}.safetensors", base=bpath, strategy=strategy, params=params, **kw)
        outs[tag] = (tmp_path / f"{tag}.safetensors").read_bytes()
        assert rep["kernels"] == kernels[tag], tag
    assert outs["compiled"] == outs["numpy"] == outs["serial"] == outs["torch"]
    assert load_file(str(tmp_path / "compiled.safetensors"))["l0.bias"].dtype == torch.float16


def test_input_truncated_during_a_merge_fails_cleanly(tmp_path: Path, monkeypatch) -> None:
    """An input cut short while the merge runs (after it was opened and checked) fails the merge with the file
    and tensor named, after every thread has stopped, and leaves neither the output nor its temporary file."""
    _small_file_ranges(monkeypatch)
    base, models = family(2, seed=42, dtype=torch.bfloat16, shapes=SHAPES)
    bpath, paths = write_files(tmp_path, base, models)
    real = fused.run_files
    calls = {"n": 0}

    def truncating(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.truncate(paths[1], os.path.getsize(paths[1]) // 2)
        return real(*args, **kwargs)

    monkeypatch.setattr(fused, "run_files", truncating)
    out = tmp_path / "out" / "merged.safetensors"
    with pytest.raises(ThetaError, match=rf"{Path(paths[1]).name}: tensor '[^']+': read failed \(file ended early\)"):
        merge_files(paths, out, base=bpath, strategy="task_arithmetic")
    assert calls["n"] >= 3
    assert not out.exists() and os.listdir(out.parent) == []


def _fail_nth_read(monkeypatch, source_cls, n: int) -> dict[str, int]:
    """The n-th read_into of any source of this class raises; returns the live call count."""
    calls = {"n": 0}
    real = source_cls.read_into

    def flaky(self, name, start, end, out):
        calls["n"] += 1
        if calls["n"] == n:
            raise ThetaError(f"tensor {name!r}: simulated read failure")
        return real(self, name, start, end, out)

    monkeypatch.setattr(source_cls, "read_into", flaky)
    return calls


def _info(name: str, shape: tuple[int, ...], dtype: str = "BF16"):
    from gittheta_merge.merge.sources import TensorInfo

    return TensorInfo(name, dtype, shape, None)


def test_file_sink_takes_tensors_written_through_their_span(tmp_path: Path) -> None:
    """A tensor written through file_span (after the next one was written in order) lands at its offset; the
    file equals safetensors' own."""
    from safetensors.numpy import save_file

    from gittheta_merge.merge.sinks import SafetensorsSink

    rng = np.random.default_rng(5)
    tensors = {"a": rng.standard_normal((7, 3)).astype(np.float32), "b": rng.standard_normal((5,)).astype(np.float32)}
    sink = SafetensorsSink(tmp_path / "out.safetensors", {"k": "v"})
    sink.start([_info(k, v.shape, "F32") for k, v in tensors.items()])
    sink.begin(_info("b", (5,), "F32"))
    sink.write(tensors["b"])
    fd, offset, what = sink.file_span("a")
    assert what.endswith("tensor 'a'")
    os.pwrite(fd, tensors["a"].tobytes(), offset)
    sink.span_written("a")
    sink.finish()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"k": "v"})
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_file_sink_refuses_missing_bytes(tmp_path: Path) -> None:
    """A merge that skipped a tensor must not save a file with a hole of zeros."""
    from gittheta_merge.merge.sinks import SafetensorsSink

    out = tmp_path / "out.safetensors"
    sink = SafetensorsSink(out)
    sink.start([_info("a", (4, 2)), _info("b", (3,))])
    sink.begin(_info("a", (4, 2)))
    sink.write(np.zeros(8, np.uint16))
    with pytest.raises(ThetaError, match="6 bytes of the merged file were not written"):
        sink.finish()
    sink.abort()
    assert os.listdir(tmp_path) == []


def test_object_store_with_two_helpers_verifies_in_order_and_fails_cleanly(tmp_path: Path, monkeypatch) -> None:
    """Over stored objects the two helpers take turns per source (hash verification reads each block front to
    back): the result equals one thread's, every input block is verified (a flipped byte in the middle of a
    block is caught), and a read failing in one helper ends the merge instead of leaving the other waiting."""
    from merge_helpers import flip_byte, from_meta, to_meta

    from gittheta_merge.merge.api import merge_metadata
    from gittheta_merge.merge.plan import MergeOptions
    from gittheta_merge.merge.sources import StoreSource
    from gittheta_merge.storage.store import CorruptObject, ObjectStore

    _set_chunk(monkeypatch, 256)  # 64 bf16 elements per chunk: many chunks per 2 KB block
    store = ObjectStore(tmp_path / "lfs")
    base, models = family(3, seed=43, dtype=torch.bfloat16, shapes=SHAPES)
    metas = [to_meta(m, store, block_bytes=2048) for m in models]
    bmeta = to_meta(base, store, block_bytes=2048)
    opts = {"strategy": "task_arithmetic", "params": {"lambda": 0.6}}
    serial, _ = merge_metadata(metas, bmeta, store, MergeOptions(**opts, prefetch=False))
    ahead, rep = merge_metadata(metas, bmeta, store, MergeOptions(**opts))
    assert rep.report["kernels"] == "compiled"
    want, got = from_meta(serial, store), from_meta(ahead, store)
    assert all(torch.equal(got[k], want[k]) for k in want)

    oid = metas[1].by_name()["emb.weight"].oids[2]
    flip_byte(store, oid, store.size(oid) // 2, 0x10)
    with pytest.raises(CorruptObject, match="emb.weight"):
        merge_metadata(metas, bmeta, store, MergeOptions(**opts))
    flip_byte(store, oid, store.size(oid) // 2, 0x10)

    _fail_nth_read(monkeypatch, StoreSource, 40)
    with pytest.raises(ThetaError, match="simulated read failure"):
        merge_metadata(metas, bmeta, store, MergeOptions(**opts))


def test_in_order_turns_release_only_chunks_after_the_failed_one() -> None:
    """Chunk 1's read fails before chunk 0 has read this source: chunk 0 still reads it (its result is what the
    caller takes first, and it must not get chunk 1's failure in place of its own data), while chunk 2, waiting
    for chunk 1's turn that never comes, is released with an error instead of hanging."""
    import threading

    from gittheta_merge.merge.runner import _InOrder

    turn = _InOrder()
    outcome: dict[str, object] = {}

    def chunk2() -> None:
        try:
            with turn.of(2):
                outcome["2"] = "read"
        except ThetaError as exc:
            outcome["2"] = str(exc)

    waiter = threading.Thread(target=chunk2)
    waiter.start()
    turn.abandon(1)
    waiter.join(timeout=10)
    assert not waiter.is_alive() and outcome["2"] == "an earlier chunk's read failed"
    with turn.of(0):  # chunk 0 reads this source after chunk 1 failed elsewhere
        outcome["0"] = "read"
    assert outcome["0"] == "read"
    with pytest.raises(ThetaError, match="earlier chunk"):
        with turn.of(3):
            pass
