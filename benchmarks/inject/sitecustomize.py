"""Injected into the processes a benchmark starts (PYTHONPATH=benchmarks/inject): with GIT_THETA_RSS_LOG=FILE, each
Python process appends "pid peak-RSS-KB" to FILE when it exits, so track.py learns the filter's own peak RSS
(git's is separate) without a benchmark switch in the product code."""

from __future__ import annotations

import os

_TARGET = os.environ.get("GIT_THETA_RSS_LOG")

if _TARGET:
    import atexit
    import resource

    def _log_peak_rss() -> None:
        with open(_TARGET, "a") as log:
            log.write(f"{os.getpid()} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\n")

    atexit.register(_log_peak_rss)
