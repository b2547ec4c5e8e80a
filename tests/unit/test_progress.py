"""The progress displays: a bar redrawn in place on a terminal, full lines per rank under torchrun, and nothing when
disabled. Both the tensor/byte bar (add, checkout, merge) and the statistics bar share these rules."""

from __future__ import annotations

import pytest

from gittheta_merge import progress
from gittheta_merge.progress import Progress
from gittheta_merge.stats.compute import _Progress


def test_terminal_bar_redraws_in_place_and_ends_with_a_line(capsys: pytest.CaptureFixture[str]) -> None:
    bar = Progress("git-theta merge", 4, 4_000_000, enabled=True, min_seconds=0.0)
    bar.update(2, 2_000_000)
    bar.close()
    err = capsys.readouterr().err
    assert err.startswith("\rgit-theta merge: [############------------] 2/4 tensors, 2.0 MB/4.0 MB")
    assert err.endswith("\n") and err.count("\r") == 2


def test_disabled_bar_and_a_run_too_short_to_show_write_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    off = Progress("x", 1, 10, enabled=False, min_seconds=0.0)
    off.update(1, 10)
    off.close()
    quick = Progress("y", 1, 10, enabled=True, min_seconds=60.0)  # done before its first redraw
    quick.update(1, 10)
    quick.close()
    assert capsys.readouterr().err == ""


def test_rank_lines_are_paced_and_end_with_done(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)  # every update is due
    bar = Progress("git-theta merge", 2, 200, rank=(1, 2), enabled=False)  # ranks always report
    bar.update(1, 100)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(ln.startswith("[rank 1/2] git-theta merge: ") for ln in lines)
    assert "1/2 tensors" in lines[0] and lines[1].endswith(" done") and "\r" not in "".join(lines)
    monkeypatch.setattr(progress, "LINE_SECONDS", 3600.0)
    quiet = Progress("git-theta merge", 2, 200, rank=(0, 2))
    quiet.update(1, 100)  # not due: only the last line
    quiet.close()
    assert capsys.readouterr().err.count("\n") == 1


def test_statistics_bar_counts_examples_and_always_ends_with_a_line(capsys: pytest.CaptureFixture[str]) -> None:
    bar = _Progress("fisher (sequence-classification)", 8, enabled=True)
    bar.update(4, 100)
    bar.update(4, 50)
    bar.close()
    last = capsys.readouterr().err.split("\r")[-1]
    assert last.startswith("fisher (sequence-classification): 8/8 examples, 150 tokens") and last.endswith("\n")
