"""Format plugins load through the entry-point group; install scopes; every dtype through real git."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from conftest import git, init_repo
from safetensors.torch import save_file
from tensor_helpers import ALL_DTYPES, make_tensor

from gittheta_merge import formats
from gittheta_merge.formats.base import Context
from gittheta_merge.storage.store import ObjectStore

PLUGIN = '''
from gittheta_merge.formats.base import CheckpointFormat
from gittheta_merge.storage.metadata import Metadata, TensorEntry


class RawU8Format(CheckpointFormat):
    """A toy third-party format: magic b"RAWU8\\n" followed by bytes, stored as one U8 tensor."""

    name = "rawu8"
    extensions = (".rawu8",)

    def sniff(self, path, head):
        return 2 if head.startswith(b"RAWU8\\n") else 0

    def clean(self, stream, ctx):
        stream.read(6)
        data = stream.read()
        oid, _ = ctx.store.put(data)
        return Metadata(self.name, [TensorEntry("data", "U8", [len(data)], [(oid, len(data))])])

    def smudge(self, meta, out, ctx):
        entry = meta.tensors[0]
        out.write(b"RAWU8\\n" + ctx.store.read(entry.oids[0], entry.nbytes))
'''


def test_third_party_format_registers_through_entry_points(tmp_path: Path, monkeypatch) -> None:
    site = tmp_path / "site"
    (site / "rawu8_plugin.py").parent.mkdir(parents=True)
    (site / "rawu8_plugin.py").write_text(PLUGIN)
    dist = site / "rawu8_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rawu8-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[gittheta_merge.formats]\nrawu8 = rawu8_plugin:RawU8Format\n")
    monkeypatch.syspath_prepend(str(site))
    formats.registry.cache_clear()
    try:
        names = set(formats.registry())
        assert {"safetensors", "pytorch", "rawu8"} <= names  # built-ins register the same way
        fmt = formats.detect("x.bin", b"RAWU8\nhello")
        store = ObjectStore(tmp_path / "lfs")
        ctx = Context("x.bin", store)
        meta = fmt.clean(io.BytesIO(b"RAWU8\nhello plugin"), ctx)
        out = io.BytesIO()
        formats.by_name(meta.format).smudge(meta, out, ctx)
        assert out.getvalue() == b"RAWU8\nhello plugin"
    finally:
        formats.registry.cache_clear()
        sys.modules.pop("rawu8_plugin", None)


def test_install_scope_user_writes_home_config(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    repo = init_repo(tmp_path / "r", install=False)
    git(repo, "theta", "install", "--scope", "user", env=env)
    config = (home / ".gitconfig").read_text()
    assert "filter-process" in config and "required = true" in config
    assert "filter.theta" not in git(repo, "config", "--local", "--list").stdout.decode()
    other = init_repo(tmp_path / "other", install=False)  # every repo of this user is covered
    save_file({"w": torch.ones(3)}, other / "m.safetensors")
    git(other, "theta", "track", "m.safetensors", env=env)
    git(other, "add", ".", env=env)
    assert git(other, "show", ":m.safetensors").stdout.startswith(b'{"gittheta"')


def test_every_dtype_through_git(repo: Path) -> None:
    state = {f"t{i}": make_tensor(d, (9, 4), i) for i, d in enumerate(ALL_DTYPES)}
    save_file(state, repo / "all.safetensors", metadata={"k": "v"})
    data = (repo / "all.safetensors").read_bytes()
    git(repo, "theta", "track", "all.safetensors")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "dtypes")
    listing = git(repo, "theta", "ls").stdout.decode()
    for dtype in ("F8_E4M3", "F8_E5M2", "BF16", "BOOL", "U16", "I64"):
        assert f" {dtype} " in listing
    (repo / "all.safetensors").unlink()
    git(repo, "checkout", "--", "all.safetensors")
    assert (repo / "all.safetensors").read_bytes() == data


@pytest.mark.parametrize("target", ["sub/dir/m.safetensors", "*.safetensors"])
def test_track_from_a_subdirectory(repo: Path, target: str) -> None:
    sub = repo / "sub" / "dir"
    sub.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, sub / "m.safetensors")
    cwd = repo if target.startswith("sub/") else sub
    git(cwd, "theta", "track", target)
    git(repo, "add", ".")
    assert git(repo, "show", ":sub/dir/m.safetensors").stdout.startswith(b'{"gittheta"')
