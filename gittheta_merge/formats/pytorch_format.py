"""PyTorch checkpoints (.pt/.bin/.pth, zip or legacy): value-exact, never unpickling code.

`torch.load(weights_only=True)` refuses any pickle that would run code, so a malicious checkpoint is an
error, not an exploit. The nested structure (dicts, lists, tuples, step counters, configs) is kept as
JSON in the metadata with each tensor replaced by a reference; tensors become objects like any other.
A pickle cannot be parsed as a stream, so git's input is spooled to a temp file on disk and loaded with
mmap (memory stays ≈ one tensor for zip checkpoints). Rebuilt files are value-exact, not byte-exact:
torch.save output depends on the torch version (docs/formats.md).
"""

from __future__ import annotations

import base64
import math
import os
import pickle
import shutil
import tempfile
from collections import OrderedDict
from typing import Any, BinaryIO

from gittheta_merge import dtypes
from gittheta_merge.errors import InputError
from gittheta_merge.formats.base import CheckpointFormat, Context
from gittheta_merge.storage.metadata import Metadata, TensorEntry, plan_blocks
from gittheta_merge.storage.tensors import load_tensor

ZIP_MAGIC = b"PK\x03\x04"


def _spool(stream: BinaryIO, ctx: Context) -> str:
    fd, path = tempfile.mkstemp(dir=ctx.scratch_dir, prefix="theta-spool-", suffix=".pt")
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(stream, out, 8 << 20)  # type: ignore[misc]
    return path


def _load(path: str, where: str) -> Any:
    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(
            f"{where}: refused: the checkpoint contains pickled objects that are not plain tensors and "
            f"containers ({first[:200]}). Loading it could run arbitrary code. Re-save it as a "
            "state dict of tensors or as safetensors"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise InputError(f"{where}: not a readable PyTorch checkpoint (truncated or corrupt): {exc}") from None


class _Encoder:
    """Turns a loaded checkpoint into JSON, storing tensors as objects as it meets them."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.entries: list[TensorEntry] = []
        self.names: set[str] = set()
        self.done_bytes = 0

    def tensor_name(self, path: list[str]) -> str:
        base = "/".join(path) or "tensor"
        name, n = base, 1
        while name in self.names:
            n += 1
            name = f"{base}#{n}"
        self.names.add(name)
        return name

    def store_tensor(self, tensor: Any, path: list[str]) -> dict[str, Any]:
        import torch

        where = f"{self.ctx.path}: tensor {'/'.join(path)!r}"
        if tensor.layout != torch.strided or tensor.is_quantized:
            raise InputError(f"{where}: sparse/quantized tensors are not supported; convert it to dense")
        dtype = dtypes.from_torch(tensor.dtype)
        shape = list(tensor.shape)
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        data = memoryview(flat).cast("B")
        plan = plan_blocks(dtype, shape, self.ctx.max_block_bytes)
        oids, offset = [], 0
        for size in plan.sizes:
            oids.append(self.ctx.store.put(data[offset : offset + size])[0])
            offset += size
        name = self.tensor_name(path)
        extra: dict[str, Any] = {}
        if isinstance(tensor, torch.nn.Parameter):
            extra["parameter"] = True
            if not tensor.requires_grad:
                extra["requires_grad"] = False
        self.entries.append(TensorEntry.from_plan(name, dtype, shape, plan, oids, extra))
        self.done_bytes += len(data)
        if self.ctx.progress:
            self.ctx.progress(len(self.entries), self.done_bytes)
        return {"tensor": name}

    def encode(self, obj: Any, path: list[str]) -> Any:
        import torch

        if isinstance(obj, torch.Tensor):
            return self.store_tensor(obj, path)
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {"float": repr(obj)}
        if isinstance(obj, complex):
            return {"complex": [self.encode(obj.real, path), self.encode(obj.imag, path)]}
        if isinstance(obj, bytes):
            return {"bytes": base64.b64encode(obj).decode()}
        if isinstance(obj, torch.Size):
            return {"size": list(obj)}
        if isinstance(obj, torch.dtype):
            return {"torch_dtype": str(obj).removeprefix("torch.")}
        if isinstance(obj, torch.device):
            return {"device": str(obj)}
        if isinstance(obj, dict):
            tag = "odict" if isinstance(obj, OrderedDict) else "dict"
            return {tag: [[self.encode(k, path), self.encode(v, [*path, str(k)])] for k, v in obj.items()]}
        if isinstance(obj, list):
            return {"list": [self.encode(v, [*path, str(i)]) for i, v in enumerate(obj)]}
        if isinstance(obj, tuple):
            return {"tuple": [self.encode(v, [*path, str(i)]) for i, v in enumerate(obj)]}
        if isinstance(obj, (set, frozenset)):
            return {"set": [self.encode(v, path) for v in obj]}
        raise InputError(
            f"{self.ctx.path}: value at {'/'.join(path) or '<root>'!r} has type {type(obj).__name__}, "
            "which cannot be stored; keep checkpoints to tensors, containers and plain values"
        )


class _Decoder:
    def __init__(self, meta: Metadata, ctx: Context) -> None:
        self.tensors = meta.by_name()
        self.ctx = ctx

    def load_tensor(self, ref: dict[str, Any]) -> Any:
        import torch

        name = ref.get("tensor")
        entry = self.tensors.get(name) if isinstance(name, str) else None
        if entry is None:
            raise InputError(f"{self.ctx.path}: structure refers to unknown tensor {name!r}")
        tensor = load_tensor(self.ctx.store, entry, f"{self.ctx.path}: tensor {entry.name!r}: ")
        if entry.extra.get("parameter"):
            tensor = torch.nn.Parameter(tensor, requires_grad=entry.extra.get("requires_grad", True))
        return tensor

    def decode(self, value: Any) -> Any:
        import torch

        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if not isinstance(value, dict) or len(value) != 1:
            raise InputError(f"{self.ctx.path}: malformed structure in metadata: {str(value)[:80]}")
        (tag, body), = value.items()
        if tag == "tensor":
            return self.load_tensor(value)
        if tag == "float":
            return float(body)
        if tag == "complex":
            return complex(self.decode(body[0]), self.decode(body[1]))
        if tag == "bytes":
            return base64.b64decode(body)
        if tag == "size":
            return torch.Size(body)
        if tag == "torch_dtype":
            dtype = getattr(torch, str(body), None)
            if not isinstance(dtype, torch.dtype):
                raise InputError(f"{self.ctx.path}: unknown torch dtype {body!r}")
            return dtype
        if tag == "device":
            return torch.device(body)
        if tag in ("dict", "odict"):
            items = [(self.decode(k), self.decode(v)) for k, v in body]
            return OrderedDict(items) if tag == "odict" else dict(items)
        if tag == "list":
            return [self.decode(v) for v in body]
        if tag == "tuple":
            return tuple(self.decode(v) for v in body)
        if tag == "set":
            return {self.decode(v) for v in body}
        raise InputError(f"{self.ctx.path}: unknown structure tag {tag!r} (newer gittheta-merge?)")


class PytorchFormat(CheckpointFormat):
    name = "pytorch"
    extensions = (".pt", ".pth", ".bin", ".ckpt")

    def sniff(self, path: str, head: bytes) -> int:
        if head.startswith(ZIP_MAGIC) and path.endswith(self.extensions):
            return 2
        if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
            return 2  # a legacy (non-zip) torch.save pickle
        return 0

    def clean(self, stream: BinaryIO, ctx: Context) -> Metadata:
        path = _spool(stream, ctx)
        try:
            with open(path, "rb") as handle:
                container = "zip" if handle.read(4) == ZIP_MAGIC else "legacy"
            obj = _load(path, ctx.path)
            encoder = _Encoder(ctx)
            structure = encoder.encode(obj, [])
            del obj
        finally:
            os.unlink(path)
        return Metadata(self.name, encoder.entries, {"container": container, "structure": structure})

    def smudge(self, meta: Metadata, out: BinaryIO, ctx: Context) -> None:
        import torch

        obj = _Decoder(meta, ctx).decode(meta.file.get("structure"))
        fd, path = tempfile.mkstemp(dir=ctx.scratch_dir, prefix="theta-save-", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(obj, handle,
                           _use_new_zipfile_serialization=meta.file.get("container") != "legacy")
            del obj
            with open(path, "rb") as handle:
                shutil.copyfileobj(handle, out, 8 << 20)  # type: ignore[misc]
        finally:
            os.unlink(path)
