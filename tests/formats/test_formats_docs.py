"""The shipped schema of delta.json and docs/formats.md agree: every example there follows it, and
the schema checker finds what is wrong with a broken copy."""

import copy
import json
import re
from pathlib import Path

import pytest

from piece_surgery.formats.delta_folder import FORMATS
from piece_surgery.formats.schema import load_schema, problem

FORMATS_DOC = Path(__file__).parents[2] / "docs" / "formats.md"


def _examples() -> list[dict]:
    blocks = re.findall(r"```json\n(.*?)```", FORMATS_DOC.read_text(), flags=re.S)
    return [json.loads(block) for block in blocks]


def _tensor_problems(document: dict, version: int, schema: dict) -> list[str]:
    entry = schema["$defs"][FORMATS[version].TENSOR_SCHEMA]
    return [p for meta in document["tensors"].values() if (p := problem(meta, entry, schema))]


def test_every_delta_json_example_in_the_docs_follows_the_schema():
    schema = load_schema("delta.json")
    examples = _examples()
    full = [e for e in examples if "format" in e]
    compact_entries = [e for e in examples if "format" not in e]
    assert full and compact_entries  # the docs show a whole delta.json and a format 2 entry
    for example in full:
        assert problem(example, schema) is None
        assert not _tensor_problems(example, example["format_version"], schema)
    for example in compact_entries:
        assert not _tensor_problems(example, 2, schema)
        # format 2's fields are what version 1 lacks
        assert _tensor_problems(
            {
                "tensors": {
                    n: {k: v for k, v in m.items() if k not in ("gaps", "base_sha256")}
                    for n, m in example["tensors"].items()
                }
            },
            2,
            schema,
        )


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda d: d.pop("weights_sha256"), "has no 'weights_sha256'"),
        (lambda d: d.__setitem__("tensors", []), "'tensors' must be an object"),
        (lambda d: d.__setitem__("base", "x"), "'base' must be an object"),
        (lambda d: d["evaluations"][0].__setitem__("gain", "high"), "'evaluations[0].gain' must be a number"),
        (lambda d: d["evaluations"][0]["general"][0].pop("kl"), "has no 'evaluations[0].general[0].kl'"),
        (
            lambda d: d["evaluations"][0].__setitem__("data", {"file": 3, "tokens": 1}),
            "'evaluations[0].data.file'",
        ),
    ],
)
def test_a_broken_example_names_what_is_wrong(edit, fragment):
    schema = load_schema("delta.json")
    example = copy.deepcopy(next(e for e in _examples() if "format" in e))
    edit(example)
    found = problem(example, schema)
    assert found is not None and fragment in found, found


@pytest.mark.parametrize(
    "meta, fragment",
    [
        ({"shape": [2, "x"], "dtype": "float32", "count": 1}, "shape"),
        ({"shape": [2], "dtype": "int8", "count": 1}, "dtype"),
        ({"shape": [2], "dtype": "float32", "count": 0}, "count"),
        ({"shape": [2], "dtype": "float32", "count": True}, "count"),
        ({"shape": [2], "dtype": "float32", "count": 1, "loads_as": "lm_head.weight"}, "loads_as"),
    ],
)
def test_a_broken_tensor_entry_names_the_field(meta, fragment):
    schema = load_schema("delta.json")
    found = problem(meta, schema["$defs"]["tensor_v1"], schema)
    assert found is not None and fragment in found, found
