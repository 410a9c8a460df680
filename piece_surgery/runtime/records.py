"""Records that travel (in masks, deltas, states and --json output), and their one JSON path.

A record is a dataclass that subclasses `JsonRecord`: `to_json()` writes it as a JSON object and
`from_json(data)` reads one back, checking every field against its type hint (nested records,
lists, tuples, optional values) and ignoring keys it does not know, so newer files stay readable.
A field may take another name in JSON (`field(metadata={"json": "pass"})`) and carries its help
text (`metadata={"help": ...}`), which the CLI shows.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

R = TypeVar("R", bound="JsonRecord")


class JsonRecord:
    """to_json / from_json for a dataclass of JSON values and other records."""

    def to_json(self) -> dict[str, Any]:
        return {
            _json_name(f): _encode(getattr(self, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if not f.metadata.get("transient")
        }

    @classmethod
    def from_json(cls: type[R], data: Any) -> R | None:
        """None for a missing record (JSON null); ValueError for one of the wrong shape."""
        if data is None:
            return None
        return cls(**cls.json_values(data))

    def check_types(self) -> None:
        """ValueError naming the first field whose value is not of its type hint (a record made in
        Python, where nothing parsed the values: `density="0.1"`); transient fields are not checked.
        (runtime/options.check_fields makes it the user's PieceError.)"""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.metadata.get("transient"):
                continue
            value = getattr(self, f.name)
            try:
                _decode(hints[f.name], _encode(value), f.name)
            except ValueError as exc:
                shown = repr(value)
                shown = shown if len(shown) <= 80 else shown[:77] + "..."
                raise ValueError(f"{exc}, got {shown}") from None

    @classmethod
    def json_values(cls, data: Any) -> dict[str, Any]:
        """The record's fields from a JSON object, each checked against its type hint."""
        if not isinstance(data, dict):
            raise ValueError(f"expected an object for {cls.__name__}, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.metadata.get("transient"):
                continue
            key = _json_name(f)
            if key in data:
                values[f.name] = _decode(hints[f.name], data[key], key)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{cls.__name__} needs '{key}'")
        return values


def help_of(record: type, name: str) -> str:
    """The help text a record's field carries (the CLI's option help)."""
    for f in dataclasses.fields(record):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)


def _json_name(f: dataclasses.Field) -> str:
    return f.metadata.get("json", f.name)


def _encode(value: Any) -> Any:
    if isinstance(value, JsonRecord):
        return value.to_json()
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _decode(hint: Any, value: Any, key: str) -> Any:
    """`value` read from JSON as the type `hint` says; ValueError naming `key` if it is not one."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _decode(option, value, key)
            except ValueError as exc:
                errors.append(exc)
        raise errors[0] if errors else ValueError(f"'{key}' may not be null")
    if hint is Any:
        return value
    if isinstance(hint, type) and issubclass(hint, JsonRecord):
        record = hint.from_json(value)
        if record is None:
            raise ValueError(f"'{key}' may not be null")
        return record
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ValueError(f"'{key}' must be a list")
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"'{key}' must hold {len(args)} values")
            return tuple(_decode(a, v, key) for a, v in zip(args, value, strict=True))
        item = args[0] if args else Any
        decoded = [_decode(item, v, key) for v in value]
        return tuple(decoded) if origin is tuple else decoded
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"'{key}' must be an object")
        args = typing.get_args(hint)
        return {k: _decode(args[1], v, key) for k, v in value.items()} if args else dict(value)
    return _scalar(hint, value, key)


def _scalar(hint: Any, value: Any, key: str) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"'{key}' must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"'{key}' must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"'{key}' must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"'{key}' must be a string")
        return value
    if hint is Path:
        if not isinstance(value, str):
            raise ValueError(f"'{key}' must be a path")
        return Path(value)
    if hint is type(None):
        if value is not None:
            raise ValueError(f"'{key}' must be null")
        return None
    return value


@dataclasses.dataclass(frozen=True)
class CheckpointIdentity(JsonRecord):
    """Who a checkpoint is: how it was named, the Hub repo and revision it came from (if any), and a
    fingerprint of its weights (see checkpoint.fingerprint)."""

    name: str
    repo_id: str | None = None
    revision: str | None = None
    fingerprint: str | None = None


@dataclasses.dataclass(frozen=True)
class DataRecord(JsonRecord):
    """Which data file a run read (its name and digest, never its local path), and what it kept."""

    file: str
    sha256: str
    examples: int
    skipped: int = 0
    max_length: int | None = None

    @classmethod
    def from_json(cls, data: Any) -> DataRecord | None:
        if isinstance(data, dict) and "file" not in data and "path" in data:  # written by 0.1.0
            data = {**data, "file": Path(str(data["path"])).name}
        return super().from_json(data)


@dataclasses.dataclass(frozen=True)
class RetainRecord(JsonRecord):
    """What a retain-aware mask kept in mind: the retain text, its labels, and the damping."""

    sources: list[DataRecord]  # files by name and sha256; text the model wrote itself as "self"
    labels: str  # "empirical" (the text's own next tokens) or "sampled" (drawn from the model)
    damping: float  # the quantile of F_retain added to it
    # its value (JSON key `delta`, the name in the paper's formula and in files already written)
    damping_value: float = dataclasses.field(metadata={"json": "delta"})
    fisher_scale: float  # per-token Fisher = F_retain x this (1 / sum over micro-batches of 1/tokens)
    self_sampling: dict[str, int] | None = None  # seed, samples and length of the "self" text
    chat_sampling: dict[str, int] | None = None  # seed, instructions and answer length of "chat"


@dataclasses.dataclass(frozen=True)
class AvoidRecord(JsonRecord):
    """A mask or delta whose entries a mask was told to avoid (an earlier task's)."""

    name: str  # its repo id, or its file or folder name
    kind: str  # "mask" or "delta"
    entries: int
