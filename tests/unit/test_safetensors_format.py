"""safetensors plugin: streamed clean, byte-exact smudge, every dtype, and bad input."""

from __future__ import annotations

import io
import json
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file
from tensor_helpers import ALL_DTYPES, make_tensor

from gittheta_merge import formats
from gittheta_merge.errors import ThetaError
from gittheta_merge.formats.base import Context
from gittheta_merge.formats.safetensors_format import SafetensorsFormat
from gittheta_merge.storage.store import ObjectStore


def round_trip(tmp_path: Path, data: bytes, block: int = 64 << 20):
    store = ObjectStore(tmp_path / "lfs")
    ctx = Context("model.safetensors", store, block, str(tmp_path))
    fmt = SafetensorsFormat()
    meta = fmt.clean(io.BytesIO(data), ctx)
    out = io.BytesIO()
    fmt.smudge(meta, out, ctx)
    return meta, out.getvalue(), store


def test_every_dtype_is_byte_exact(tmp_path: Path) -> None:
    state = {f"t_{str(d).split('.')[-1]}": make_tensor(d, (17, 5), i) for i, d in enumerate(ALL_DTYPES)}
    state["scalar"] = torch.tensor(3.5)
    state["empty"] = torch.zeros(0, 4)
    state["vector"] = torch.arange(7, dtype=torch.int32)
    data = save(state, metadata={"format": "pt", "zeta": "1", "alpha": "ünïcode"})
    meta, rebuilt, _ = round_trip(tmp_path, data)
    assert rebuilt == data
    assert "header_oid" not in meta.file  # the header was regenerated, not stored
    assert {t.dtype for t in meta.tensors} >= {"BF16", "F8_E4M3", "F8_E5M2", "BOOL", "U64"}


def test_row_blocks_for_large_tensors(tmp_path: Path) -> None:
    state = {"emb": make_tensor(torch.bfloat16, (1000, 64)), "small": make_tensor(torch.float32, (3,))}
    data = save(state)
    meta, rebuilt, store = round_trip(tmp_path, data, block=10_000)
    assert rebuilt == data
    emb = meta.by_name()["emb"]
    assert len(emb.blocks) == 13 and sum(r for _, r in emb.blocks) == 1000
    assert all(store.size(o) <= 10_000 for o in emb.oids)


def test_large_blocks_stored_on_the_helper_thread_are_exact(tmp_path: Path, monkeypatch) -> None:
    """Blocks of 1 MiB and more are hashed and stored on a helper thread while the next is read (two buffers
    taking turns), small ones at once: every block's object holds exactly its bytes, in order, the file
    rebuilds byte for byte, and a put failing on the helper fails the clean."""
    import hashlib

    state = {"a": make_tensor(torch.float32, (1200, 700), 1), "b": make_tensor(torch.float32, (3,), 2),
             "c": make_tensor(torch.bfloat16, (900, 1000), 3), "d": make_tensor(torch.int8, (5, 5), 4)}
    data = save(state)
    real = ObjectStore.put
    threads: list[str] = []

    def recording(self, data):
        threads.append(threading.current_thread().name)
        return real(self, data)

    monkeypatch.setattr(ObjectStore, "put", recording)
    meta, rebuilt, store = round_trip(tmp_path, data, block=2 << 20)
    assert rebuilt == data
    assert sum(name.startswith("theta-put") for name in threads) == 3  # a's two blocks and c's one
    for t in meta.tensors:
        want = state[t.name].contiguous().view(torch.uint8).numpy().tobytes() if state[t.name].numel() else b""
        got = b"".join(store.path(o).read_bytes() for o in t.oids)
        assert got == want and all(hashlib.sha256(store.path(o).read_bytes()).hexdigest() == o for o in t.oids)
    assert len(meta.by_name()["a"].blocks) == 2 and len(meta.by_name()["c"].blocks) == 1

    calls = {"n": 0}

    def failing(self, data):  # the second large block, stored on the helper thread
        calls["n"] += len(data) >= 1 << 20
        if calls["n"] == 2 and len(data) >= 1 << 20:
            assert threading.current_thread().name.startswith("theta-put")
            raise ThetaError("disk full (simulated)")
        return real(self, data)

    monkeypatch.setattr(ObjectStore, "put", failing)
    with pytest.raises(ThetaError, match="disk full"):
        round_trip(tmp_path / "again", data, block=2 << 20)


def test_nonstandard_header_is_kept_exactly(tmp_path: Path) -> None:
    """A writer with its own key order and padding still checks out byte-identical."""
    a = make_tensor(torch.float32, (2, 3))
    b = make_tensor(torch.int16, (4,))
    header = {"b": {"dtype": "I16", "shape": [4], "data_offsets": [24, 32]},
              "__metadata__": {"x": "y"},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    raw = json.dumps(header, indent=1).encode() + b"\n"
    data = struct.pack("<Q", len(raw)) + raw + a.numpy().tobytes() + b.numpy().tobytes()
    meta, rebuilt, _ = round_trip(tmp_path, data)
    assert rebuilt == data
    assert "header_oid" in meta.file
    assert [t.name for t in meta.tensors] == ["a", "b"]  # data order


def test_header_order_differing_from_data_order(tmp_path: Path) -> None:
    header = {"b": {"dtype": "U8", "shape": [2], "data_offsets": [3, 5]},
              "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    data = struct.pack("<Q", len(raw)) + raw + b"abcde"
    meta, rebuilt, _ = round_trip(tmp_path, data)
    assert rebuilt == data
    assert meta.file["header_order"] == ["b", "a"] and "header_oid" not in meta.file


def good_file() -> bytes:
    return save({"w": make_tensor(torch.float32, (8, 8)), "b": make_tensor(torch.float32, (8,))})


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d[: len(d) - 10], "truncated"),
        (lambda d: d[:20], "truncated"),
        (lambda d: d + b"extra", "after the last tensor"),
        (lambda d: struct.pack("<Q", 10**12) + d[8:], "implausible"),
        (lambda d: d.replace(b'"shape":[8,8]', b'"shape":[9,8]'), "needs"),
        (lambda d: d.replace(b'"F32"', b'"Q32"', 1), "unknown dtype"),
        (lambda d: d[:8] + b"[" + d[9:], "not valid JSON"),
    ],
)
def test_bad_input_names_file_and_problem(tmp_path: Path, mutate, message: str) -> None:
    with pytest.raises(ThetaError, match=message) as info:
        round_trip(tmp_path, mutate(good_file()))
    assert "model.safetensors" in str(info.value)


def test_overlapping_offsets_rejected(tmp_path: Path) -> None:
    header = {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
              "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}
    raw = json.dumps(header).encode()
    with pytest.raises(ThetaError, match="overlapping or gapped"):
        round_trip(tmp_path, struct.pack("<Q", len(raw)) + raw + b"x" * 6)


def test_detection_by_magic_and_extension(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, tmp_path / "m.safetensors")
    head = (tmp_path / "m.safetensors").read_bytes()[:64]
    assert formats.detect("weights.unknownext", head).name == "safetensors"
    torch.save({"w": torch.zeros(2)}, tmp_path / "m.pt")
    assert formats.detect("m.pt", (tmp_path / "m.pt").read_bytes()[:64]).name == "pytorch"
    with pytest.raises(ThetaError, match="not a checkpoint"):
        formats.detect("notes.txt", b"hello world, this is text")
