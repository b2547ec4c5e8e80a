"""The content-addressed object store: one object per tensor (or per row block of a large tensor).

Objects live where git-lfs keeps its local objects (`<git-common-dir>/lfs/objects/ab/cd/<oid>`, oid =
sha256 of the stored bytes), so `git lfs push --object-id` can transport them unchanged, while local
use needs no git-lfs at all. An object's bytes are the tensor's raw little-endian bytes (see
docs/object-format.md for why not tensorstore/zarr): the oid is then the exact content hash of the
tensor, and a row range is one seek away.

Writes go to a temp file in `lfs/tmp` and are renamed into place, so a killed `git add` leaves either a
complete object or none. Every write or reuse is first registered with the store's WriterGuard
(storelock.py), so `git theta gc` never deletes an object between its write and git's index.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from gittheta_merge.errors import InputError, MissingError, StorageError, human_bytes, require_space, storage_error
from gittheta_merge.storage.fastindex import FAST_MIN_BYTES, FastIndex
from gittheta_merge.storage.storelock import WriterGuard

_OID_RE = re.compile(r"^[0-9a-f]{64}$")
READ_CHUNK = 8 << 20
# copy_file_range refusing these two files (another filesystem on an old kernel, a filesystem without it)
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}


def check_oid(oid: object, where: str = "") -> str:
    """An oid from untrusted metadata: exactly 64 lowercase hex digits, so it can't escape the store."""
    if not isinstance(oid, str) or not _OID_RE.match(oid):
        raise InputError(f"{where}invalid object id {oid!r} (expected 64 hex digits)")
    return oid


_GUARDS: dict[str, WriterGuard] = {}


def writer_guard(lfs_dir: Path) -> WriterGuard:
    """One guard per store and process, however many ObjectStore instances point at it."""
    key = os.path.realpath(lfs_dir)
    if key not in _GUARDS:
        _GUARDS[key] = WriterGuard(Path(lfs_dir))
    return _GUARDS[key]


class CorruptObject(InputError):
    """An object whose bytes no longer hash to its name."""

    @classmethod
    def mismatch(cls, oid: str, what: str = "") -> CorruptObject:
        return cls(f"{what}object {oid[:12]}… is corrupt (its sha256 does not match); "
                   "run `git theta fsck`, then restore it from a remote")

    @classmethod
    def truncated(cls, oid: str, what: str = "") -> CorruptObject:
        return cls(f"{what}object {oid[:12]}… is truncated")


class MissingObject(MissingError):
    """An object referenced by metadata that the local store does not have."""


class ObjectStore:
    """Content-addressed storage under a git-lfs style directory."""

    def __init__(self, lfs_dir: Path, *, fsync: bool = False) -> None:
        self.lfs_dir = Path(lfs_dir)
        self.objects_dir = self.lfs_dir / "objects"
        self.tmp_dir = self.lfs_dir / "tmp"
        self.fsync = fsync
        self.guard = writer_guard(self.lfs_dir)
        self._fast: FastIndex | None | bool = False  # not opened yet

    @classmethod
    def for_repo(cls, repo: object) -> ObjectStore:
        from gittheta_merge.storage.gitutil import Repo

        assert isinstance(repo, Repo)
        return cls(repo.common_dir / "lfs", fsync=repo.config_bool("theta.fsync", False))

    # -- paths ------------------------------------------------------------------------------------
    def path(self, oid: str) -> Path:
        check_oid(oid)
        return self.objects_dir / oid[:2] / oid[2:4] / oid

    def has(self, oid: str) -> bool:
        return self.path(oid).is_file()

    def require_present(self, objects: Iterable[tuple[str, int, str]], where: str) -> None:
        """Before metadata naming these objects is handed on: each is still here (defence in depth against a
        deletion between our write and git's index, e.g. by a gc of a version of this tool without the lock)."""
        gone = [what or oid[:12] for oid, _, what in objects if not self.has(oid)]
        if gone:
            raise StorageError(f"{where}: {len(gone)} object(s) just stored are gone from {self.objects_dir} "
                             f"({', '.join(gone[:3])}{' …' if len(gone) > 3 else ''}): something deleted them "
                             "meanwhile (a concurrent gc?). Nothing was recorded; run the command again")

    def size(self, oid: str) -> int:
        return self.path(oid).stat().st_size

    def _touch(self, oid: str) -> bool:
        """True if the object exists; refreshes its mtime so gc's grace period protects reuse."""
        try:
            os.utime(self.path(oid))
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:  # a store this user may read but not write (shared, read-only): reuse still works
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return self.has(oid)
            raise

    def iter_oids(self) -> Iterator[str]:
        if not self.objects_dir.is_dir():
            return
        for first in sorted(self.objects_dir.iterdir()):
            if not first.is_dir():
                continue
            for second in sorted(first.iterdir()):
                if not second.is_dir():
                    continue
                for obj in sorted(second.iterdir()):
                    if _OID_RE.match(obj.name):
                        yield obj.name

    # -- writing ----------------------------------------------------------------------------------
    def put(self, data: bytes | bytearray | memoryview, shared: bool = False) -> tuple[str, bool]:
        """Store bytes; returns (oid, newly_written). Existing objects are not rewritten. A block stored before is
        recognised by its BLAKE3 hash (storage/fastindex.py) without computing sha256.

        shared: the bytes are a view others may change meanwhile (a mapped file): a block not recognised is copied
        first, so its sha256 and the object written are of the same bytes (an object must never differ from its
        oid: a later put of the true content would find it and trust it)."""
        size = len(memoryview(data).cast("B")) if not isinstance(data, (bytes, bytearray)) else len(data)
        fast = self.fast_index if size >= FAST_MIN_BYTES else None
        key = fast.key(data) if fast is not None else None
        if fast is not None and key is not None:
            known = fast.get(key, size)
            if known is not None:
                with self.guard.hold():
                    self.guard.record(known)
                    if self._touch(known) and self.size(known) == size:
                        return known, False
        if shared:  # hash and write a private copy; the cache's key too, or it would map other bytes to this oid
            data = bytes(data)
            key = fast.key(data) if fast is not None and key is not None else key
        oid = hashlib.sha256(data).hexdigest()
        with self.guard.hold():
            self.guard.record(oid)
            if self._touch(oid):
                new = False
            else:
                with self._writing(size):
                    self._write_atomic(oid, memoryview(data))
                new = True
        if fast is not None and key is not None:
            fast.add(key, oid, size)
        return oid, new

    @property
    def fast_index(self) -> FastIndex | None:
        """The BLAKE3 -> sha256 cache of this store (None without the blake3 package), opened on first use."""
        if self._fast is False:
            self._fast = FastIndex.open(self.lfs_dir)
        return self._fast  # type: ignore[return-value]

    def put_stream(self, source: BinaryIO, size: int) -> tuple[str, bool]:
        """Store exactly `size` bytes read from a stream, in bounded memory (temp file + rename)."""
        with self.guard.hold(), self._writing(size):
            return self._put_stream(source, size)

    @contextmanager
    def _writing(self, size: int) -> Iterator[None]:
        """Around a write of `size` bytes: refuse up front when they cannot fit, and turn the OS's storage errors
        (disk full, quota, read-only, permissions) into one-line ThetaErrors naming the store."""
        require_space(self.lfs_dir, size, f"storing an object in {self.objects_dir}")
        try:
            yield
        except OSError as exc:
            err = storage_error(exc, f"storing an object of {human_bytes(size)} in {self.objects_dir}", size)
            if err is None:
                raise
            raise err from None

    def _put_stream(self, source: BinaryIO, size: int) -> tuple[str, bool]:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix="theta-")
        try:
            with os.fdopen(fd, "wb") as out:
                remaining = size
                buf = bytearray(min(READ_CHUNK, max(size, 1)))
                while remaining:
                    view = memoryview(buf)[: min(len(buf), remaining)]
                    n = source.readinto(view)  # type: ignore[attr-defined]
                    if not n:
                        raise InputError(f"stream ended {remaining} bytes early")
                    digest.update(view[:n])
                    out.write(view[:n])
                    remaining -= n
                if self.fsync:
                    out.flush()
                    os.fsync(out.fileno())
            oid = digest.hexdigest()
            self.guard.record(oid)
            if self._touch(oid):
                os.unlink(tmp)
                return oid, False
            final = self.path(oid)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
            return oid, True
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _write_atomic(self, oid: str, data: memoryview) -> None:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        final = self.path(oid)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix="theta-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                if self.fsync:
                    out.flush()
                    os.fsync(out.fileno())
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    # -- reading ----------------------------------------------------------------------------------
    def open(self, oid: str, expected_size: int | None = None, what: str = "") -> BinaryIO:
        """Open an object for reading; checks it exists and has the size the metadata implies."""
        path = self.path(oid)
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            raise MissingObject(
                f"{what}object {oid[:12]}… is missing from {self.objects_dir} "
                "(fetch it from the remote, or check out a commit whose objects you have)"
            ) from None
        if expected_size is not None:
            actual = os.fstat(handle.fileno()).st_size
            if actual != expected_size:
                handle.close()
                raise CorruptObject(
                    f"{what}object {oid[:12]}… has {actual} bytes but the metadata implies "
                    f"{expected_size}; run `git theta fsck`"
                )
        return handle

    def iter_verified(self, oid: str, size: int, what: str = "",
                      chunk: int = READ_CHUNK) -> Iterator[memoryview]:
        """Yield an object's bytes in pieces; raise CorruptObject at the end if the hash is wrong."""
        digest = hashlib.sha256()
        buf = bytearray(min(chunk, max(size, 1)))
        with self.open(oid, size, what) as handle:
            remaining = size
            while remaining:
                view = memoryview(buf)[: min(len(buf), remaining)]
                n = handle.readinto(view)
                if not n:
                    raise CorruptObject.truncated(oid, what)
                digest.update(view[:n])
                yield view[:n]
                remaining -= n
        if digest.hexdigest() != oid:
            raise CorruptObject.mismatch(oid, what)

    def overlapped_verifier(self) -> OverlappedVerifier:
        """A verifier that hashes on a helper thread while the caller writes the bytes on (see the class)."""
        return OverlappedVerifier(self)

    def read(self, oid: str, size: int, what: str = "", offset: int = 0,
             length: int | None = None, verify: bool = True) -> bytes:
        """Read an object (or a byte range of it). A full read is verified against the oid."""
        if offset == 0 and (length is None or length == size) and verify:
            return b"".join(bytes(p) for p in self.iter_verified(oid, size, what))
        with self.open(oid, size, what) as handle:
            handle.seek(offset)
            return handle.read(size - offset if length is None else length)

    def verify(self, oid: str) -> bool:
        """True if the object's bytes still hash to its name."""
        try:
            for _ in self.iter_verified(oid, self.size(oid)):
                pass
        except CorruptObject:
            return False
        return True

    def delete(self, oid: str) -> None:
        path = self.path(oid)
        path.unlink(missing_ok=True)


def fresh_buffer(n: int) -> bytearray | mmap.mmap:
    """A writable buffer of n bytes. From 1 MiB up, anonymous memory straight from the kernel, whose pages are zeroed
    when first touched: bytearray(n) zero-fills all of it first, and a block-sized buffer that is then read into was
    touched twice (98 MB allocated and read into: 165-198 ms as a bytearray, 80-102 ms mapped, here)."""
    return mmap.mmap(-1, n) if n >= 1 << 20 else bytearray(n)


class BufferRing:
    """Buffers a helper thread works on while the caller fills the next one: one worker (tasks run in the order
    they were submitted) and a ring of buffers, each handed out again only after the task submitted on it has
    finished (whose error, if any, is raised then). Used where hashing can run beside a pipe: the smudge's
    verification (OverlappedVerifier) and the clean's object writes (formats/safetensors_format.py)."""

    def __init__(self, size: int, thread_name: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(1, thread_name_prefix=thread_name)
        self._bufs: list[Any] = [bytearray() for _ in range(size)]
        self._busy: list[Any] = [None] * size  # the task reading each buffer
        self._turn = -1

    def buffer(self, n: int) -> memoryview:
        """The next buffer (grown to n bytes if needed), once the task on it has finished."""
        self._turn = (self._turn + 1) % len(self._bufs)
        busy, self._busy[self._turn] = self._busy[self._turn], None
        if busy is not None:
            busy.result()
        if len(self._bufs[self._turn]) < n:
            self._bufs[self._turn] = fresh_buffer(n)
        return memoryview(self._bufs[self._turn])[:n]

    def submit(self, fn: Any, *args: Any) -> Any:
        """Run fn(*args), which reads the buffer last handed out, on the helper; its future."""
        self._busy[self._turn] = future = self._pool.submit(fn, *args)
        return future

    def after(self, fn: Any, *args: Any) -> Any:
        """Run fn(*args), which reads no buffer, on the helper after every task submitted so far."""
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        """Wait for every task: no task may still read a buffer, or write an object, after this."""
        self._pool.shutdown(wait=True)


class OverlappedVerifier:
    """Yields objects' bytes like `ObjectStore.iter_verified`, but hashes them on one helper thread while the
    caller writes each piece on, and reports a bad hash only from `check()`, after the last object.

    Why: sha256 of a 0.8 GB checkpoint is ~1 CPU-second, which in a smudge otherwise runs in series with the
    pipe to git. Only for readers that throw the output away when the verdict comes late: git discards a
    smudge that ends with status=error (or a non-zero exit), and the file it would have written is never
    written. Pieces live in a ring of three buffers (`BufferRing`)."""

    def __init__(self, store: ObjectStore, chunk: int = READ_CHUNK) -> None:
        self.store = store
        self.chunk = chunk
        self._ring = BufferRing(3, "theta-verify")
        self._errors: list[Exception] = []
        self._hash_buffer: memoryview | None = None  # the helper's, for objects copied in the kernel
        self._no_copy_file_range = False

    def iter_object(self, oid: str, size: int, what: str = "") -> Iterator[memoryview]:
        digest, fast_key = self._digest_for(oid, size)
        with self.store.open(oid, size, what) as handle:
            remaining = size
            while remaining:
                view = self._ring.buffer(min(self.chunk, remaining))
                n = handle.readinto(view)
                if not n:
                    raise CorruptObject.truncated(oid, what)
                piece = view[:n]
                self._ring.submit(digest.update, piece)
                yield piece
                remaining -= n
        self._ring.after(self._verdict, digest, oid, what, fast_key)

    def write_object(self, oid: str, size: int, out: BinaryIO, what: str = "") -> None:
        """Write an object's bytes to `out`, verified as `iter_object` does (the verdict comes from `check()`).

        Into a regular file the kernel copies them (copy_file_range, as `cp` does), while the helper thread reads
        and hashes the object beside the copy: the bytes never pass through this process to be written (a 2 GB
        model's materialization: 2.9 s instead of 4.8 s here, `cp` 1.9 s, on a loaded machine). Anything else
        (git's pipe), or where the kernel cannot copy between the two files, gets `iter_object`'s pieces."""
        if size >= FAST_MIN_BYTES and self._copy_in_kernel(oid, size, out, what):
            return
        for piece in self.iter_object(oid, size, what):
            out.write(piece)

    def _copy_in_kernel(self, oid: str, size: int, out: BinaryIO, what: str) -> bool:
        try:
            out_fd = out.fileno()
            regular = stat.S_ISREG(os.fstat(out_fd).st_mode)
        except (AttributeError, OSError, ValueError):
            return False
        if not regular or not hasattr(os, "copy_file_range") or self._no_copy_file_range:
            return False
        out.flush()  # what was written through the buffer goes first; the copy then moves the descriptor's offset
        with self.store.open(oid, size, what) as handle:
            copied = 0
            while copied < size:
                try:
                    n = os.copy_file_range(handle.fileno(), out_fd, size - copied)
                except OSError as exc:
                    if copied or exc.errno not in _NO_KERNEL_COPY:
                        raise
                    self._no_copy_file_range = True  # another filesystem pair, an old kernel: not again
                    return False
                if not n:
                    raise CorruptObject.truncated(oid, what)
                copied += n
        self._ring.after(self._hash_file, oid, size, what, *self._digest_for(oid, size))
        return True

    def _digest_for(self, oid: str, size: int) -> tuple[Any, bytes | None]:
        """The hasher to verify an object with, and the BLAKE3 hash to expect (None: its sha256 is its name). An
        object this store recorded in its BLAKE3 cache is verified against that hash (4-7 GB/s here against
        sha256's 1.7): what was checked when the object was stored is checked again, at the speed of a copy."""
        index = self.store.fast_index if size >= FAST_MIN_BYTES else None
        fast_key = index.key_of(oid, size) if index is not None else None
        return (index.hasher() if index is not None and fast_key is not None else hashlib.sha256()), fast_key

    def _hash_file(self, oid: str, size: int, what: str, digest: Any, fast_key: bytes | None) -> None:
        """The helper's side of a kernel copy: read the object again (from the page cache the copy just filled) and
        hash it into the same verdict as `iter_object`'s."""
        try:
            with self.store.open(oid, size, what) as handle:
                if fast_key is not None and hasattr(digest, "update_mmap"):
                    # BLAKE3 over a mapping of the object: 4x the speed of reading it into a buffer here (0.3 s
                    # against 1.3 s for 2 GB). A mapping dies with SIGBUS if its file is truncated meanwhile; store
                    # objects are read-only and only ever replaced whole (rename), so that takes a deliberate edit
                    digest.update_mmap(self.store.path(oid))
                    self._verdict(digest, oid, what, fast_key)
                    return
                if self._hash_buffer is None:
                    self._hash_buffer = memoryview(bytearray(self.chunk))
                remaining = size
                while remaining:
                    n = handle.readinto(self._hash_buffer[:min(self.chunk, remaining)])
                    if not n:
                        raise CorruptObject.truncated(oid, what)
                    digest.update(self._hash_buffer[:n])
                    remaining -= n
        except (InputError, MissingError, OSError) as exc:  # reported by check(), as a bad hash is
            self._errors.append(exc)
            return
        self._verdict(digest, oid, what, fast_key)

    def _verdict(self, digest: Any, oid: str, what: str, fast_key: bytes | None) -> None:
        if (digest.digest() != fast_key) if fast_key is not None else (digest.hexdigest() != oid):
            self._errors.append(CorruptObject.mismatch(oid, what))

    def check(self) -> None:
        """Wait for every hash; raise the first object's CorruptObject, if any."""
        self.close()
        if self._errors:
            raise self._errors[0]

    def close(self) -> None:
        self._ring.close()
