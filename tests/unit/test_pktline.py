"""pkt-line framing of filter content: written to git's pipe in batched writev calls, it must be exactly the
packets written one by one (git parses every 4-byte header)."""

from __future__ import annotations

import io
import os
import threading

from gittheta_merge.filter.pktline import MAX_PAYLOAD, PktReader, PktWriter


def test_batched_content_over_a_small_pipe_equals_packet_by_packet() -> None:
    """3.2 packets' worth of odd-sized content through a 4 KiB pipe (so writev writes partially again and
    again) gives the same bytes as the in-memory writer, and reads back as the same content."""
    import fcntl

    payload = os.urandom(3 * MAX_PAYLOAD + 12_345) + os.urandom(17)
    want = io.BytesIO()
    sink = PktWriter(want).content_sink()
    sink.write(payload[:100])
    sink.write(payload[100:])
    PktWriter(want).flush()

    r, w = os.pipe()
    fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)
    received = bytearray()

    def drain() -> None:
        while chunk := os.read(r, 1000):
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    with os.fdopen(w, "wb") as stream:
        writer = PktWriter(stream)
        writer.content_sink().write(payload[:100])
        writer.content_sink().write(payload[100:])
        writer.flush()
    reader.join(timeout=30)
    os.close(r)
    assert bytes(received) == want.getvalue()
    assert PktReader(io.BytesIO(bytes(received))).content_stream().read() == payload
