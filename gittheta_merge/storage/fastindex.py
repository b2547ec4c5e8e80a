"""A local cache from the BLAKE3 hash of a stored block to its sha256 object id, so that re-adding a model whose
blocks are mostly stored already recognises them at BLAKE3's speed (4 GB/s on one core here, 7 GB/s on two, against
sha256's 1.7 GB/s) and only new blocks pay sha256 and a write. Object ids stay sha256 (git-lfs's).

It is an optimisation only: a missing cache, or one that cannot be read, changes no result (the block is hashed with
sha256 as before); each record carries a CRC32, so a corrupted record is skipped, never believed; a hit is used only
when the object it names is in the store with the block's size. The file is append-only (one os.write of one record
per new block, so concurrent writers do not interleave records) under .git/lfs, beside the objects it describes.
Without the `blake3` package there is no cache.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Any

FAST_MIN_BYTES = 256 << 10  # smaller blocks: sha256 is quick enough and records would outnumber savings
RECORD = struct.Struct("<32s32sQI")  # blake3, sha256 (binary), size, crc32 of the first three


class FastIndex:
    def __init__(self, path: Path) -> None:
        import blake3

        self._blake3 = blake3.blake3
        self._auto = blake3.blake3.AUTO
        self.path = path
        self._map: dict[bytes, tuple[str, int]] | None = None
        self._by_oid: dict[str, bytes] | None = None

    @classmethod
    def open(cls, lfs_dir: Path) -> FastIndex | None:
        try:
            return cls(lfs_dir / "theta-fastindex")
        except ImportError:
            return None

    def key(self, data: Any) -> bytes:
        return self._blake3(data, max_threads=self._auto).digest()

    def _load(self) -> dict[bytes, tuple[str, int]]:
        if self._map is None:
            found: dict[bytes, tuple[str, int]] = {}
            try:
                raw = self.path.read_bytes()
            except OSError:
                raw = b""
            for offset in range(0, len(raw) - RECORD.size + 1, RECORD.size):
                fast, sha, size, crc = RECORD.unpack_from(raw, offset)
                if zlib.crc32(raw[offset: offset + RECORD.size - 4]) == crc:
                    found[fast] = (sha.hex(), size)
            self._map = found
        return self._map

    def get(self, key: bytes, size: int) -> str | None:
        hit = self._load().get(key)
        return hit[0] if hit is not None and hit[1] == size else None

    def key_of(self, oid: str, size: int) -> bytes | None:
        """The BLAKE3 hash recorded for a stored object, so a read can be verified at BLAKE3's speed; None when
        the object was never recorded (fetched, or smaller than FAST_MIN_BYTES): then it is verified by sha256."""
        if self._by_oid is None:
            self._by_oid = {oid_: key for key, (oid_, size_) in self._load().items()}
        key = self._by_oid.get(oid)
        return key if key is not None and self._load()[key][1] == size else None

    def hasher(self) -> Any:
        """An incremental BLAKE3 hasher (multi-threaded for large updates)."""
        return self._blake3(max_threads=self._auto)

    def add(self, key: bytes, oid: str, size: int) -> None:
        entries = self._load()
        if key in entries:
            return
        entries[key] = (oid, size)
        if self._by_oid is not None:
            self._by_oid[oid] = key
        body = struct.pack("<32s32sQ", key, bytes.fromhex(oid), size)
        record = body + struct.pack("<I", zlib.crc32(body))
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, record)
            finally:
                os.close(fd)
        except OSError:
            pass  # a read-only or full store: the cache is only an optimisation
