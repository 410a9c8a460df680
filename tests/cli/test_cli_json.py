"""Every command's --json output against its schema in docs/cli.md (keys, types), and --json errors."""

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import perturb

DOC = Path(__file__).parents[2] / "docs" / "cli.md"
TYPES = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "object": dict,
    "array": list,
    "null": type(None),
}


def documented_schemas() -> dict[str, dict[str, tuple[set, str]]]:
    """## section -> key -> (allowed Python types, the 'meaning' text)."""
    schemas, section = {}, None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
            schemas[section] = {}
        match = re.match(r"^\| `(\w+)` \| ([\w\\|]+) \| (.*) \|$", line)
        if match and section:
            types = {TYPES[t] for t in match[2].replace("\\|", "|").split("|")}
            schemas[section][match[1]] = (types, match[3])
    return schemas


def check(result: dict, schema: dict, kind: str | None = None) -> None:
    expected = {
        key
        for key, (_, meaning) in schema.items()
        if not (meaning.startswith(("mask:", "delta:")) and not meaning.startswith(f"{kind}:"))
    }
    assert set(result) == expected
    for key, value in result.items():
        types = schema[key][0]
        ok = any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in types)
        assert ok or (bool in types and isinstance(value, bool)), f"{key}: {value!r} is not {types}"


@pytest.fixture(scope="module")
def schemas():
    found = documented_schemas()
    assert {
        "score",
        "train",
        "eval",
        "generate",
        "diff",
        "apply",
        "push",
        "inspect",
        "export",
        "import",
        "tiny-model",
        "Errors",
    } <= set(found)
    return found


def run_json(cli, *args) -> dict:
    code, stdout, stderr = cli(*args, "--json", "-q")
    assert code == 0, stderr
    return json.loads(stdout)


def test_every_command_matches_its_documented_schema(schemas, tiny, code_data, tmp_path, cli, hub):
    base = tiny("llama", dtype=torch.bfloat16)
    check(run_json(cli, "tiny-model", tmp_path / "tiny"), schemas["tiny-model"])
    mask = tmp_path / "m.safetensors"
    scored = run_json(cli, "score", base, "--data", code_data, "-o", mask, "--density", "0.01")
    check(scored, schemas["score"])
    assert [source["file"] for source in scored["retain"]["sources"]] == ["general"]  # piece-r's default
    result = run_json(cli, "score", base, "-o", tmp_path / "r.safetensors", "--method", "random")
    check(result, schemas["score"])
    assert result["mean_loss"] is None
    trained = run_json(
        cli, "train", base, "--data", code_data, "--mask", mask, "-o", tmp_path / "d", "--max-steps", "2"
    )
    check(trained, schemas["train"])
    check(
        run_json(cli, "train", base, "--data", code_data, "-o", tmp_path / "d3", "--max-steps", "1"),
        schemas["train"],
    )
    tuned = perturb(base, tmp_path / "tuned", fraction=0.01, hard=False)
    check(run_json(cli, "diff", base, tuned, "-o", tmp_path / "d2"), schemas["diff"])
    measured = run_json(cli, "eval", base, tmp_path / "d", tuned, "--data", code_data, "--self-samples", "2")
    check(measured, schemas["eval"])
    assert [c["kind"] for c in measured["candidates"]] == ["delta", "checkpoint"]
    answers = run_json(
        cli, "generate", base, tmp_path / "d", tuned, "--prompt", "hi", "--max-new-tokens", "3"
    )
    check(answers, schemas["generate"])
    assert [a["model"] for a in answers["prompts"][0]["answers"]] == [
        str(base),
        str(tmp_path / "d"),
        str(tuned),
    ]
    for extra in ([], ["--dry-run"]):
        check(
            run_json(cli, "apply", base, tmp_path / "d", tmp_path / "d2", "-o", tmp_path / "m", *extra),
            schemas["apply"],
        )
    check(run_json(cli, "push", tmp_path / "d", "user/json-schema"), schemas["push"])
    inspected = run_json(cli, "inspect", mask)
    check(inspected, schemas["inspect"], "mask")
    assert inspected["retain"] == scored["retain"]
    assert "retain: general (128 examples); empirical labels" in cli("inspect", mask)[1]
    check(run_json(cli, "inspect", tmp_path / "d"), schemas["inspect"], "delta")
    check(
        run_json(cli, "export", tmp_path / "d", "--base", base, "-o", tmp_path / "adapter"), schemas["export"]
    )
    check(
        run_json(cli, "import", tmp_path / "adapter", "--base", base, "-o", tmp_path / "back"),
        schemas["import"],
    )


def test_errors_under_json_are_an_object_on_stdout(schemas, tmp_path, cli):
    code, stdout, stderr = cli(
        "apply", tmp_path / "nope", tmp_path / "nope-too", "-o", tmp_path / "out", "--json"
    )
    error = json.loads(stdout)
    check(error, schemas["Errors"])
    assert code == error["exit_code"] == 2 and stderr.strip() == f"error: {error['error']}"
    code, stdout, _ = cli("train", "--json")  # a usage error: a missing argument
    assert code == 2 and "error" in json.loads(stdout)


def test_every_command_takes_quiet_and_json(cli):
    for command in (
        "score",
        "train",
        "eval",
        "generate",
        "diff",
        "apply",
        "push",
        "inspect",
        "export",
        "import",
        "tiny-model",
    ):
        code, stdout, _ = cli(command, "--help")
        assert code == 0 and "--json" in stdout and "--quiet" in stdout, command
