"""The error catalogue: one exception family for every problem a user can fix, so the CLI prints it in one line
without a traceback (exit code 1), and API callers can catch the kind they handle. Each message names the file,
the tensor and the fix. Also the translation of the storage errors a user fixes on their side (disk full, quota,
read-only, permissions) into the catalogue.

    ThetaError           any user-facing error (catch this to catch them all)
    ├── UsageError       a flag, setting, strategy, parameter or rule that is wrong: fix the command or config
    ├── InputError       a file or commit that is not what it claims (not a checkpoint, hostile or corrupt header,
    │                    tampered metadata, models that cannot be merged): fix or replace the input
    ├── MissingError     something referred to is not here (a revision, an object, a statistic): fetch or create it
    ├── StorageError     the disk or the filesystem refuses (full, quota, read-only, permissions, a lock held)
    └── StatsError       a mistake in computing or attaching statistics (data file, task, kind, labels)
"""

from __future__ import annotations

import errno
import os
import shutil


class ThetaError(Exception):
    """A user-facing error: the message names the file, the tensor and the fix."""


class UsageError(ThetaError):
    """A flag, setting, strategy, parameter or rule the user gave is wrong; the message says what is accepted."""


class InputError(ThetaError):
    """A checkpoint, metadata file or commit is not valid input (not a checkpoint, hostile, corrupt, or models that
    cannot be merged together); nothing was stored."""


class MissingError(ThetaError):
    """A revision, object or statistic the command needs is not here; the message says how to fetch or make it."""


class StorageError(ThetaError):
    """The filesystem refused (no space, quota, read-only, permissions) or another process holds the store."""


SPACE_FIX = ("free space (`git theta gc --prune now` deletes objects nothing refers to) or move the repository to a "
             "larger disk, then retry")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Free bytes for this user on the filesystem holding `path` (its nearest existing parent)."""
    here = os.path.abspath(path)
    while not os.path.exists(here) and os.path.dirname(here) != here:
        here = os.path.dirname(here)
    try:
        return shutil.disk_usage(here).free
    except OSError:
        return 1 << 62  # unknown: let the write itself tell


def require_space(folder: str | os.PathLike[str], needed: int, what: str) -> None:
    """Refuse before writing `needed` bytes under `folder` when they cannot fit (checked, not reserved)."""
    free = free_bytes(folder)
    if needed > free:
        raise StorageError(f"{what}: needs {human_bytes(needed)} in {folder} but only {human_bytes(free)} is free: "
                         f"{SPACE_FIX}. Nothing was changed")


def storage_error(exc: OSError, what: str = "", needed: int | None = None) -> StorageError | None:
    """A one-line StorageError naming the path and the fix for an OSError the user fixes on their side; None for any
    other OSError (a bug, to be reported with its traceback)."""
    path = exc.filename or "the target"
    where = f"{what}: " if what else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        cause = "no space left on the device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        need = f"{human_bytes(needed)} needed, " if needed is not None else ""
        return StorageError(f"{where}{cause} writing {path} ({need}{human_bytes(free_bytes(path))} free): {SPACE_FIX}. "
                          "Nothing was recorded")
    if exc.errno == errno.EROFS:
        return StorageError(f"{where}{path} is on a read-only filesystem: make it writable, or work in a clone on a "
                          "writable disk")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return StorageError(f"{where}no permission to write {path} (as user {os.getuid()}): have its owner make it "
                          "writable for you (chmod/chown), or work in a clone of your own")
    return None


def loads_untrusted(data: str | bytes, where: str, what: str = "JSON", **kwargs: object) -> object:
    """json.loads of bytes from a file or a commit we did not write: bad JSON, and JSON nested deeper than Python's
    parser recurses (a hostile header of 1,000 levels fits well within 100 MB), are an InputError naming `where`."""
    import json

    try:
        return json.loads(data, **kwargs)  # type: ignore[arg-type]
    except RecursionError:
        raise InputError(f"{where}: {what} is nested too deeply to be a checkpoint's (hostile or corrupt input); "
                         "nothing was stored") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{where}: not a valid {what}: not valid JSON ({exc})") from None


class StatsError(ThetaError, ValueError):
    """A mistake in computing or attaching statistics (data file, task, kind, labels): a ThetaError for the CLI, and
    still a ValueError for API callers who catch that."""
