"""git's pkt-line framing, used by the long-running filter protocol (gitprotocol-common(5)).

Each packet is a 4-hex-digit length (including those 4 bytes) followed by the payload; "0000" is a
flush packet that ends a list or a content stream. Content is streamed so that neither side ever holds
a whole checkpoint in memory.
"""

from __future__ import annotations

import os
from typing import BinaryIO

MAX_PAYLOAD = 65516  # 65520 - 4, the largest payload git accepts
PACKETS_PER_WRITE = 16  # content packets handed to one writev(2): ~1 MiB per system call, not 2 per packet


class ProtocolError(Exception):
    """git sent something that does not follow the filter protocol."""


class PktReader:
    """Reads pkt-lines from git."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def _payload_size(self) -> int | None:
        """The next packet's payload size (its header read), or None for a flush packet. EOFError when git
        closed the pipe."""
        head = self._stream.read(4)
        if not head:
            raise EOFError
        if len(head) != 4:
            raise ProtocolError("truncated pkt-line header")
        size = int(head, 16)
        if size == 0:
            return None
        if size < 4:
            raise ProtocolError(f"invalid pkt-line length {size}")
        return size - 4

    def read_packet(self) -> bytes | None:
        """One packet's payload, or None for a flush packet. EOFError when git closed the pipe."""
        size = self._payload_size()
        if size is None:
            return None
        payload = self._stream.read(size)
        if len(payload) != size:
            raise ProtocolError("truncated pkt-line payload")
        return payload

    def read_packet_into(self, view: memoryview) -> int | None:
        """Read one packet's payload straight into `view` (room for the largest packet, no intermediate copy):
        its size, or None for a flush packet."""
        size = self._payload_size()
        if size is None:
            return None
        got = 0
        while got < size:
            n = self._stream.readinto(view[got:size])  # type: ignore[attr-defined]
            if not n:
                raise ProtocolError("truncated pkt-line payload")
            got += n
        return size

    def read_text_list(self) -> list[str]:
        """Text packets up to the next flush, newline stripped."""
        out: list[str] = []
        while True:
            pkt = self.read_packet()
            if pkt is None:
                return out
            out.append(pkt.decode().rstrip("\n"))

    def content_stream(self) -> ContentStream:
        """A file-like view of content packets up to the next flush."""
        return ContentStream(self)


class ContentStream:
    """A read-only binary stream over content packets, ending at the flush packet.

    `drain()` must be called before the next command is read so the protocol stays in sync even when
    a format stopped reading early (e.g. on an error).
    """

    def __init__(self, reader: PktReader) -> None:
        self._reader = reader
        self._buf = b""
        self._pos = 0
        self._done = False

    def _fill(self) -> bool:
        if self._done:
            return False
        pkt = self._reader.read_packet()
        if pkt is None:
            self._done = True
            return False
        self._buf = pkt
        self._pos = 0
        return True

    def readinto(self, target: memoryview | bytearray) -> int:
        view = memoryview(target).cast("B")
        filled = 0
        while filled < len(view):
            if self._pos >= len(self._buf):
                direct = self._read_packet_into(view[filled:])
                if direct is None:
                    break
                if direct:
                    filled += direct
                    continue
                if not self._fill():
                    break
            n = min(len(view) - filled, len(self._buf) - self._pos)
            view[filled : filled + n] = self._buf[self._pos : self._pos + n]
            self._pos += n
            filled += n
        return filled

    def _read_packet_into(self, view: memoryview) -> int | None:
        """Read the next packet straight into `view` when any packet fits (no intermediate copy).

        Returns its size, 0 when it might not fit (nothing consumed: the caller buffers it), or None at
        the flush packet that ends the content."""
        if self._done or len(view) < MAX_PAYLOAD + 4:
            return 0
        size = self._reader.read_packet_into(view)
        if size is None:
            self._done = True
        return size

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            chunks = []
            while True:
                part = self.read(1 << 20)
                if not part:
                    return b"".join(chunks)
                chunks.append(part)
        buf = bytearray(size)
        n = self.readinto(buf)
        return bytes(buf[:n])

    def drain(self) -> None:
        while self._fill():
            pass


class PktWriter:
    """Writes pkt-lines to git."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        try:
            self._fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):  # an in-memory stream (tests)
            self._fd = None

    def packets(self, view: memoryview) -> None:
        """`view` as content packets. To a file descriptor (git's pipe) up to PACKETS_PER_WRITE packets go out
        in one writev, headers and payloads from where they are (no copy): a 0.8 GB smudge otherwise makes
        24,000 small writes into a 64 KiB pipe, each a wake-up of git (docs/design.md, checkout)."""
        if self._fd is None:
            for start in range(0, len(view), MAX_PAYLOAD):
                self.packet(view[start : start + MAX_PAYLOAD])
            return
        self._stream.flush()
        step = MAX_PAYLOAD * PACKETS_PER_WRITE
        for start in range(0, len(view), step):
            parts: list[bytes | memoryview] = []
            for at in range(start, min(len(view), start + step), MAX_PAYLOAD):
                payload = view[at : at + MAX_PAYLOAD]
                parts += (b"%04x" % (len(payload) + 4), payload)
            _writev_all(self._fd, parts)

    def packet(self, payload: bytes) -> None:
        self._stream.write(b"%04x" % (len(payload) + 4))
        self._stream.write(payload)

    def text(self, line: str) -> None:
        self.packet(line.encode() + b"\n")

    def flush(self) -> None:
        self._stream.write(b"0000")
        self._stream.flush()

    def content_sink(self) -> ContentSink:
        return ContentSink(self)


class ContentSink:
    """A writable binary stream that frames everything written into content packets."""

    def __init__(self, writer: PktWriter) -> None:
        self._writer = writer

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        self._writer.packets(view)
        return len(view)


def _writev_all(fd: int, parts: list[bytes | memoryview]) -> None:
    """writev until every byte of `parts` is written (a pipe may take less than asked)."""
    while parts:
        n = os.writev(fd, parts)
        while parts and n >= len(parts[0]):
            n -= len(parts[0])
            parts.pop(0)
        if n:
            parts[0] = memoryview(parts[0])[n:]

