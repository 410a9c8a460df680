"""Data sources as records: `.txt` (a line each), `.jsonl` (an object a line), `.json` (an array of
objects), Parquet and Arrow files and `datasets` folders (tables.py), each object mapped onto a
record by its shape (shapes.py) and checked; the data's digest; the image files a data file's
records name (inputs of the command, as its reader opens them)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from piece_surgery.data.chats import image_paths
from piece_surgery.data.shapes import EXPECTED, SHAPE_FIELDS, ShapeError, as_record, without_nulls
from piece_surgery.data.tables import (
    TABLE_SUFFIXES,
    Table,
    read_saved_dataset,
    read_table_file,
    saved_dataset_files,
)
from piece_surgery.runtime.errors import PieceError, quote
from piece_surgery.runtime.json_files import file_sha256, parse_json
from piece_surgery.runtime.paths import NOTHING, what_is

SUFFIXES_SHOWN = ".txt, .jsonl, .json, .parquet, .arrow"


def referenced_images(data: Path) -> list[Path]:
    """The image files a data file's records name (paths joined to the data file's folder), for
    the overlap check of outputs; data that cannot be read is left to the data reader."""
    data = Path(data).expanduser()
    suffix = data.suffix.lower()
    if suffix not in (".jsonl", ".json", *TABLE_SUFFIXES):
        return []
    if suffix in (".jsonl", ".json"):
        try:
            if '"image"' not in data.read_text(encoding="utf-8"):
                return []
        except (OSError, UnicodeDecodeError):
            return []
    try:
        read = read_data(data)
    except PieceError:
        return []
    return [
        read.folder / p
        for _, record in read.records
        if isinstance(record, dict) and "messages" in record
        for p in image_paths(record["messages"])
    ]


@dataclass(frozen=True)
class DataFile:
    """A data source read: its records, where each came from, its digest and its images' folder."""

    records: list[tuple[str, str | dict]]  # (where: "file:line", "file: record N", ...; the record)
    sha256: str  # the data's digest, before its images' bytes (dataset.py adds them)
    folder: Path  # the folder image paths are relative to


def read_data(path: Path, max_samples: int | None = None) -> DataFile:
    """Read a data source into records (strings for .txt; shapes.as_record's objects otherwise),
    each checked: .txt, .jsonl, .json (an array of objects, or one object a line), .parquet,
    .arrow/.feather, or a folder saved with `datasets`' save_to_disk. The digest is the file's
    sha256 (for a folder: tables.folder_digest). PieceError, one line, for a missing source, a
    suffix it does not read, a record of no known shape (naming its fields), or no records. `~`
    is the user's home folder, as in every path a command takes."""
    path = Path(path).expanduser()
    rows = read_rows(path, max_samples)
    if path.suffix.lower() == ".txt" and path.is_file():  # a line is a text record as it is
        return rows
    return DataFile([(where, _checked(row, where)) for where, row in rows.records], rows.sha256, rows.folder)


def read_rows(path: Path, max_samples: int | None = None) -> DataFile:
    """A data source's rows as they are (strings for .txt, objects otherwise; not yet mapped onto
    records): read_data's reading, for readers of other shapes (prompts.py)."""
    path = Path(path).expanduser()
    found = what_is(path)
    if found == NOTHING:
        raise PieceError(f"data file '{path}' not found")
    if path.is_dir():
        files = saved_dataset_files(path)
        if files is None:
            raise PieceError(
                f"data folder '{path}' is not a dataset saved with datasets' save_to_disk (no "
                f"state.json); give a data file ({SUFFIXES_SHOWN}) or such a folder"
            )
        table = read_saved_dataset(path, max_samples)
        return DataFile(_table_rows(table, str(path)), folder_digest(path, files), path)
    if found != "a file":
        raise PieceError(f"data file '{quote(path)}' is {found}; give a data file ({SUFFIXES_SHOWN})")
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        rows = _table_rows(read_table_file(path, max_samples), str(path))
    elif suffix in (".txt", ".jsonl", ".json"):
        rows = _text_rows(path, suffix, max_samples)
    else:
        raise PieceError(f"data file '{path}' must be one of {SUFFIXES_SHOWN}, or a `datasets` folder")
    if not rows:
        raise PieceError(f"data file '{path}' has no examples")
    return DataFile(rows, file_sha256(path), path.parent)


def folder_digest(folder: Path, files: list[Path]) -> str:
    """A saved dataset's digest: the sha256 of, for each of its Arrow files in the order it reads
    them, the file's name (as state.json gives it), a zero byte, the file's sha256 (hex) and a
    newline (docs/formats.md)."""
    digest = hashlib.sha256()
    for file in files:
        name = file.relative_to(folder).as_posix()
        digest.update(name.encode() + b"\0" + file_sha256(file).encode() + b"\n")
    return digest.hexdigest()


def read_records(path: Path, max_samples: int | None = None) -> list[tuple[str, str | dict]]:
    """(where, record) for each record of a data source (read_data)."""
    return read_data(path, max_samples).records


def _text_rows(path: Path, suffix: str, max_samples: int | None) -> list[tuple[str, object]]:
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is no character of the first record
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PieceError(f"data file '{path}' is not UTF-8 text") from exc
    if suffix == ".json" and text.lstrip().startswith("["):
        rows = parse_json(text, f"data file '{path}'")
        return [(f"{path}: record {i}", row) for i, row in enumerate(rows, 1)][:max_samples]
    records: list[tuple[str, object]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if max_samples is not None and len(records) >= max_samples:
            break
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if suffix == ".txt":
            records.append((where, line))
            continue
        records.append((where, parse_json(line, f"{where}:")))
    return records


def _table_rows(table: Table, name: str) -> list[tuple[str, dict]]:
    if not any(c in SHAPE_FIELDS for c in table.columns):
        columns = ", ".join(f"'{c}'" for c in table.columns) or "none"
        raise PieceError(f"{name}: found the columns {columns}; {EXPECTED}")
    if not table.rows:
        raise PieceError(f"data file '{name}' has no examples")
    return [(f"{name}: row {i}", row) for i, row in enumerate(table.rows, 1)]


def _checked(row, where: str) -> dict:
    """The record a row maps to (shapes.as_record), checked; PieceError naming `where` if not."""
    try:
        record = as_record(row)
    except ShapeError as exc:
        raise PieceError(f"{where}: {exc}") from None
    problem = messages_problem(record)
    if problem:
        raise PieceError(f"{where}: {problem}")
    return record


def messages_problem(record: dict) -> str | None:
    """What is wrong with a mapped record's messages, or None."""
    if "messages" not in record:
        return None
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {role, content} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            return f"message {i + 1} must be an object with a string 'role' and a 'content'"
        problem = _content_problem(m["content"])
        if problem:
            return f"message {i + 1}: {problem}"
    return None


def _content_problem(content) -> str | None:
    """A message's content: a string, or a list of parts in transformers' chat form
    ({"type": "text", "text": ...}); what is wrong with it, or None."""
    if isinstance(content, str):
        return None
    if not isinstance(content, list) or not content:
        return "'content' must be a string or a non-empty list of {type, text} parts"
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            if not isinstance(part.get("path"), str) or not part["path"]:
                return 'an image part names its file with "path" (relative to the data file)'
            if "\0" in part["path"]:
                return "an image path may not contain a NUL character"
            continue
        if kind in ("image_url", "video", "audio"):
            return f'has a part of type \'{kind}\': give images as {{"type": "image", "path": ...}} parts'
        if kind != "text" or not isinstance(part.get("text"), str):
            return 'each part of a \'content\' list must be {"type": "text", "text": "..."}'
    return None


def check_record(record, where: str) -> str | dict:
    """One record given in memory: a string (plain text), or an object in any of the shapes a data
    file's rows take (shapes.as_record; a None field is an absent one); PieceError naming `where`
    and what is wrong."""
    if isinstance(record, str):
        return record
    return _checked(without_nulls(record), where)
