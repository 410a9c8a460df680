"""CLI helpers and the tiny-model command."""

import json
import re
import shutil

import pytest
import torch
from helpers import assert_clean_failure, read_all

from piece_surgery.formats.merge_recipe import parse_size
from piece_surgery.runtime.errors import PieceError


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2GB", 2 * 10**9),
        ("500MB", 500 * 10**6),
        ("1.5GiB", 3 * 2**29),
        ("10KiB", 10 * 1024),
        ("64kb", 64_000),
        (" 2gb ", 2 * 10**9),
        ("123", 123),
        ("7B", 7),
        (None, None),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["abc", "GB", "1.2.3GB", "2TB?"])
def test_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(PieceError, match="is not a size"):
        parse_size(text)


def test_tiny_model_is_a_loadable_seeded_checkpoint(tmp_path, cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert cli("tiny-model", tmp_path / "a", "--arch", "gpt2", "--seed", "3")[0] == 0
    assert cli("tiny-model", tmp_path / "b", "--arch", "gpt2", "--seed", "3")[0] == 0
    assert cli("tiny-model", tmp_path / "c", "--arch", "gpt2", "--seed", "4")[0] == 0
    a, b, c = (read_all(tmp_path / x) for x in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a")
    ids = tokenizer("def add(a, b):", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_tiny_model_refuses_an_unknown_architecture_and_an_existing_output(tmp_path, cli):
    assert_clean_failure(
        cli("tiny-model", tmp_path / "x", "--arch", "foo"), "unknown --arch", output=tmp_path / "x"
    )
    (tmp_path / "y").mkdir()
    assert_clean_failure(cli("tiny-model", tmp_path / "y"), "--overwrite")


def test_tilde_is_the_home_folder_in_every_data_option(tiny, tmp_path, cli, code_data, monkeypatch):
    """`--data '~/x'` (quoted: the shell left the `~`) reads $HOME/x, as the positional paths do."""
    base, home, elsewhere = tiny("llama"), tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    shutil.copy(code_data, home / "code.jsonl")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(elsewhere)  # no code.jsonl here, nor a `~` folder
    data = "~/code.jsonl"
    out = tmp_path / "out"
    out.mkdir()

    def ok(*args):
        code, stdout, err = cli(*args, "-q", "--json")
        assert code == 0, err
        return json.loads(stdout)

    scored = ok("score", base, "--data", data, "--retain", data, "-o", out / "m.safetensors")
    assert scored["examples"] == 5 and scored["retain"]["sources"][0]["examples"] == 5
    mask = ["--mask", out / "m.safetensors"]
    args = ["--data", data, "--eval-data", data, "--eval-general", data, "--max-steps", "1", *mask]
    trained = ok("train", base, *args, "-o", out / "d")
    assert trained["final_eval_loss"] is not None and trained["measured_drift"] is not None
    evaluated = ok("eval", base, out / "d", "--data", data, "--general", data)
    assert evaluated["data"]["examples"] == 5 and evaluated["general"][0]["examples"] == 5
    generated = ok("generate", base, "--prompts", data, "--max-new-tokens", "2")
    assert len(generated["prompts"]) == 5


COMMANDS = (
    "score",
    "train",
    "eval",
    "generate",
    "diff",
    "apply",
    "inspect",
    "push",
    "export",
    "import",
    "tiny-model",
)


def help_options(cli, command: str) -> dict[str, str]:
    """An option's long name -> its help text (whitespace collapsed), in the order --help lists them."""
    code, stdout, err = cli(command, "--help")
    assert code == 0, err
    options: dict[str, str] = {}
    for line in stdout.split("Options:", 1)[1].splitlines():
        found = re.match(r"^  (?:-\w, )?(--[\w-]+)(.*)", line)
        if found:
            name = found[1]
            options[name] = found[2]
        elif options:
            options[name] += line
    return {name: " ".join(text.split()) for name, text in options.items()}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_ends_with_overwrite_quiet_json_and_shows_defaults(cli, command):
    """--overwrite, -q and --json after the command's own options and its records'; every option with
    a default says it."""
    import typer

    from piece_surgery.cli import app

    options = help_options(cli, command)
    names = [n for n in options if n != "--help"]
    common = [n for n in ("--overwrite", "--quiet", "--json") if n in options]
    assert names[-len(common) :] == common, names
    click_command = typer.main.get_command(app).commands[command]
    for param in click_command.params:
        flag = next((o for o in param.opts if o.startswith("--")), None)
        if flag in options and not getattr(param, "is_flag", True) and param.default not in (None, [], ()):
            assert "[default" in options[flag], (command, flag)


def test_train_help_says_its_scoring_options_apply_without_a_mask_and_their_defaults(cli):
    options = help_options(cli, "train")
    for name, default in [("--method", "piece-r"), ("--density", "0.001"), ("--score-batch-size", "1")]:
        assert "Scoring without --mask" in options[name] and f"[default: {default}]" in options[name], name
    assert options["--normalize"].endswith("[default: none]")
    assert options["--exclude"].count("[default") == 1  # said by the record's help already, once


def test_metavars_say_what_a_value_is(cli):
    assert "--density FRACTION" in cli("diff", "--help")[1]
    assert "--self-length TOKENS" in cli("eval", "--help")[1]
