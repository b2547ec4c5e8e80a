"""Small stream helpers shared by formats."""

from __future__ import annotations

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


def read_exact_into(stream: BinaryIO, view: memoryview, what: str) -> None:
    """Fill view completely or raise a ThetaError saying the file is truncated."""
    filled = 0
    while filled < len(view):
        n = stream.readinto(view[filled:])  # type: ignore[attr-defined]
        if not n:
            raise InputError(f"{what}: file is truncated ({len(view) - filled} bytes missing)")
        filled += n
