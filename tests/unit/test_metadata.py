"""The metadata format: round trip, one tensor per line, and validation of untrusted input."""

from __future__ import annotations

import json

import pytest

from gittheta_merge import dtypes
from gittheta_merge.errors import ThetaError
from gittheta_merge.storage.metadata import Metadata, TensorEntry, is_metadata, plan_blocks

OID_A = "a" * 64
OID_B = "b" * 64


def sample() -> Metadata:
    return Metadata(
        "safetensors",
        [
            TensorEntry("w", "F32", [4, 3], [(OID_A, 4)]),
            TensorEntry("big", "BF16", [10, 2], [(OID_A, 6), (OID_B, 4)]),
            TensorEntry("scalar", "I64", [], [(OID_B, 1)], {"parameter": True}),
        ],
        {"metadata": {"k": "v", "ü": "ß"}},
    )


def test_round_trip_and_layout() -> None:
    meta = sample()
    data = meta.to_bytes()
    assert is_metadata(data)
    back = Metadata.from_bytes(data)
    assert back == meta
    assert back.to_bytes() == data  # stable serialization
    lines = data.decode().splitlines()
    tensor_lines = [ln for ln in lines if ln.startswith('{"name"')]
    assert len(tensor_lines) == 3  # one line per tensor: git diff shows exactly the changed tensors
    assert json.loads(data)["gittheta"] == 1


def test_sizes_are_derived_not_trusted() -> None:
    meta = sample()
    big = meta.by_name()["big"]
    assert big.nbytes == 10 * 2 * 2
    assert big.block_sizes() == [24, 16]
    assert set(meta.iter_oids()) == {OID_A, OID_B}


@pytest.mark.parametrize(
    "tensor, message",
    [
        ({"name": "x", "dtype": "F32", "shape": [2], "oid": "../../etc/passwd"}, "invalid object id"),
        ({"name": "x", "dtype": "F32", "shape": [-1], "oid": OID_A}, "invalid shape"),
        ({"name": "x", "dtype": "F99", "shape": [2], "oid": OID_A}, "unknown dtype"),
        ({"name": "x", "dtype": "F32", "shape": [4], "blocks": [[OID_A, 1], [OID_B, 1]]}, "cover 2 rows"),
        ({"name": "x", "dtype": "F32", "shape": [1 << 30, 1 << 30], "oid": OID_A}, "implausible"),
        ({"dtype": "F32", "shape": [2], "oid": OID_A}, "without a name"),
    ],
)
def test_rejects_bad_tensor_entries(tensor: dict, message: str) -> None:
    data = json.dumps({"gittheta": 1, "format": "safetensors", "tensors": [tensor]}).encode()
    with pytest.raises(ThetaError, match=message):
        Metadata.from_bytes(data, "model.safetensors")


def test_rejects_newer_schema_and_duplicates() -> None:
    with pytest.raises(ThetaError, match="upgrade"):
        Metadata.from_bytes(b'{"gittheta": 99, "format": "x", "tensors": []}')
    entry = {"name": "x", "dtype": "F32", "shape": [2], "oid": OID_A}
    with pytest.raises(ThetaError, match="twice"):
        Metadata.from_bytes(json.dumps({"gittheta": 1, "format": "s", "tensors": [entry, entry]}).encode())
    with pytest.raises(ThetaError, match="not a valid"):
        Metadata.from_bytes(b'{"gittheta": 1, "format"')


def test_plan_blocks() -> None:
    def counts(dtype: str, shape: list[int], limit: int) -> tuple[str, list[int]]:
        plan = plan_blocks(dtype, shape, limit)
        assert sum(plan.sizes) == dtypes.nbytes(dtype, shape)
        assert all(size <= limit for size in plan.sizes) or plan.sizes == [dtypes.itemsize(dtype)]
        return plan.split, plan.counts

    assert counts("F32", [100, 10], 4000) == ("rows", [100])
    assert counts("F32", [100, 10], 1000) == ("rows", [25, 25, 25, 25])
    assert counts("F32", [10, 10], 120) == ("rows", [3, 3, 3, 1])
    assert counts("F32", [], 1) == ("rows", [1])  # one element is the smallest block
    # a row above the limit: byte ranges of whole elements, never one huge block (the [1, 2**34] case)
    assert counts("F32", [3, 1000], 10) == ("bytes", [8] * 1500)
    assert counts("F32", [1, 1000], 1000) == ("bytes", [1000] * 4)
    assert counts("BF16", [1, 1001], 1000) == ("bytes", [1000, 1000, 2])
    assert sum(plan_blocks("BF16", [32000, 1536], 64 << 20).counts) == 32000
    huge = plan_blocks("F32", [1, 2**34], 64 << 20)  # 64 GB: planned without allocating anything
    assert huge.split == "bytes" and len(huge.sizes) == 1024 and max(huge.sizes) == 64 << 20


def test_byte_range_parts_round_trip_and_are_checked() -> None:
    entry = TensorEntry.from_plan("w", "F32", [1, 500], plan_blocks("F32", [1, 500], 800), [OID_A, OID_B, OID_A])
    meta = Metadata("safetensors", [entry])
    text = meta.to_bytes()
    assert b'"parts": [["' + OID_A.encode() + b'", 800]' in text and text.startswith(b'{"gittheta": 2,')
    back = Metadata.from_bytes(text).tensors[0]
    assert back.split == "bytes" and back.blocks == entry.blocks and back.block_sizes() == [800, 800, 400]
    assert back.row_boundaries() == [0, 1]
    raw = json.loads(text)
    raw["tensors"][0]["parts"][2][1] = 401  # the parts must cover exactly the bytes the dtype and shape imply
    with pytest.raises(ThetaError, match="parts cover 2001 bytes, shape has 2000"):
        Metadata.from_bytes(json.dumps(raw).encode())
    assert sample().to_bytes().startswith(b'{"gittheta": 1,')  # files without parts stay schema 1, as before
