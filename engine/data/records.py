"""Raw records from a source, each with the place it came from (file and line, or row).

Local JSON Lines and JSON are read here, line by line, so a bad record can be named by its line;
Parquet through pyarrow; anything else (a hub id, a data set folder) through `datasets`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from engine.config import looks_local


class DataError(ValueError):
    """A source that cannot be used at all (missing, unreadable, or without one usable record)."""


@dataclass(frozen=True)
class RawRecord:
    where: str  # "file.jsonl:12", "file.parquet row 7", "owner/name[train] row 3"
    value: Any  # the decoded record, or None when it could not be decoded
    error: str | None = None


def read_records(path: str, split: str = "train", limit: int | None = None,
                 sample: bool = False) -> Iterator[RawRecord]:
    """`sample`: a check reads the first records only (a data set through `datasets` is streamed, nothing
    converted or cached); training reads for good."""
    source = Path(path)
    if source.is_file():
        suffix = source.suffix.lower()
        if suffix == ".parquet":
            records = _parquet(source)
        elif suffix in (".json", ".jsonl", ".ndjson"):
            records = _json(source)
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r} (use .json, .jsonl or .parquet)")
    elif source.is_dir() or not looks_local(path):
        records = _datasets(path, split, sample)
    else:
        raise DataError(f"{path}: no such file or folder, and not a hub data set id (owner/name)")
    for n, record in enumerate(records):
        if limit is not None and n >= limit:
            break
        yield record


def _json(path: Path) -> Iterator[RawRecord]:
    """JSON Lines, or one JSON array; BELLE ships JSON Lines named .json, so the content decides."""
    with path.open("rb") as fh:
        head_bytes = fh.read(4096)
    if encoding_guess(head_bytes[:2]) == "UTF-16":  # its lines would split inside characters
        raise DataError(f"{path}:1: not UTF-8: {not_utf8(head_bytes)}")
    head = head_bytes.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if head.startswith("["):
        yield from _json_array(path)
        return
    undecodable: list[int] = []
    utf8_seen = False  # a line of characters beyond ASCII that decoded: the file is UTF-8
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:  # one bad byte spoils its line only
                undecodable.append(lineno)
                if len(undecodable) > 1 and not utf8_seen:
                    # A file in another encoding (GBK, say) would lose every line beyond ASCII, and its ASCII
                    # ones would pass: half a data set, silently. A damaged line in a UTF-8 file stays a record.
                    raise DataError(f"{where}: not UTF-8, nor is line {undecodable[0]}, and no line before holds "
                                    f"UTF-8 beyond ASCII: {not_utf8(raw)}") from None
                column = len(raw[: err.start].decode("utf-8", errors="replace")) + 1  # characters, as editors count
                yield RawRecord(where, None, f"not UTF-8 (byte 0x{raw[err.start]:02x} at column {column})")
                continue
            utf8_seen = utf8_seen or not raw.isascii()
            if lineno == 1:
                line = line.lstrip("\ufeff")
            if not line.strip():
                continue
            try:
                # Without its line break, which a line cut short would have inside its last string (json
                # would call it a control character instead of saying the string is unterminated).
                yield RawRecord(where, json.loads(line.rstrip("\r\n")))
            except json.JSONDecodeError as err:
                joint = " " if err.msg.endswith(" at") else ", "  # "Unterminated string starting at column 51"
                yield RawRecord(where, None, f"not valid JSON ({err.msg}{joint}column {err.colno})")


def encoding_guess(raw: bytes) -> str | None:
    """The encoding bytes that are not UTF-8 are likely in, where one is a likely guess."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16"
    high = [i for i, byte in enumerate(raw) if byte >= 0x80]
    if not high or 4 * raw.decode("utf-8", errors="replace").count("\ufffd") < len(high):
        return None  # none, or UTF-8 with a few bad bytes among many good ones: damaged, not converted
    # A GBK Chinese character is two bytes above ASCII; an accented Latin letter one byte between ASCII
    # ones. GB18030 decodes both (an accent and the letter after it make a CJK character), so the pairing
    # decides: converting a German file "from GB18030" would make Chinese of it.
    paired = sum(1 for i in high if (i + 1 < len(raw) and raw[i + 1] >= 0x80) or (i > 0 and raw[i - 1] >= 0x80))
    candidates = ("gb18030", "cp1252") if paired >= 0.8 * len(high) else ("cp1252",)
    for encoding in candidates:
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        beyond = [char for char in text if ord(char) >= 0x80]
        if encoding == "gb18030" and any("\u4e00" <= char <= "\u9fff" for char in beyond):
            return "GB18030"
        # Latin letters with accents; UTF-8 read as CP1252 would show Ã and â€ pairs instead
        if encoding == "cp1252" and sum("\u00c0" <= c <= "\u00ff" and c not in "ÃÂâ" for c in beyond) * 2 > len(beyond):
            return "CP1252"
    return None


def not_utf8(raw: bytes) -> str:
    """How to say that bytes are not UTF-8, with the conversion that fixes them where one is likely."""
    guess = encoding_guess(raw)
    if guess is None:
        return "the file is in another encoding, or damaged there; convert it to UTF-8, or fix those bytes"
    return (f"it reads as {guess} (or the file is damaged there); convert it to UTF-8 first "
            f"(iconv -f {guess} -t UTF-8)")


def _json_array(path: Path) -> Iterator[RawRecord]:
    """One element at a time, each with its line: linear in the file's size (counting lines from the
    start for every element made a 50k-record file take minutes)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x}): {not_utf8(data)} (a JSON array "
                        "cannot skip one element; a single bad byte: fix or remove it)") from None
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted = 1, 0

    def skip(at: int) -> int:
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        return at

    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        yield RawRecord(f"{path}:{line}", item)
        pos = skip(pos)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return
        lineno = text.count("\n", 0, pos) + 1
        raise DataError(f"{path}:{lineno}: not valid JSON (expected ',' or ']' after an element)")


def _parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for row, item in enumerate(table.to_pylist(), start=1):
        yield RawRecord(f"{path} row {row}", item)


def _datasets(path: str, split: str, sample: bool) -> Iterator[RawRecord]:
    """A hub id or a folder: one `save_to_disk` wrote (read back as it is), or of data files."""
    import datasets

    folder = Path(path)
    try:
        if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{path}: no split {split!r} (it has {', '.join(ds)})")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(path, split=split, streaming=sample)
    except DataError:
        raise
    except Exception as err:  # datasets raises many types; the user needs the source and the reason
        raise DataError(f"{path}: could not load through datasets ({type(err).__name__}: {err})") from None
    for row, item in enumerate(ds, start=1):
        yield RawRecord(f"{path}[{split}] row {row}", item)
