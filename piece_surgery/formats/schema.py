"""Check a JSON document against one of the schemas shipped in formats/schemas/ (the files
docs/formats.md describes, and that tests check against its examples).

The schemas use a small part of JSON Schema (draft 2020-12), which this module implements:
`type` (a name or a list of names), `properties`, `required`, `additionalProperties` (a schema),
`items`, `enum`, `minimum`, `pattern`, `minItems`, and `$ref` to `#/$defs/NAME`. A problem is
reported as one short phrase naming where it is (`'tensors.w.count' must be an integer >= 1`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

SCHEMAS = Path(__file__).parent / "schemas"

_TYPES = {
    "object": (dict, "an object"),
    "array": (list, "a list"),
    "string": (str, "a string"),
    "integer": (int, "an integer"),
    "number": ((int, float), "a number"),
    "boolean": (bool, "true or false"),
    "null": (type(None), "null"),
}


@cache
def load_schema(name: str) -> dict:
    """A shipped schema by file name (e.g. "delta.json")."""
    return json.loads((SCHEMAS / name).read_text())


Label = Callable[[str], str]


def problem(
    document: Any, schema: dict, root: dict | None = None, where: str = "", label: Label | None = None
) -> str | None:
    """What in `document` does not follow `schema`, or None. `where` is the document's place in a
    larger one; `label(where)` names a place in messages (default: `'where'`)."""
    root = root if root is not None else schema
    name = label or _name
    if "$ref" in schema:
        return problem(document, root["$defs"][schema["$ref"].split("/")[-1]], root, where, label)
    if "type" in schema and not _has_type(document, schema["type"]):
        return f"{name(where)} must be {_describe(schema)}"
    if "enum" in schema and document not in schema["enum"]:
        return f"{name(where)} must be one of {', '.join(map(str, schema['enum']))}"
    if "minimum" in schema and _is_number(document) and document < schema["minimum"]:
        return f"{name(where)} must be {_describe(schema)}"
    if "pattern" in schema and isinstance(document, str) and not re.search(schema["pattern"], document):
        return f"{name(where)} must be {schema.get('description', 'of the form ' + schema['pattern'])}"
    if isinstance(document, dict):
        return _object_problem(document, schema, root, where, label)
    if isinstance(document, list):
        if len(document) < schema.get("minItems", 0):
            return f"{name(where)} must have at least {schema['minItems']} entries"
        for i, item in enumerate(document):
            if "items" in schema and (found := problem(item, schema["items"], root, f"{where}[{i}]", label)):
                return found
    return None


def _object_problem(document: dict, schema: dict, root: dict, where: str, label: Label | None) -> str | None:
    for key in schema.get("required", []):
        if key not in document:
            return f"has no {(label or _name)(_join(where, key))}"
    properties = schema.get("properties", {})
    for key, value in document.items():
        sub = properties.get(key, schema.get("additionalProperties"))
        if isinstance(sub, dict) and (found := problem(value, sub, root, _join(where, key), label)):
            return found
    return None


def _has_type(value: Any, names: str | list[str]) -> bool:
    for name in [names] if isinstance(names, str) else names:
        kind = _TYPES[name][0]
        if isinstance(value, bool) and name not in ("boolean",):
            continue  # JSON true is not a number
        if isinstance(value, kind):
            return True
    return False


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _describe(schema: dict) -> str:
    if "description" in schema:
        return schema["description"]
    names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    text = " or ".join(_TYPES[n][1] for n in names)
    return f"{text} >= {schema['minimum']}" if "minimum" in schema else text


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _name(where: str) -> str:
    return f"'{where}'" if where else "the document"
