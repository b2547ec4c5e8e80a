"""`git theta strategies` shows every strategy's declarations, and docs/strategies.md is generated from them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gittheta_merge.merge import strategies

ROOT = Path(__file__).resolve().parents[1]


def test_docs_page_is_generated_from_the_declarations() -> None:
    committed = (ROOT / "docs" / "strategies.md").read_text()
    assert committed == strategies.markdown(), "docs/strategies.md is stale: git theta strategies --markdown > it"


def test_cli_lists_every_strategy_with_each_parameter_and_its_help() -> None:
    out = subprocess.run([sys.executable, "-m", "gittheta_merge", "strategies"], capture_output=True, text=True,
                         check=True).stdout
    for name in strategies.all_names():
        cls = strategies.get(name)
        assert f"\n{name}" in "\n" + out
        for key, spec in cls.params_spec.items():
            assert f"--set {key}=" in out and spec.help in out
    assert "[needs statistics: fisher]" in out  # declared by the data-aware strategies themselves


def test_unknown_name_is_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "gittheta_merge", "strategies", "nosuch"], capture_output=True,
                          text=True)
    assert proc.returncode == 1 and "unknown merge strategy 'nosuch'" in proc.stderr and "Traceback" not in proc.stderr
