"""Named pause points, injected into the processes a test starts (PYTHONPATH=tests/inject, and the variable below),
so a test acts at a known moment inside a running command instead of racing a timer, with no test switch in the
product code. Python imports this module at start-up in every process that inherits PYTHONPATH, including the filter
and merge driver git starts.

GITTHETA_TEST_PAUSE=POINT:N:PIDFILE makes the N-th arrival at POINT in a process write its pid to PIDFILE and wait
until PIDFILE.go exists (or 300 s pass); the test then kills it, or runs something beside it and creates the .go
file. Once PIDFILE.go exists no process pauses again. The points wrap the object store's methods:
  object-written   after an object is newly stored (add, merges, stats)
  objects-checked  after a command checked that the objects it names exist, just before it answers (the clean)
  objects-fetched  when the first downloaded object is about to be verified (after git-lfs wrote them)
  object-opened    before an object is opened for reading (checkout's smudge, merges, diff)
"""

from __future__ import annotations

import functools
import os
import time

_SPEC = os.environ.get("GITTHETA_TEST_PAUSE", "")
_counts: dict[str, int] = {}


def _pause(point: str) -> None:
    name, count, pidfile = (_SPEC.split(":", 2) + ["", ""])[:3]
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] != int(count or 1) or not pidfile or os.path.exists(pidfile + ".go"):
        return
    tmp = f"{pidfile}.{os.getpid()}.tmp"  # several processes may pause at once (torchrun's ranks): one each
    with open(tmp, "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(tmp, pidfile)
    deadline = time.monotonic() + 300
    while not os.path.exists(pidfile + ".go") and time.monotonic() < deadline:
        time.sleep(0.01)


def _after(point: str, when=lambda result: True):  # noqa: ANN001, ANN202
    def wrap(fn):  # noqa: ANN001, ANN202
        @functools.wraps(fn)
        def inner(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            result = fn(*args, **kwargs)
            if when(result):
                _pause(point)
            return result
        return inner
    return wrap


def _before(point: str):  # noqa: ANN202
    def wrap(fn):  # noqa: ANN001, ANN202
        @functools.wraps(fn)
        def inner(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            _pause(point)
            return fn(*args, **kwargs)
        return inner
    return wrap


if _SPEC:
    from gittheta_merge.storage.store import ObjectStore

    newly_written = lambda result: bool(result[1])  # noqa: E731 - (oid, new)
    ObjectStore.put = _after("object-written", newly_written)(ObjectStore.put)
    ObjectStore.put_stream = _after("object-written", newly_written)(ObjectStore.put_stream)
    ObjectStore.require_present = _after("objects-checked")(ObjectStore.require_present)
    ObjectStore.verify = _before("objects-fetched")(ObjectStore.verify)
    ObjectStore.open = _before("object-opened")(ObjectStore.open)
