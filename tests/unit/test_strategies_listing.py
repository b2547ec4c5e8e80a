"""`git theta strategies` shows every strategy's declarations, and docs/strategies.md is generated from them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gittheta_merge.merge import strategies

ROOT = Path(__file__).resolve().parents[2]


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


def test_settings_table_in_docs_is_generated_from_the_settings_model() -> None:
    from gittheta_merge.merge import config

    page = (ROOT / "docs" / "merge.md").read_text()
    table = page.split("<!-- settings-table -->\n", 1)[1].split("<!-- /settings-table -->", 1)[0]
    assert table == config.settings_table(), "docs/merge.md's settings table is stale (merge/config.py SETTINGS)"


def test_every_setting_is_read_from_each_layer(tmp_path) -> None:
    """Each declared setting, set in .gittheta.toml, then overridden by git config, then by the command line."""
    import subprocess as sp

    from gittheta_merge.merge import config
    from gittheta_merge.storage.gitutil import Repo

    sp.run(["git", "init", "-q", str(tmp_path)], check=True)
    values = {"shortcuts": ("exact", "git"), "max_block_bytes": ("1048576", "2097152"),
              "missing_stats": ("average", "ties"), "allow_stale_stats": ("true", "false"), "device": ("cuda", "cpu"),
              "out_dtype": ("BF16", "F16")}
    assert set(values) == {s.name for s in config.SETTINGS}
    (tmp_path / ".gittheta.toml").write_text("[merge]\n" + "".join(
        f"{k} = {v[0] if k in ('max_block_bytes', 'allow_stale_stats') else repr(v[0])}\n" for k, v in values.items()))
    repo = Repo.discover(tmp_path)
    got = config.resolve(repo, "m.safetensors")
    for st in config.SETTINGS:
        assert getattr(got, st.name) == st.parse(values[st.name][0], "test")
        assert got.origin[st.name].startswith(".gittheta")
    for st in config.SETTINGS:
        sp.run(["git", "config", f"theta.merge.{st.git_key}", values[st.name][1]], cwd=tmp_path, check=True)
    got = config.resolve(repo, "m.safetensors")
    for st in config.SETTINGS:
        assert getattr(got, st.name) == st.parse(values[st.name][1], "test") and got.origin[st.name] == "git config"
    got = config.resolve(repo, "m.safetensors", {"device": "cuda:1"})
    assert got.device == "cuda:1" and got.origin["device"] == "command line"
