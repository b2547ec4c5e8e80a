"""Streaming of labelled examples from jsonl / csv files, and the data digest used for provenance.

Statistics are computed on data sets that can be much larger than memory, so examples are read one at a time
(`iter_examples` is a generator over an open file). The digest is a streaming sha256 of the file's bytes: it is
what ties a statistic blob to the exact data it was computed on, independent of the file's name or location.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gittheta_merge.errors import StatsError

__all__ = ["DataSpec", "Example", "file_digest", "iter_examples"]


@dataclass(frozen=True)
class Example:
    """One input. `text` is a string, or a list of words for token classification; `label` may be None (unlabelled
    data is fine for gram and for the `sampled`/`exact` label policies); for token classification it is a list with
    one label per word."""

    text: str | list[str]
    text_pair: str | None = None
    label: Any = None


@dataclass(frozen=True)
class DataSpec:
    """Where the examples are and which fields hold them. `format` is inferred from the suffix when None
    (.jsonl/.ndjson/.json → jsonl; .csv → csv; .tsv/.txt → tab-separated csv)."""

    path: str | os.PathLike[str]
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str | None = "label"
    format: str | None = None
    delimiter: str | None = None
    encoding: str = "utf-8"

    def resolved_format(self) -> tuple[str, str]:
        """(kind, delimiter): kind is "jsonl" or "csv"."""
        fmt = self.format
        suffix = Path(self.path).suffix.lower()
        if fmt is None:
            if suffix in (".jsonl", ".ndjson", ".json"):
                fmt = "jsonl"
            elif suffix in (".csv", ".tsv", ".txt"):
                fmt = "csv"
            else:
                raise StatsError(f"cannot infer the data format of {self.path!s}; pass format='jsonl' or 'csv'")
        if fmt not in ("jsonl", "csv"):
            raise StatsError(f"unknown data format {fmt!r} (jsonl or csv)")
        delimiter = self.delimiter or ("\t" if suffix in (".tsv", ".txt") else ",")
        return fmt, delimiter


def file_digest(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """'sha256:<hex>' of the file's bytes, read in chunks so that a data file of any size can be hashed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _field(row: dict[str, Any], name: str, where: str) -> Any:
    if name not in row:
        raise KeyError(f"{where}: no field {name!r} (fields: {', '.join(map(str, row))})")
    return row[name]


def _rows(spec: DataSpec) -> Iterator[tuple[str, dict[str, Any]]]:
    fmt, delimiter = spec.resolved_format()
    with open(spec.path, encoding=spec.encoding, newline="" if fmt == "csv" else None) as f:
        if fmt == "jsonl":
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise StatsError(f"{spec.path}:{lineno}: not valid JSON ({e.msg})") from None
                except RecursionError:
                    raise StatsError(f"{spec.path}:{lineno}: JSON nested too deeply") from None
                if not isinstance(row, dict):
                    raise StatsError(f"{spec.path}:{lineno}: expected a JSON object per line")
                yield f"{spec.path}:{lineno}", row
        else:
            reader = csv.DictReader(f, delimiter=delimiter)
            for row in reader:
                yield f"{spec.path}:{reader.line_num}", row


def iter_examples(spec: DataSpec, limit: int | None = None) -> Iterator[Example]:
    """Yield at most `limit` examples, one at a time (the file is never read whole).

    A missing label field is an error only when `label_field` is set; rows whose label cell is empty get
    label None. Word lists (token classification) are accepted from jsonl as JSON arrays."""
    count = 0
    for where, row in _rows(spec):
        if limit is not None and count >= limit:
            return
        text = _field(row, spec.text_field, where)
        if not isinstance(text, (str, list)):
            text = str(text)
        pair = None
        if spec.text_pair_field is not None:
            pair = _field(row, spec.text_pair_field, where)
            pair = None if pair is None else str(pair)
        label = None
        if spec.label_field is not None:
            label = _field(row, spec.label_field, where)
            if label == "":
                label = None
        yield Example(text=text, text_pair=pair, label=label)
        count += 1
