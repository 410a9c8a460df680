"""Data files as records: `.txt` (a line each) and `.jsonl` (an object each: `text`,
`prompt`+`response`, or `messages`), each record checked; the image files a data file's records
name (inputs of the command, as its reader opens them)."""

from __future__ import annotations

from pathlib import Path

from piece_surgery.data.chats import image_paths
from piece_surgery.runtime.errors import PieceError, quote
from piece_surgery.runtime.json_files import parse_json
from piece_surgery.runtime.paths import NOTHING, what_is


def referenced_images(data: Path) -> list[Path]:
    """The image files a data file's records name (paths joined to the data file's folder), for
    the overlap check of outputs; a record that cannot be read is left to the data reader."""
    from piece_surgery.runtime.json_files import parse_json

    found = []
    try:
        lines = data.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return found
    for line in lines:
        if '"image"' not in line:
            continue
        try:
            record = parse_json(line, str(data))
            found += [data.parent / p for p in image_paths(record["messages"]) if isinstance(p, str) and p]
        except (PieceError, KeyError, TypeError, AttributeError):
            continue
    return found


def read_records(path: Path, max_samples: int | None = None) -> list[tuple[int, str | dict]]:
    """Parse the file into (line number, record): strings for .txt, checked objects for .jsonl."""
    path = Path(path)
    found = what_is(path)
    if found == NOTHING:
        raise PieceError(f"data file '{path}' not found")
    if found != "a file":
        raise PieceError(f"data file '{quote(path)}' is {found}; give a .txt or .jsonl file")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json"):
        raise PieceError(f"data file '{path}' must be .txt or .jsonl")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PieceError(f"data file '{path}' is not UTF-8 text") from exc
    records: list[tuple[int, str | dict]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if max_samples is not None and len(records) >= max_samples:
            break
        if not line.strip():
            continue
        if suffix == ".txt":
            records.append((lineno, line))
            continue
        record = parse_json(line, f"{path}:{lineno}:")
        problem = _record_problem(record)
        if problem:
            raise PieceError(f"{path}:{lineno}: {problem}")
        records.append((lineno, record))
    if not records:
        raise PieceError(f"data file '{path}' has no examples")
    return records


def _record_problem(record) -> str | None:
    """What is wrong with a .jsonl record, or None."""
    if not isinstance(record, dict):
        return "expected an object with 'text', 'prompt'+'response' or 'messages'"
    if "text" in record:
        return None if isinstance(record["text"], str) else "'text' must be a string"
    if "messages" in record:
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
    if {"prompt", "response"} <= record.keys():
        if isinstance(record["prompt"], str) and isinstance(record["response"], str):
            return None
        return "'prompt' and 'response' must be strings"
    return "expected an object with 'text', 'prompt'+'response' or 'messages'"


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
