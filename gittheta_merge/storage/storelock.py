"""Writers of objects and `git theta gc` never overlap, and gc never deletes what a writer handed to git.

Why: gc deletes the objects no commit, reflog or index entry refers to. A writer's objects become referenced
only when git writes the index or a commit, some time after they are stored: for the clean filter and the merge
driver that is done by the git process that called them, after they answered. Measured before this existed: a
`git add` of a 1 GB model with `git theta gc --prune now` beside it committed a version with 50 objects deleted.

How:
- every process that stores objects (or reuses a stored one) holds a shared `flock` on `<lfs>/theta-store.lock`:
  around each write, and for commands (WriterGuard.session) from their first write until git refers to what they
  stored (the filter: until git closes it, after writing its index; `git theta merge`: until its commit);
  gc holds it exclusively while it decides and deletes, so they never overlap
  (gc waits for writers, or with --no-wait refuses and names them; a writer that finds gc running waits for it);
- each such process lists the oids it stored or reused in `<lfs>/theta-pending/<pid>`, with the process that will
  make git refer to them (the calling git for a filter or driver, itself otherwise); gc keeps those objects while
  that process lives, and deletes the lists of processes that have ended (their objects are referenced by then,
  or were abandoned by a failed command).
Liveness is pid + start time (from /proc where there is one), so a reused pid is not mistaken for the writer.
Filesystems without flock (some network mounts) run without the lock, as before; gc then still spares pending
objects of live processes.
"""

from __future__ import annotations

import atexit
import errno
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gittheta_merge.errors import StorageError

LOCK_NAME = "theta-store.lock"
PENDING_DIR = "theta-pending"


def _proc_stat(pid: int) -> tuple[str, list[str]]:
    """(command name, the fields after it) of /proc/<pid>/stat; ("", []) where there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "", []
    return stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 1:].split()


def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' where /proc has none, or the process is gone)."""
    fields = _proc_stat(pid)[1]
    return fields[19] if fields else ""


def alive(pid: int, start: str) -> bool:
    """Is this process (pid and start time) still running?"""
    if pid <= 0:
        return False
    if Path("/proc/self/stat").exists():
        fields = _proc_stat(pid)[1]
        if fields and fields[0] == "Z":  # killed and not yet reaped (a container without an init): dead
            return False
        return bool(fields) and fields[19] == start and start != ""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def calling_git() -> int:
    """The nearest `git` ancestor (git may call us through `sh -c`); the parent where that cannot be told."""
    pid = os.getppid()
    for _ in range(8):
        name, fields = _proc_stat(pid)
        if name == "git":
            return pid
        if not fields or int(fields[1]) <= 1:
            break
        pid = int(fields[1])
    return os.getppid()


@dataclass
class Pending:
    """One process's list: who wrote, whose index or commit will refer to the objects, and the oids."""

    path: Path
    pid: int
    start: str
    owner: int
    owner_start: str
    label: str
    oids: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> Pending | None:
        try:
            lines = path.read_text().splitlines()
            pid, start, owner, owner_start, label = lines[0].split(" ", 4)
            return cls(path, int(pid), start, int(owner), owner_start, label, [x for x in lines[1:] if len(x) == 64])
        except (OSError, ValueError, IndexError):
            return None  # half-written by a process killed in its first line: protects nothing

    @property
    def writer_alive(self) -> bool:
        return alive(self.pid, self.start)

    @property
    def protects(self) -> bool:
        return self.writer_alive or alive(self.owner, self.owner_start)

    def describe(self) -> str:
        return f"{self.label} (pid {self.pid})"


def _flock(fd: int, mode: int) -> None:
    """flock; nothing where the filesystem cannot lock (then we go on without, as before this lock existed)."""
    import fcntl

    try:
        fcntl.flock(fd, mode)
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise  # BlockingIOError (EWOULDBLOCK) included: the caller decides whether to wait


def _lock(fd: int, exclusive: bool, busy: Callable[[], None]) -> None:
    """Take the store lock on fd; if someone holds it the other way, call `busy` (which says who, or refuses),
    then wait."""
    import fcntl

    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        _flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        busy()
        _flock(fd, mode)


def _say(message: str) -> None:
    sys.stderr.write(f"git-theta: {message}\n")
    sys.stderr.flush()


def _open_lock(lfs_dir: Path) -> int | None:
    """The lock file's fd; None in a store this user cannot write (a shared read-only store): nobody can delete
    objects there as this user, and reusing its objects needs no lock; a write there fails with its own error."""
    try:
        lfs_dir.mkdir(parents=True, exist_ok=True)
        return os.open(lfs_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return None
        raise


def live_writers(lfs_dir: Path) -> list[Pending]:
    folder = lfs_dir / PENDING_DIR
    if not folder.is_dir():
        return []
    found = [Pending.read(p) for p in sorted(folder.iterdir())]
    return [p for p in found if p is not None and p.writer_alive]


def sweep(folder: Path, unreadable_too: bool = True) -> list[Pending]:
    """The pending lists that still protect their objects; deletes those of processes that have ended (with the
    git that called them): by then git has written its index or given up. Runs under the store lock; a writer
    (shared lock) leaves unreadable lists alone: another writer may be writing its first line."""
    kept: list[Pending] = []
    if not folder.is_dir():
        return kept
    for path in folder.iterdir():
        pending = Pending.read(path)
        if pending is not None and pending.protects:
            kept.append(pending)
        elif pending is not None or unreadable_too:
            path.unlink(missing_ok=True)
    return kept


class WriterGuard:
    """This process's share of the store lock and its pending list.

    A write outside any session holds the lock for that write only (`hold`). A `session` keeps it, from its first
    write to its end, for commands whose objects must survive until git refers to them; `owner` is the process
    that will make git do so: "git" for the filter and the merge driver (git writes the index after they answer),
    "self" for commands that stage or commit themselves. Sessions nest (a smudge's download inside the filter's)."""

    def __init__(self, lfs_dir: Path) -> None:
        self.lfs_dir = lfs_dir
        self.owner = "self"
        self.label = "git-theta " + " ".join(os.path.basename(a) for a in sys.argv[1:2])
        self._fd: int | None = None
        self._pending: Path | None = None
        self._file: Any = None
        self._recorded: set[str] = set()
        self._sessions = 0
        self._holds = 0
        self._registered = False  # our atexit release
        self._mutex = threading.Lock()  # the clean stores blocks from a helper thread too

    @contextmanager
    def session(self, owner: str = "self", eager: bool = False) -> Iterator[None]:
        """Keep the lock from the first write (or now, if eager) until the end of the block."""
        with self._mutex:
            self._sessions += 1
            if self._sessions == 1:
                self.owner = owner
            if eager:
                self._acquire()
        try:
            yield
        finally:
            with self._mutex:
                self._sessions -= 1
                self._release_if_idle()

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Around one write or reuse of an object."""
        with self._mutex:
            self._holds += 1
            self._acquire()
        try:
            yield
        finally:
            with self._mutex:
                self._holds -= 1
                self._release_if_idle()

    def record(self, oid: str) -> None:
        """Note an oid stored or reused under `hold` (gc cannot run between the write and the index that needs it
        while our list names it)."""
        with self._mutex:
            self._acquire()
            if self._file is not None and oid not in self._recorded:
                self._recorded.add(oid)
                self._file.write(oid + "\n")
                self._file.flush()

    def _acquire(self) -> None:
        if self._fd is not None or sys.platform == "win32":
            return
        fd = _open_lock(self.lfs_dir)
        if fd is None:
            return
        _lock(fd, False, lambda: _say("waiting for `git theta gc` to finish before storing objects"))
        self._fd = fd
        folder = self.lfs_dir / PENDING_DIR
        folder.mkdir(exist_ok=True)
        sweep(folder, unreadable_too=False)
        owner = calling_git() if self.owner == "git" and self._sessions else os.getpid()
        self._pending = folder / str(os.getpid())
        self._file = open(self._pending, "w")  # noqa: SIM115 - appended to until the lock is released
        self._file.write(f"{os.getpid()} {start_time(os.getpid())} {owner} {start_time(owner)} {self.label}\n")
        self._file.flush()
        if not self._registered:
            atexit.register(self._at_exit)
            self._registered = True

    def _at_exit(self) -> None:
        with self._mutex:
            self._sessions = self._holds = 0
            self._release_if_idle()

    def _release_if_idle(self) -> None:
        """Drop the lock when no session or write needs it; our list stays while a calling git may still need it."""
        if self._sessions or self._holds:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
            if (self.owner != "git" or not self._recorded) and self._pending is not None:
                self._pending.unlink(missing_ok=True)
        self._recorded = set()
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None


class GcLock:
    """gc's exclusive hold on the store; `protected` are the pending oids of live processes, read under it."""

    def __init__(self, lfs_dir: Path, wait: bool = True) -> None:
        self.lfs_dir = lfs_dir
        self.wait = wait
        self._fd: int | None = None
        self.protected: set[str] = set()

    def __enter__(self) -> GcLock:
        if sys.platform != "win32":
            fd = _open_lock(self.lfs_dir)
            if fd is None:
                raise StorageError(f"{self.lfs_dir} is not writable for this user (uid {os.getuid()}): gc cannot "
                                 "delete objects there; run it as the store's owner")

            def busy() -> None:
                names = ", ".join(p.describe() for p in live_writers(self.lfs_dir)) or "another git-theta process"
                if not self.wait:
                    os.close(fd)
                    raise StorageError(f"objects are being written by {names}; gc did nothing. Run it again when "
                                     "that has finished, or without --no-wait to wait for it")
                _say(f"gc is waiting for {names} to finish")

            _lock(fd, True, busy)
            self._fd = fd
        self.protected = {oid for pending in sweep(self.lfs_dir / PENDING_DIR) for oid in pending.oids}
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
