"""Raw records from a source, each with the place it came from (file and line, or row).

Local JSON Lines and JSON are read here, line by line, so a bad record can be named by its line;
Parquet through pyarrow; anything else (a hub id, a data set folder) through `datasets`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


class DataError(ValueError):
    """A source that cannot be used at all (missing, unreadable, or without one usable record)."""


@dataclass(frozen=True)
class RawRecord:
    where: str  # "file.jsonl:12", "file.parquet row 7", "owner/name[train] row 3"
    value: Any  # the decoded record, or None when it could not be decoded
    error: str | None = None


def read_records(path: str, split: str = "train", limit: int | None = None) -> Iterator[RawRecord]:
    source = Path(path)
    if source.is_file():
        suffix = source.suffix.lower()
        if suffix == ".parquet":
            records = _parquet(source)
        elif suffix in (".json", ".jsonl", ".ndjson"):
            records = _json(source)
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r} (use .json, .jsonl or .parquet)")
    elif source.is_dir() or _looks_like_hub_id(path):
        records = _datasets(path, split)
    else:
        raise DataError(f"{path}: no such file or folder, and not a hub data set id (owner/name)")
    for n, record in enumerate(records):
        if limit is not None and n >= limit:
            break
        yield record


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) in (1, 2) and all(p and not p.startswith((".", "~")) for p in parts)


def _json(path: Path) -> Iterator[RawRecord]:
    """JSON Lines, or one JSON array; BELLE ships JSON Lines named .json, so the content decides."""
    with path.open("r", encoding="utf-8") as fh:
        head = fh.read(4096).lstrip("\ufeff \t\r\n")
    if head.startswith("["):
        yield from _json_array(path)
        return
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield RawRecord(where, json.loads(line))
            except json.JSONDecodeError as err:
                yield RawRecord(where, None, f"not valid JSON ({err.msg}, column {err.colno})")


def _json_array(path: Path) -> Iterator[RawRecord]:
    text = path.read_text(encoding="utf-8")
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    # Line of each element, found by decoding the array one element at a time.
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    for item in items:
        while text[pos] in " \t\r\n,":
            pos += 1
        lineno = text.count("\n", 0, pos) + 1
        _, pos = decoder.raw_decode(text, pos)
        yield RawRecord(f"{path}:{lineno}", item)


def _parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for row, item in enumerate(table.to_pylist(), start=1):
        yield RawRecord(f"{path} row {row}", item)


def _datasets(path: str, split: str) -> Iterator[RawRecord]:
    import datasets

    try:
        ds = datasets.load_dataset(path, split=split)
    except Exception as err:  # datasets raises many types; the user needs the source and the reason
        raise DataError(f"{path}: could not load through datasets ({type(err).__name__}: {err})") from None
    for row, item in enumerate(ds, start=1):
        yield RawRecord(f"{path}[{split}] row {row}", item)
