"""A minimal progress bar on stderr (tensors and bytes), shown only when stderr is a terminal."""

from __future__ import annotations

import sys
import time


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


class Progress:
    """`update(tensors, bytes)` redraws at most 10×/s; `close()` prints the final line."""

    def __init__(self, label: str, total_tensors: int | None = None, total_bytes: int | None = None,
                 enabled: bool | None = None, min_seconds: float = 0.5) -> None:
        self.label = label
        self.total_tensors = total_tensors
        self.total_bytes = total_bytes
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.monotonic()
        self.min_seconds = min_seconds
        self._last = 0.0
        self._shown = False
        self.tensors = 0
        self.bytes = 0

    def update(self, tensors: int, nbytes: int) -> None:
        self.tensors, self.bytes = tensors, nbytes
        now = time.monotonic()
        if not self.enabled or now - self._last < 0.1 or now - self.start < self.min_seconds:
            return
        self._last = now
        self._draw()

    def _draw(self, end: str = "") -> None:
        tensors = f"{self.tensors}" + (f"/{self.total_tensors}" if self.total_tensors else "")
        size = _mb(self.bytes) + (f"/{_mb(self.total_bytes)}" if self.total_bytes else "")
        bar = ""
        if self.total_bytes:
            filled = int(24 * min(self.bytes / self.total_bytes, 1.0))
            bar = "[" + "#" * filled + "-" * (24 - filled) + "] "
        rate = self.bytes / max(time.monotonic() - self.start, 1e-9)
        sys.stderr.write(f"\r{self.label}: {bar}{tensors} tensors, {size} ({_mb(int(rate))}/s){end}")
        sys.stderr.flush()
        self._shown = True

    def close(self) -> None:
        if self.enabled and self._shown:
            self._draw("\n")
