"""Small stream helpers shared by formats."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from gittheta_merge.errors import InputError


class PrefixedStream:
    """A stream whose first bytes were already read (for sniffing) and are replayed first."""

    def __init__(self, prefix: bytes, rest: BinaryIO) -> None:
        self._prefix = memoryview(prefix)
        self._rest = rest

    def readinto(self, target: memoryview | bytearray) -> int:
        view = memoryview(target).cast("B")
        filled = 0
        if self._prefix:
            n = min(len(self._prefix), len(view))
            view[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            filled = n
        while filled < len(view):
            n = self._rest.readinto(view[filled:])  # type: ignore[attr-defined]
            if not n:
                break
            filled += n
        return filled

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            return bytes(self._prefix) + self._rest.read()
        buf = bytearray(size)
        n = self.readinto(buf)
        return bytes(buf[:n])

    def take(self, size: int) -> memoryview | None:
        """`MappedFile.take` once the replayed prefix is used up (None before that, or over a plain stream)."""
        take = getattr(self._rest, "take", None)
        return None if self._prefix or take is None else take(size)


class MappedFile:
    """A regular file read through a read-only mapping, from its current position. `take(n)` hands out the next
    n bytes as a view of the page cache, without the copy a read makes: `git theta add` of a model whose blocks
    are nearly all known hashes them straight from the cache (BLAKE3) and copies only the new ones.

    The views show the file as it is now, not as it was: a writer changing the file meanwhile changes them (the
    object store copies a block before it takes its sha256, `ObjectStore.put(shared=True)`, and `git theta add`
    refuses a file whose stat changed), and one truncating it (a training run saving the checkpoint again in place)
    ends the process with SIGBUS ("Fatal Python error: Bus error", and the traceback of the clean). Nothing is
    lost then: objects are written whole or not at all, and the index is updated only after every file was read.
    safetensors' own loader maps the file the same way. Views must be released before `close()`."""

    def __init__(self, handle: BinaryIO) -> None:
        import faulthandler

        fd = handle.fileno()
        self._pos = handle.tell()
        size = os.fstat(fd).st_size
        self._map = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else None
        if self._map is not None:
            self._map.madvise(mmap.MADV_SEQUENTIAL)  # read once, front to back: read ahead, and let pages go behind
        self._view = memoryview(self._map) if self._map is not None else memoryview(b"")
        # a truncation meanwhile is a SIGBUS no Python code can catch: at least show where it struck
        self._enabled_faulthandler = not faulthandler.is_enabled()
        if self._enabled_faulthandler:
            faulthandler.enable()

    @classmethod
    @contextmanager
    def or_plain(cls, handle: BinaryIO) -> Iterator[BinaryIO]:
        """The file mapped, or the plain handle where it cannot be: under an address-space limit smaller than the
        file (`ulimit -v`, `prlimit --as`: mmap fails with ENOMEM) or on a filesystem without mmap."""
        try:
            mapped = cls(handle)
        except (OSError, ValueError):
            yield handle
            return
        with mapped:
            yield mapped  # type: ignore[misc]

    def take(self, size: int) -> memoryview:
        """Up to `size` next bytes (fewer only at the end), as a read-only view."""
        view = self._view[self._pos: self._pos + size]
        self._pos += len(view)
        return view

    def readinto(self, target: memoryview | bytearray) -> int:
        out = memoryview(target).cast("B")
        view = self.take(len(out))
        out[: len(view)] = view
        return len(view)

    def read(self, size: int = -1) -> bytes:
        return bytes(self.take(len(self._view) if size < 0 else size))

    def close(self) -> None:
        if self._enabled_faulthandler:
            import faulthandler

            faulthandler.disable()
            self._enabled_faulthandler = False
        self._view.release()
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view still held (an error's traceback): the mapping closes once it is freed
                pass

    def __enter__(self) -> MappedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_head(stream: BinaryIO, size: int = 64) -> bytes:
    """Up to `size` first bytes (fewer only at end of stream)."""
    buf = bytearray(size)
    view = memoryview(buf)
    filled = 0
    while filled < size:
        n = stream.readinto(view[filled:])  # type: ignore[attr-defined]
        if not n:
            break
        filled += n
    return bytes(buf[:filled])


def take_exact(stream: BinaryIO, size: int, what: str) -> memoryview | None:
    """The next `size` bytes as a view of a mapped file (`MappedFile`), or None where the stream is not one."""
    take = getattr(stream, "take", None)
    view = take(size) if take is not None else None
    if view is not None and len(view) < size:
        raise InputError(f"{what}: file is truncated ({size - len(view)} bytes missing)")
    return view


def read_exact_into(stream: BinaryIO, view: memoryview, what: str) -> None:
    """Fill view completely or raise a ThetaError saying the file is truncated."""
    filled = 0
    while filled < len(view):
        n = stream.readinto(view[filled:])  # type: ignore[attr-defined]
        if not n:
            raise InputError(f"{what}: file is truncated ({len(view) - filled} bytes missing)")
        filled += n
