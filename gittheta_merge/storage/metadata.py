"""The metadata file git stores in place of a checkpoint.

It is JSON laid out one tensor per line, in the checkpoint's own tensor order, so `git diff` of two
versions lists exactly the tensors that changed and a plain 3-way text merge of disjoint changes is
already correct. Per tensor: name, dtype, shape and the object id(s) of its bytes; a tensor larger than
the block limit is split into row blocks, each its own object. Format-specific facts needed to rebuild
the original file exactly (safetensors header metadata, a PyTorch checkpoint's nested structure) live
in "file". Everything read from a metadata file is validated: it may come from anyone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from gittheta_merge import dtypes
from gittheta_merge.constants import BLOCK_BYTES, MAX_METADATA_BYTES  # noqa: F401 - re-exported
from gittheta_merge.errors import InputError, loads_untrusted
from gittheta_merge.storage.store import check_oid

SCHEMA_VERSION = 1
MAGIC = b'{"gittheta":'
MAX_ELEMENTS = 1 << 50  # far above any real tensor; rejects absurd shapes before arithmetic


def is_metadata(head: bytes) -> bool:
    """True if content starts like a metadata file (used to pass already-clean content through)."""
    return head.lstrip()[: len(MAGIC)] == MAGIC


@dataclass
class TensorEntry:
    """One tensor: its dtype, shape and the objects holding its bytes (row blocks, in order)."""

    name: str
    dtype: str
    shape: list[int]
    blocks: list[tuple[str, int]]  # (oid, number of leading-dimension rows)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return dtypes.nbytes(self.dtype, self.shape)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        rows = self.rows
        return self.nbytes // rows if rows else 0

    def block_sizes(self) -> list[int]:
        return [rows * self.row_bytes for _, rows in self.blocks] if self.rows else [0]

    @property
    def oids(self) -> list[str]:
        return [oid for oid, _ in self.blocks]

    def same_content(self, other: TensorEntry) -> bool:
        return (self.dtype, self.shape, self.oids) == (other.dtype, other.shape, other.oids)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": self.shape}
        if len(self.blocks) == 1:
            out["oid"] = self.blocks[0][0]
        else:
            out["blocks"] = [[oid, rows] for oid, rows in self.blocks]
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, raw: Any, where: str) -> TensorEntry:
        if not isinstance(raw, dict):
            raise InputError(f"{where}: tensor entry is not an object")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise InputError(f"{where}: tensor entry without a name")
        here = f"{where}: tensor {name!r}: "
        dtype = raw.get("dtype")
        if not isinstance(dtype, str):
            raise InputError(f"{here}missing dtype")
        dtypes.itemsize(dtype, where=here)
        shape = raw.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise InputError(f"{here}invalid shape {shape!r}")
        elements = 1
        for d in shape:
            elements *= d
        if elements > MAX_ELEMENTS:
            raise InputError(f"{here}implausible shape {shape}")
        rows = shape[0] if shape else 1
        if "oid" in raw:
            blocks = [(check_oid(raw["oid"], here), rows)]
        elif isinstance(raw.get("blocks"), list) and raw["blocks"]:
            blocks = []
            for item in raw["blocks"]:
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], int)
                        and item[1] > 0):
                    raise InputError(f"{here}invalid block {item!r}")
                blocks.append((check_oid(item[0], here), item[1]))
            if sum(r for _, r in blocks) != rows:
                raise InputError(f"{here}row blocks cover {sum(r for _, r in blocks)} rows, shape has {rows}")
        else:
            raise InputError(f"{here}no oid")
        extra = {k: v for k, v in raw.items() if k not in {"name", "dtype", "shape", "oid", "blocks"}}
        return cls(name, dtype, list(shape), blocks, extra)


@dataclass
class Metadata:
    """A whole checkpoint file as git sees it."""

    format: str
    tensors: list[TensorEntry]
    file: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # unknown top-level keys, kept verbatim

    def by_name(self) -> dict[str, TensorEntry]:
        return {t.name: t for t in self.tensors}

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def iter_oids(self) -> Iterator[str]:
        """Every object this file references (tensors, and any oid-valued extras such as stats)."""
        for tensor in self.tensors:
            yield from tensor.oids
        yield from _oids_in(self.file)
        yield from _oids_in(self.extra)

    def weights_digest(self) -> str:
        """A digest of exactly which tensor bytes this file holds: statistics computed on these
        weights record it, and are stale once it changes."""
        digest = hashlib.sha256()
        for t in sorted(self.tensors, key=lambda t: t.name):
            digest.update(f"{t.name}\0{t.dtype}\0{t.shape}\0{','.join(t.oids)}\n".encode())
        return digest.hexdigest()

    @property
    def stats(self) -> dict[str, Any]:
        """Statistic blobs attached to these weights: kind → {oid, size, weights, provenance}."""
        value = self.extra.get("stats")
        return value if isinstance(value, dict) else {}

    def iter_objects(self) -> Iterator[tuple[str, int, str]]:
        """(oid, size, what) of every object this file needs: each tensor block, then the sized extras
        (stored header, statistics). `what` names the tensor, or is "" for an extra."""
        for tensor in self.tensors:
            for (oid, _), size in zip(tensor.blocks, tensor.block_sizes()):
                yield oid, size, f"tensor {tensor.name!r}"
        for oid, size in self.iter_extra_objects():
            yield oid, size, ""

    def iter_extra_objects(self) -> Iterator[tuple[str, int]]:
        """(oid, size) of objects referenced outside the tensor list: a `…oid` key with a sibling
        `…size` key (e.g. a stored safetensors header; later, statistic blobs)."""
        yield from _sized_oids_in(self.file)
        yield from _sized_oids_in(self.extra)

    def to_bytes(self) -> bytes:
        def dump(value: Any) -> str:
            return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))

        lines = [f'{{"gittheta": {SCHEMA_VERSION}, "format": {dump(self.format)},']
        lines.append(f'"file": {dump(self.file)},')
        for key in sorted(self.extra):
            lines.append(f"{dump(key)}: {dump(self.extra[key])},")
        lines.append('"tensors": [')
        body = [dump(t.to_json()) for t in self.tensors]
        lines.append(",\n".join(body))
        lines.append("]}")
        return ("\n".join(lines) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "metadata") -> Metadata:
        raw = loads_untrusted(data, where, "gittheta metadata file")
        if not isinstance(raw, dict) or "gittheta" not in raw:
            raise InputError(f"{where}: not a gittheta metadata file")
        version = raw["gittheta"]
        if not isinstance(version, int) or version < 1:
            raise InputError(f"{where}: invalid schema version {version!r}")
        if version > SCHEMA_VERSION:
            raise InputError(
                f"{where}: written with schema {version}, this gittheta-merge reads up to "
                f"{SCHEMA_VERSION}; upgrade: pip install -U gittheta-merge"
            )
        fmt = raw.get("format")
        if not isinstance(fmt, str):
            raise InputError(f"{where}: missing format")
        tensors_raw = raw.get("tensors")
        if not isinstance(tensors_raw, list):
            raise InputError(f"{where}: missing tensor list")
        tensors = [TensorEntry.from_json(t, where) for t in tensors_raw]
        seen: set[str] = set()
        for t in tensors:
            if t.name in seen:
                raise InputError(f"{where}: tensor {t.name!r} listed twice")
            seen.add(t.name)
        file_info = raw.get("file", {})
        if not isinstance(file_info, dict):
            raise InputError(f"{where}: 'file' must be an object")
        extra = {k: v for k, v in raw.items() if k not in {"gittheta", "format", "file", "tensors"}}
        return cls(fmt, tensors, file_info, extra)


def _oids_in(value: Any) -> Iterator[str]:
    """oids nested anywhere under keys named 'oid' (generic, so statistics blobs travel too)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key.endswith("oid") and isinstance(item, str):
                yield check_oid(item)
            else:
                yield from _oids_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from _oids_in(item)


def _sized_oids_in(value: Any) -> Iterator[tuple[str, int]]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key.endswith("oid") and isinstance(item, str):
                size = value.get(key[:-3] + "size")
                if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
                    yield check_oid(item), size
            else:
                yield from _sized_oids_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from _sized_oids_in(item)


def configured_block_bytes(repo: Any) -> int:
    """theta.blockBytes of this repository: the largest stored object."""
    return int(repo.config_int("theta.blockBytes", BLOCK_BYTES))


def plan_row_blocks(dtype: str, shape: list[int], max_block_bytes: int) -> list[int]:
    """Split a tensor's leading dimension into blocks of at most max_block_bytes (≥ one row each)."""
    rows = shape[0] if shape else 1
    total = dtypes.nbytes(dtype, shape)
    if rows <= 1 or total <= max_block_bytes:
        return [rows]
    row_bytes = total // rows
    per_block = max(1, max_block_bytes // max(row_bytes, 1))
    return [min(per_block, rows - start) for start in range(0, rows, per_block)]
