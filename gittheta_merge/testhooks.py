"""Named pause points, so tests can act at a known moment inside a running command instead of racing a timer.

GITTHETA_TEST_PAUSE=POINT:N:PIDFILE makes the N-th arrival at POINT in a process write its pid to PIDFILE and wait
until PIDFILE.go exists (or 300 s pass); the test then kills it, or runs something beside it and creates the .go
file. Once PIDFILE.go exists no process pauses again (child processes inherit the variable). Unset, a pause point
costs one dictionary lookup. The points: clean-answer (the clean filter before it answers git), object-written
(after an object is newly stored), merge-tensor (after the N-th merged tensor), objects-fetched (after git-lfs
downloaded objects, before they are verified).
"""

from __future__ import annotations

import os
import time

_counts: dict[str, int] = {}


def pause(point: str) -> None:
    spec = os.environ.get("GITTHETA_TEST_PAUSE")
    if not spec:
        return
    name, count, pidfile = (spec.split(":", 2) + ["", ""])[:3]
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] != int(count or 1) or not pidfile or os.path.exists(pidfile + ".go"):
        return
    with open(pidfile + ".tmp", "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(pidfile + ".tmp", pidfile)
    deadline = time.monotonic() + 300
    while not os.path.exists(pidfile + ".go") and time.monotonic() < deadline:
        time.sleep(0.01)
