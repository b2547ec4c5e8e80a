"""The BLAKE3 -> sha256 cache of the object store (storage/fastindex.py): a block stored before is recognised
without sha256, and a missing, corrupted or wrong cache changes no result."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from gittheta_merge.storage import store as store_mod
from gittheta_merge.storage.store import ObjectStore

pytest.importorskip("blake3")


@pytest.fixture
def sha256_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = hashlib.sha256

    def counting(data: bytes = b"", *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(len(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(store_mod.hashlib, "sha256", counting)
    return calls


def test_a_block_stored_before_is_recognised_without_sha256(tmp_path: Path, sha256_calls: list[int]) -> None:
    block = os.urandom(1 << 20)
    oid, new = ObjectStore(tmp_path / "lfs").put(block)
    assert new and oid == hashlib.new("sha256", block).hexdigest() and sha256_calls == [1 << 20]
    again = ObjectStore(tmp_path / "lfs")  # a new process: the cache is read from disk
    assert again.put(block) == (oid, False)
    assert sha256_calls == [1 << 20]  # no second sha256
    small = os.urandom(1000)  # below FAST_MIN_BYTES: always sha256, no record
    again.put(small)
    again.put(small)
    assert sha256_calls[1:] == [1000, 1000]


def test_a_missing_or_corrupted_cache_changes_nothing(tmp_path: Path, sha256_calls: list[int]) -> None:
    lfs = tmp_path / "lfs"
    blocks = [os.urandom(300 << 10) for _ in range(3)]
    oids = [ObjectStore(lfs).put(b)[0] for b in blocks]
    cache = lfs / "theta-fastindex"
    raw = bytearray(cache.read_bytes())
    raw[5] ^= 0xFF  # the first record's checksum no longer matches: skipped
    cache.write_bytes(bytes(raw))
    sha256_calls.clear()
    assert [ObjectStore(lfs).put(b)[0] for b in blocks] == oids
    assert len(sha256_calls) == 1  # only the corrupted record's block was hashed again
    cache.unlink()
    assert [ObjectStore(lfs).put(b) for b in blocks] == [(o, False) for o in oids]


def test_a_record_naming_a_missing_or_other_sized_object_is_not_believed(tmp_path: Path) -> None:
    lfs = tmp_path / "lfs"
    block = os.urandom(512 << 10)
    store = ObjectStore(lfs)
    oid, _ = store.put(block)
    store.delete(oid)  # as gc would
    assert ObjectStore(lfs).put(block) == (oid, True)  # written again, not assumed present
    assert ObjectStore(lfs).verify(oid)


def _read_overlapped(store: ObjectStore, oid: str, size: int) -> bytes:
    verifier = store.overlapped_verifier()
    try:
        out = b"".join(bytes(p) for p in verifier.iter_object(oid, size))
        verifier.check()
    finally:
        verifier.close()
    return out


def test_reads_of_recorded_objects_are_verified_by_blake3_and_catch_corruption(
        tmp_path: Path, sha256_calls: list[int]) -> None:
    from gittheta_merge.storage.store import CorruptObject

    lfs = tmp_path / "lfs"
    block = os.urandom(1 << 20)
    oid, _ = ObjectStore(lfs).put(block)
    sha256_calls.clear()
    assert _read_overlapped(ObjectStore(lfs), oid, len(block)) == block
    assert sha256_calls == []  # verified by the recorded BLAKE3 hash
    path = ObjectStore(lfs).path(oid)
    os.chmod(path, 0o644)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1  # one bit, same size
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptObject, match=oid[:12]):
        _read_overlapped(ObjectStore(lfs), oid, len(block))
    (lfs / "theta-fastindex").unlink()  # without the cache: sha256, the same verdict
    with pytest.raises(CorruptObject, match=oid[:12]):
        _read_overlapped(ObjectStore(lfs), oid, len(block))
    assert sha256_calls
