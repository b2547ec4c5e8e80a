"""A minimal progress bar on stderr (tensors and bytes), shown only when stderr is a terminal; under torchrun a
per-rank progress line instead (every rank's stderr goes to one terminal or log, where redrawn bars would clobber
each other): a full line every `LINE_SECONDS` and a last one when the rank is done."""

from __future__ import annotations

import sys
import time


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


LINE_SECONDS = 10.0


def rank_label(rank: int | None, world: int | None) -> str:
    return f"[rank {rank}/{world}] " if rank is not None and world else ""


class Progress:
    """`update(tensors, bytes)` redraws at most 10×/s; `close()` prints the final line. With `rank` (rank, world):
    line mode, on every rank whatever `enabled` says."""

    def __init__(self, label: str, total_tensors: int | None = None, total_bytes: int | None = None,
                 enabled: bool | None = None, min_seconds: float = 0.5,
                 rank: tuple[int, int] | None = None) -> None:
        self.lines = rank is not None
        self.label = rank_label(*rank) + label if rank else label
        self.total_tensors = total_tensors
        self.total_bytes = total_bytes
        self.enabled = True if self.lines else sys.stderr.isatty() if enabled is None else enabled
        self.start = time.monotonic()
        self.min_seconds = min_seconds
        self._last = 0.0
        self._shown = False
        self.tensors = 0
        self.bytes = 0

    def update(self, tensors: int, nbytes: int) -> None:
        self.tensors, self.bytes = tensors, nbytes
        now = time.monotonic()
        if self.lines:
            if now - max(self._last, self.start) >= LINE_SECONDS:
                self._last = now
                self._draw("\n")
            return
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
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.bytes / elapsed
        lead, tail = ("", f", {elapsed:.1f} s") if self.lines else ("\r", "")
        sys.stderr.write(f"{lead}{self.label}: {bar}{tensors} tensors, {size} ({_mb(int(rate))}/s{tail}){end}")
        sys.stderr.flush()
        self._shown = True

    def close(self) -> None:
        if self.lines:
            self._draw(" done\n")
        elif self.enabled and self._shown:
            self._draw("\n")
