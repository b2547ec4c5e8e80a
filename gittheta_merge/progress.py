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


class Ticker:
    """What every progress display shares: on a terminal one line redrawn in place (at most every
    `redraw_seconds`, not before `min_seconds`); under torchrun (`rank` = (rank, world)) a full line every
    LINE_SECONDS on every rank, and a last one ending in "done". Subclasses say what the line holds (`text`)."""

    redraw_seconds = 0.1
    final_line_always = False  # on a terminal: a last line even when the run ended before the first redraw

    def __init__(self, label: str, enabled: bool | None = None, rank: tuple[int, int] | None = None,
                 min_seconds: float = 0.0) -> None:
        self.lines = rank is not None
        self.label = rank_label(*rank) + label if rank else label
        self.enabled = True if self.lines else sys.stderr.isatty() if enabled is None else enabled
        self.start = time.monotonic()
        self.min_seconds = min_seconds
        self._last = self.start if self.lines else 0.0
        self._shown = False

    def elapsed(self) -> float:
        return max(time.monotonic() - self.start, 1e-9)

    def text(self) -> str:
        raise NotImplementedError

    def tick(self) -> None:
        """Draw now if a line is due."""
        if not self.enabled:
            return
        now = time.monotonic()
        if self.lines:
            if now - self._last < LINE_SECONDS:
                return
        elif now - self._last < self.redraw_seconds or now - self.start < self.min_seconds:
            return
        self._last = now
        self._draw("\n" if self.lines else "")

    def _draw(self, end: str) -> None:
        sys.stderr.write(f"{'' if self.lines else chr(13)}{self.label}: {self.text()}{end}")
        sys.stderr.flush()
        self._shown = True

    def close(self) -> None:
        if self.lines:
            self._draw(" done\n")
        elif self.enabled and (self._shown or self.final_line_always):
            self._draw("\n")


class Progress(Ticker):
    """Tensors and bytes: `update(tensors, bytes)` with the running totals; `close()` prints the final line."""

    def __init__(self, label: str, total_tensors: int | None = None, total_bytes: int | None = None,
                 enabled: bool | None = None, min_seconds: float = 0.5,
                 rank: tuple[int, int] | None = None) -> None:
        super().__init__(label, enabled, rank, min_seconds)
        self.total_tensors = total_tensors
        self.total_bytes = total_bytes
        self.tensors = 0
        self.bytes = 0

    def update(self, tensors: int, nbytes: int) -> None:
        self.tensors, self.bytes = tensors, nbytes
        self.tick()

    def text(self) -> str:
        tensors = f"{self.tensors}" + (f"/{self.total_tensors}" if self.total_tensors else "")
        size = _mb(self.bytes) + (f"/{_mb(self.total_bytes)}" if self.total_bytes else "")
        bar = ""
        if self.total_bytes:
            filled = int(24 * min(self.bytes / self.total_bytes, 1.0))
            bar = "[" + "#" * filled + "-" * (24 - filled) + "] "
        elapsed = self.elapsed()
        rate = self.bytes / elapsed
        tail = f", {elapsed:.1f} s" if self.lines else ""
        return f"{bar}{tensors} tensors, {size} ({_mb(int(rate))}/s{tail})"
