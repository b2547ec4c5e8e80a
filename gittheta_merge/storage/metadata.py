"""The metadata file git stores in place of a checkpoint.

It is JSON laid out one tensor per line, in the checkpoint's own tensor order, so `git diff` of two
versions lists exactly the tensors that changed and a plain 3-way text merge of disjoint changes is
already correct. Per tensor: name, dtype, shape and the object id(s) of its bytes; a tensor larger than
the block limit is split into row blocks, each its own object; a tensor whose single row is larger than
the block limit (a [1, 2**34] tensor) is split into byte ranges ("parts") instead, so no object, and no
buffer while adding or checking out, is ever larger than the block limit. Format-specific facts needed to rebuild
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

SCHEMA_VERSION = 2  # the newest schema this version reads; 2 added "parts" (byte-range blocks)
ROW_BLOCKS_SCHEMA = 1  # files without byte-range blocks are still written as schema 1, byte for byte as before
MAGIC = b'{"gittheta":'
MAX_ELEMENTS = 1 << 50  # far above any real tensor; rejects absurd shapes before arithmetic


def is_metadata(head: bytes) -> bool:
    """True if content starts like a metadata file (used to pass already-clean content through)."""
    return head.lstrip()[: len(MAGIC)] == MAGIC


@dataclass(frozen=True)
class BlockPlan:
    """How a tensor's bytes are cut into stored objects: `counts` in the entry's unit (rows, or bytes when
    split == "bytes"), `sizes` in bytes."""

    split: str  # "rows" | "bytes"
    counts: list[int]
    sizes: list[int]


@dataclass
class TensorEntry:
    """One tensor: its dtype, shape and the objects holding its bytes (blocks, in order). A block counts
    leading-dimension rows, or bytes when split == "bytes" (rows larger than the block limit)."""

    name: str
    dtype: str
    shape: list[int]
    blocks: list[tuple[str, int]]  # (oid, rows), or (oid, bytes) when split == "bytes"
    extra: dict[str, Any] = field(default_factory=dict)
    split: str = "rows"

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
        if self.split == "bytes":
            return [n for _, n in self.blocks]
        return [rows * self.row_bytes for _, rows in self.blocks] if self.rows else [0]

    def row_boundaries(self) -> list[int]:
        """Rows at which stored blocks start and end (byte-range parts: only 0 and the last row)."""
        if self.split == "bytes":
            return [0, self.rows]
        out = [0]
        for _, rows in self.blocks:
            out.append(out[-1] + rows)
        return out

    @classmethod
    def from_plan(cls, name: str, dtype: str, shape: list[int], plan: BlockPlan, oids: list[str],
                  extra: dict[str, Any] | None = None) -> TensorEntry:
        return cls(name, dtype, list(shape), list(zip(oids, plan.counts)), dict(extra or {}), plan.split)

    @property
    def oids(self) -> list[str]:
        return [oid for oid, _ in self.blocks]

    def same_content(self, other: TensorEntry) -> bool:
        return (self.dtype, self.shape, self.oids) == (other.dtype, other.shape, other.oids)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": self.shape}
        if len(self.blocks) == 1:
            out["oid"] = self.blocks[0][0]
        elif self.split == "bytes":
            out["parts"] = [[oid, nbytes] for oid, nbytes in self.blocks]
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
        split = "rows"
        if "oid" in raw:
            blocks = [(check_oid(raw["oid"], here), rows)]
        elif raw.get("blocks") or raw.get("parts"):
            split = "bytes" if "parts" in raw else "rows"
            blocks = _blocks_from_json(raw.get("parts" if split == "bytes" else "blocks"), here)
            covered, want = sum(n for _, n in blocks), (dtypes.nbytes(dtype, shape) if split == "bytes" else rows)
            if covered != want:
                raise InputError(f"{here}{'parts cover' if split == 'bytes' else 'row blocks cover'} {covered} "
                                 f"{split}, shape has {want}")
        else:
            raise InputError(f"{here}no oid")
        extra = {k: v for k, v in raw.items() if k not in {"name", "dtype", "shape", "oid", "blocks", "parts"}}
        return cls(name, dtype, list(shape), blocks, extra, split)


def _blocks_from_json(items: Any, here: str) -> list[tuple[str, int]]:
    """[[oid, count], …] with positive integer counts (rows or bytes)."""
    if not isinstance(items, list) or not items:
        raise InputError(f"{here}invalid block list {items!r}")
    blocks = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], int)
                and not isinstance(item[1], bool) and item[1] > 0):
            raise InputError(f"{here}invalid block {item!r}")
        blocks.append((check_oid(item[0], here), item[1]))
    return blocks


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

        version = SCHEMA_VERSION if any(t.split == "bytes" and len(t.blocks) > 1 for t in self.tensors) \
            else ROW_BLOCKS_SCHEMA
        lines = [f'{{"gittheta": {version}, "format": {dump(self.format)},']
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


def plan_blocks(dtype: str, shape: list[int], max_block_bytes: int) -> BlockPlan:
    """Cut a tensor into objects of at most max_block_bytes: whole leading-dimension rows when a row fits (so
    a merge can stream row ranges and git diff lines up), else byte ranges of whole elements."""
    rows = shape[0] if shape else 1
    total = dtypes.nbytes(dtype, shape)
    if total <= max_block_bytes:
        return BlockPlan("rows", [rows], [total])
    row_bytes = total // rows
    if row_bytes <= max_block_bytes and rows > 1:
        per_block = max_block_bytes // row_bytes
        counts = [min(per_block, rows - start) for start in range(0, rows, per_block)]
        return BlockPlan("rows", counts, [n * row_bytes for n in counts])
    item = dtypes.itemsize(dtype)
    step = max(item, max_block_bytes // item * item)
    sizes = [min(step, total - start) for start in range(0, total, step)]
    if len(sizes) == 1:  # one element above the limit: one block, nothing to split
        return BlockPlan("rows", [rows], [total])
    return BlockPlan("bytes", sizes, sizes)
