"""The object store: content addressing, dedup, atomic writes, verification, path safety."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from gittheta_merge.errors import ThetaError
from gittheta_merge.store import CorruptObject, MissingObject, ObjectStore


def test_put_is_content_addressed_in_git_lfs_layout(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "lfs")
    data = b"tensor bytes" * 1000
    oid, new = store.put(data)
    assert oid == hashlib.sha256(data).hexdigest()
    assert new
    assert store.path(oid) == tmp_path / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
    assert store.path(oid).read_bytes() == data
    assert store.put(data) == (oid, False)  # stored once
    assert list(store.iter_oids()) == [oid]
    assert not any((tmp_path / "lfs" / "tmp").iterdir())  # no temp files left behind


def test_put_stream_matches_put(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "lfs")
    data = bytes(range(256)) * 50_000
    oid, new = store.put_stream(io.BytesIO(data), len(data))
    assert new and oid == hashlib.sha256(data).hexdigest()
    with pytest.raises(ThetaError, match="early"):
        store.put_stream(io.BytesIO(data[:100]), 200)
    assert not any((tmp_path / "lfs" / "tmp").iterdir())


def test_reads_verify_hash_and_size(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "lfs")
    oid, _ = store.put(b"x" * 4096)
    assert store.read(oid, 4096) == b"x" * 4096
    assert store.read(oid, 4096, offset=100, length=10) == b"x" * 10
    path = store.path(path_oid := oid)
    path.chmod(0o644)
    path.write_bytes(b"y" * 4096)  # same size, different content
    with pytest.raises(CorruptObject, match="corrupt"):
        store.read(path_oid, 4096)
    assert not store.verify(oid)
    with pytest.raises(CorruptObject, match="metadata implies"):
        store.read(oid, 100)
    with pytest.raises(MissingObject, match="missing"):
        store.read("c" * 64, 10)


@pytest.mark.parametrize("oid", ["../" * 5 + "etc/passwd", "A" * 64, "a" * 63, 42])
def test_rejects_unsafe_oids(tmp_path: Path, oid: object) -> None:
    store = ObjectStore(tmp_path / "lfs")
    with pytest.raises(ThetaError, match="invalid object id"):
        store.path(oid)  # type: ignore[arg-type]
