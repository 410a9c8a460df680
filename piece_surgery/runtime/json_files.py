"""JSON and other files read safely: one line for text that is not UTF-8, not JSON or nested too
deep to be a record; a file's sha256 read in chunks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from piece_surgery.runtime.errors import PieceError

# Deeper JSON than this is not a record any of our formats (or transformers', PEFT's) writes.
MAX_JSON_DEPTH = 64


def read_json(path: Path, what: str) -> Any:
    """A JSON file a user gave (a record, a config, an index), parsed; `what` names it in errors.
    PieceError, one line, for text that is not UTF-8, not JSON, or nested past MAX_JSON_DEPTH."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a byte-order mark is not JSON's to refuse
    except UnicodeDecodeError as exc:
        raise PieceError(f"{what} is not UTF-8 text") from exc
    return parse_json(text, what)


def parse_json(text: str, what: str) -> Any:
    """json.loads for text from a user's file; see read_json."""
    try:
        value = json.loads(text)
    except RecursionError as exc:
        raise PieceError(f"{what} is nested too deeply to be a record") from exc
    except ValueError as exc:
        where = ""
        if hasattr(exc, "lineno"):
            # a one-line text (a .jsonl line, named by its own line number) says its column only
            line = f"line {exc.lineno}, " if "\n" in text.strip() else ""
            where = f" ({line}column {exc.colno})"
        raise PieceError(f"{what} is not valid JSON{where}") from exc
    if json_depth(value) > MAX_JSON_DEPTH:
        raise PieceError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep: not a record")
    return value


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
