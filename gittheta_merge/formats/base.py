"""The interface every checkpoint format implements.

`clean` turns a byte stream (from git) into Metadata, storing tensor bytes as objects; `smudge` writes
the original file back from Metadata plus objects. Both work tensor by tensor so memory stays bounded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from gittheta_merge.constants import BLOCK_BYTES
from gittheta_merge.storage.metadata import Metadata
from gittheta_merge.storage.store import ObjectStore

ProgressFn = Callable[[int, int], None]  # (tensors done, bytes done)


@dataclass
class Context:
    """What a format needs besides the stream: where objects go, limits, the file's name for errors."""

    path: str
    store: ObjectStore
    max_block_bytes: int = BLOCK_BYTES
    scratch_dir: str | None = None  # where formats that cannot stream may spool to disk
    progress: ProgressFn | None = None


class CheckpointFormat(ABC):
    """A checkpoint file format."""

    name: str = ""
    extensions: tuple[str, ...] = ()

    @abstractmethod
    def sniff(self, path: str, head: bytes) -> int:
        """How sure (0 = not this format, 1 = extension only, 2 = magic bytes) given ≥16 first bytes."""

    @abstractmethod
    def clean(self, stream: BinaryIO, ctx: Context) -> Metadata:
        """Read the checkpoint from stream, store its tensors, return the metadata."""

    @abstractmethod
    def smudge(self, meta: Metadata, out: BinaryIO, ctx: Context) -> None:
        """Write the checkpoint file described by meta to out."""
