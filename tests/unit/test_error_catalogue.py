"""The error catalogue: each kind of user mistake raises its own ThetaError subclass, so API callers can catch the
kind they handle (and the CLI still prints every one of them in one line)."""

from __future__ import annotations

import errno
import io
from pathlib import Path

import pytest

from gittheta_merge import errors
from gittheta_merge.errors import InputError, MissingError, StorageError, ThetaError, UsageError
from gittheta_merge.formats.safetensors_header import parse_header
from gittheta_merge.merge.strategies import create, get
from gittheta_merge.storage.metadata import Metadata
from gittheta_merge.storage.store import ObjectStore


def test_every_kind_is_a_theta_error() -> None:
    for kind in (UsageError, InputError, MissingError, StorageError, errors.StatsError):
        assert issubclass(kind, ThetaError)
    assert issubclass(errors.StatsError, ValueError)  # API callers that caught ValueError still do


def test_usage_mistakes() -> None:
    with pytest.raises(UsageError, match="unknown merge strategy 'nosuch'"):
        get("nosuch")
    with pytest.raises(UsageError, match="unknown parameter 'densty'"):
        create("ties", {"densty": 0.2}, 2)
    with pytest.raises(UsageError, match="density must be in"):
        create("ties", {"density": 2}, 2)
    with pytest.raises(UsageError, match="weights has 3 values for 2 models"):
        create("average", {"weights": "1,2,3"}, 2)


def test_input_that_is_not_what_it_claims() -> None:
    with pytest.raises(InputError, match="not valid JSON"):
        Metadata.from_bytes(b"{nope", "model.safetensors")
    with pytest.raises(InputError, match="nested too deeply"):
        Metadata.from_bytes(b"[" * 5000 + b"]" * 5000, "model.safetensors")
    header = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 9]}}'
    with pytest.raises(InputError, match="needs 8"):
        parse_header(header, "model.safetensors")


def test_missing_and_corrupt_objects(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "lfs")
    with pytest.raises(MissingError, match="missing"):
        store.open("a" * 64, 4)
    oid, _ = store.put(b"abcd")
    with pytest.raises(InputError, match="fsck"):
        store.open(oid, 5)
    with pytest.raises(InputError, match="early"):
        store.put_stream(io.BytesIO(b"ab"), 4)


def test_storage_refusals(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="Nothing was changed"):
        errors.require_space(tmp_path, 1 << 62, "storing a model")
    full = errors.storage_error(OSError(errno.ENOSPC, "No space left", str(tmp_path / "x")))
    assert isinstance(full, StorageError) and "no space left" in str(full)
    assert errors.storage_error(OSError(errno.EBADF, "bad fd")) is None  # a bug, not the user's to fix
