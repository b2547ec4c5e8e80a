"""Record a materialized file's stat data in git's index without git reading the file.

Why: after we write a model into the work tree, git's index still holds the placeholder's stat data, and the only
way git offers to update it (`git update-index --refresh`) streams the whole file through the clean filter: 0.8-1 s
for 2 GB here, a third of a checkout. The index format is documented (git's Documentation/gitformat-index.txt) and
stat data sits at fixed offsets in each entry, so for entries whose blob is exactly the metadata we wrote, we patch
those ten 32-bit fields in place, under git's own lock file (`index.lock`, created exclusively, renamed over the
index), and rewrite the trailing checksum. Nothing else changes but what git itself changes when it writes an
index: entries that are racily clean against the old index (modified in or after the second it was written) get
their size smudged to 0 as git does, so git still compares their content (the new index's later mtime would
otherwise hide a same-second edit). No path, object id or extension changes (their offsets stay the same), so the
TREE cache, the untracked cache and the end-of-index entry stay valid.

Anything unusual — a split index (`link` extension), an unknown version, an index we cannot parse, the lock held,
an entry that is not the blob we expect — patches nothing and the caller falls back to the refresh through git.
The caller (materialize.settle_index) passes only files whose stat, taken after the clock left the second they were
written in, is exactly what it wrote: any later edit has a later ctime second, which git sees.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from gittheta_merge.storage.gitutil import Repo

_STAT = struct.Struct(">10I")  # ctime s, ctime ns, mtime s, mtime ns, dev, ino, mode, uid, gid, size
_FLAG_EXTENDED = 0x4000
_SIZE_OFFSET = 36  # the tenth 32-bit stat field: the file size


def _varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """git's offset varint (index v4 path prefix lengths): 7 bits per byte, each continuation adds one."""
    byte = data[pos]
    value = byte & 0x7F
    pos += 1
    while byte & 0x80:
        byte = data[pos]
        value = ((value + 1) << 7) | (byte & 0x7F)
        pos += 1
    return value, pos


def _hash_name(repo: Repo) -> str:
    return "sha256" if repo.config_get("extensions.objectformat") == "sha256" else "sha1"


def record_stat(repo: Repo, files: dict[str, tuple[str, os.stat_result]]) -> set[str]:
    """Patch the stat data of `files` (path -> (expected blob, the file's stat)) in the index; returns the paths
    patched (empty when the index could not be patched safely: the caller then refreshes through git)."""
    if not files:
        return set()
    index_path = Path(repo.git("rev-parse", "--git-path", "index").decode().strip())
    if not index_path.is_absolute():
        index_path = repo.root / index_path
    lock = index_path.with_name(index_path.name + ".lock")
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError:
        return set()  # git (or another tool) holds the index
    try:
        try:
            st_index = os.stat(index_path)
            patched, data = _patch(index_path.read_bytes(), files, _hash_name(repo), st_index.st_mtime_ns // 10**9)
        except (OSError, ValueError, IndexError, struct.error, UnicodeError):
            patched, data = set(), b""  # an index we cannot read as documented: git refreshes it instead
        if not patched:
            os.close(fd)
            fd = -1
            lock.unlink()
            return set()
        with os.fdopen(fd, "wb") as out:
            fd = -1
            out.write(data)
        os.replace(lock, index_path)
        return patched
    except BaseException:
        if fd >= 0:
            os.close(fd)
        lock.unlink(missing_ok=True)
        raise


def _patch(raw: bytes, files: dict[str, tuple[str, os.stat_result]], hash_name: str,
           index_second: int | None = None) -> tuple[set[str], bytes]:
    """The index with the stat data of `files` written in, and every other entry that git would treat as racily
    clean against the old index (mtime in or after `index_second`, the old index file's mtime) smudged the way git
    smudges them (size 0), so that git still compares their content: the new index has a later mtime, which would
    otherwise make a same-second edit of such a file look clean."""
    hash_len = 32 if hash_name == "sha256" else 20
    if len(raw) < 12 + hash_len or raw[:4] != b"DIRC":
        return set(), raw
    version, count = struct.unpack_from(">II", raw, 4)
    if version not in (2, 3, 4):
        return set(), raw
    data = bytearray(raw)
    wanted = {p.encode(): (blob, st) for p, (blob, st) in files.items()}
    patched: set[str] = set()
    pos, previous = 12, b""
    end = len(raw) - hash_len
    for _ in range(count):
        start = pos
        pos += _STAT.size
        oid = raw[pos: pos + hash_len].hex()
        pos += hash_len
        (flags,) = struct.unpack_from(">H", raw, pos)
        pos += 2
        if version >= 3 and flags & _FLAG_EXTENDED:
            pos += 2
        if version == 4:
            strip, pos = _varint(raw, pos)
            nul = raw.index(b"\0", pos)
            name = previous[: len(previous) - strip] + raw[pos:nul]
            pos = nul + 1
            previous = name
        else:
            nul = raw.index(b"\0", pos)
            name = raw[pos:nul]
            pos = start + ((nul - start + 8) & ~7)  # 1-8 NULs pad the entry to a multiple of eight bytes
        if pos > end:
            return set(), raw
        stage = (flags >> 12) & 3
        hit = wanted.get(name)
        old_stat = _STAT.unpack_from(raw, start)
        mode = old_stat[6]
        if hit is None or stage != 0 or oid != hit[0]:
            # not ours: racily clean against the old index (git compares seconds)? smudge its size as git does;
            # gitlinks and sparse directories git never compares by stat
            if index_second is not None and old_stat[2] >= index_second and mode not in (0o160000, 0o040000):
                struct.pack_into(">I", data, start + _SIZE_OFFSET, 0)
            continue
        st = hit[1]
        fields = (st.st_ctime_ns // 10**9, st.st_ctime_ns % 10**9, st.st_mtime_ns // 10**9, st.st_mtime_ns % 10**9,
                  st.st_dev, st.st_ino, mode, st.st_uid, st.st_gid, st.st_size)
        _STAT.pack_into(data, start, *(f & 0xFFFFFFFF for f in fields))
        patched.add(name.decode())
    if _has_extension(raw, pos, end, b"link"):
        return set(), raw  # a split index: entries live in a shared index we do not touch
    if not patched:
        return set(), raw
    trailer = raw[end:]
    if trailer != bytes(hash_len):  # index.skipHash writes zeros, which git then does not check
        data[end:] = hashlib.new(hash_name, memoryview(data)[:end]).digest()
    return patched, bytes(data)


def _has_extension(raw: bytes, pos: int, end: int, signature: bytes) -> bool:
    while pos + 8 <= end:
        sig, size = raw[pos: pos + 4], struct.unpack_from(">I", raw, pos + 4)[0]
        if sig == signature:
            return True
        pos += 8 + size
    return False
