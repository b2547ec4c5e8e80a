"""The object store: content addressing, dedup, atomic writes, verification, path safety."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from gittheta_merge.errors import ThetaError
from gittheta_merge.storage.store import CorruptObject, MissingObject, ObjectStore


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


def test_overlapped_verifier_yields_the_bytes_and_reports_corruption_at_the_end(tmp_path: Path) -> None:
    """The smudge's verifier: the same bytes as iter_verified (tiny pieces, so its ring of buffers is reused
    many times while the helper thread hashes), and a corrupt object among good ones does not stop the stream
    but fails check() with the object and tensor named; a wrong size fails at once."""
    store = ObjectStore(tmp_path / "lfs")
    blobs = [bytes(range(256)) * k for k in (0, 1, 3, 40)] + [b"\x07" * 1001]
    oids = [store.put(b)[0] for b in blobs]
    verifier = store.overlapped_verifier()
    verifier.chunk = 7
    got = [b"".join(bytes(p) for p in verifier.iter_object(o, len(b), "t: ")) for o, b in zip(oids, blobs)]
    verifier.check()
    assert got == blobs

    path = store.path(oids[3])
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[500] ^= 1
    path.write_bytes(bytes(data))
    verifier = store.overlapped_verifier()
    verifier.chunk = 64
    streamed = [b"".join(bytes(p) for p in verifier.iter_object(o, len(b), f"tensor {i}: "))
                for i, (o, b) in enumerate(zip(oids, blobs))]
    assert streamed[3] == bytes(data) and streamed[4] == blobs[4]  # the stream went on to the end
    with pytest.raises(CorruptObject, match=rf"tensor 3: object {oids[3][:12]}… is corrupt"):
        verifier.check()
    verifier = store.overlapped_verifier()
    with pytest.raises(CorruptObject, match="metadata implies"):
        list(verifier.iter_object(oids[4], 1000, "t: "))
    verifier.close()


@pytest.mark.parametrize("fast_index", [True, False])
def test_write_object_copies_in_the_kernel_into_a_file_and_verifies_beside_it(
        tmp_path: Path, monkeypatch, fast_index: bool) -> None:
    """The materialization's path: objects of 256 KiB and more are copied by copy_file_range into a regular file
    (a buffered one, small objects written between them through its buffer), the result byte-exact; a corrupt
    object is copied but fails check() with the object named (BLAKE3-recorded or sha256-verified alike); into a
    pipe, or where the kernel refuses, the pieces are written as before."""
    import os

    store = ObjectStore(tmp_path / "lfs")
    blobs = [os.urandom(n) for n in (300 << 10, 10, (1 << 20) + 3, 5000, 256 << 10)]
    oids = [store.put(b)[0] for b in blobs]
    if not fast_index:
        (tmp_path / "lfs" / "theta-fastindex").unlink(missing_ok=True)
        store = ObjectStore(tmp_path / "lfs")
    calls: list[int] = []
    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda *a: calls.append(a[2]) or real(*a))

    def write_all(out, verifier) -> None:
        out.write(b"header")
        for o, b in zip(oids, blobs):
            verifier.write_object(o, len(b), out, "t: ")
        verifier.check()

    target = tmp_path / "out.bin"
    with open(target, "wb") as out:
        write_all(out, store.overlapped_verifier())
    assert target.read_bytes() == b"header" + b"".join(blobs)
    assert sorted(calls) == sorted([300 << 10, (1 << 20) + 3, 256 << 10])  # the large ones, in the kernel

    path = store.path(oids[2])
    path.chmod(0o644)
    bad = bytearray(path.read_bytes())
    bad[12345] ^= 1
    path.write_bytes(bytes(bad))
    with open(target, "wb") as out, pytest.raises(CorruptObject, match=rf"t: object {oids[2][:12]}… is corrupt"):
        write_all(out, store.overlapped_verifier())
    path.write_bytes(blobs[2])

    calls.clear()
    r, w = os.pipe()
    with open(w, "wb") as out, open(r, "rb") as inp:
        import threading

        got = bytearray()
        reader = threading.Thread(target=lambda: got.extend(inp.read()))
        reader.start()
        write_all(out, store.overlapped_verifier())
        out.close()
        reader.join()
    assert bytes(got) == b"header" + b"".join(blobs) and calls == []

    def refuse(*a):
        import errno

        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    with open(target, "wb") as out:
        write_all(out, store.overlapped_verifier())
    assert target.read_bytes() == b"header" + b"".join(blobs)


def test_a_shared_view_changed_meanwhile_never_yields_an_object_unlike_its_oid(tmp_path: Path, monkeypatch) -> None:
    """`git theta add` hashes a mapped file's pages; a writer may change them between the BLAKE3 pass, the sha256 and
    the write. Whatever it does, the object must match its oid and the cache must map only the stored bytes' key."""
    pytest.importorskip("blake3")
    import os

    from gittheta_merge.storage import store as store_module
    from gittheta_merge.storage.fastindex import FAST_MIN_BYTES

    store = ObjectStore(tmp_path / "lfs")
    fast = store.fast_index
    assert fast is not None
    page = bytearray(os.urandom(FAST_MIN_BYTES * 2))  # stands for the mapped file's pages
    first_key = fast.key(bytes(page))
    real_key, real_sha256 = fast.key, hashlib.sha256

    def key_then_a_write(data):  # the writer strikes right after the BLAKE3 pass over the shared pages
        digest = real_key(data)
        page[0] ^= 0xFF
        return digest

    def sha256_then_a_write(data=b""):  # and again right after the sha256
        digest = real_sha256(data)
        page[1] ^= 0xFF
        return digest

    monkeypatch.setattr(fast, "key", key_then_a_write)
    monkeypatch.setattr(store_module.hashlib, "sha256", sha256_then_a_write)
    oid, new = store.put(memoryview(page), shared=True)
    monkeypatch.undo()
    stored = store.path(oid).read_bytes()
    assert new and hashlib.sha256(stored).hexdigest() == oid  # object and oid agree
    assert fast.get(first_key, len(page)) is None  # the key of bytes never stored maps to nothing
    assert fast.get(fast.key(stored), len(page)) == oid
