"""How the CLI ends a command that did not finish (cli/__init__.py), issue 36: an interrupted or
terminated command says what it left on disk (a resumable state, a record written into delta.json
but not yet the card, an output already in place) instead of "nothing was written"; and under
--json an error is one JSON object whenever success would be one."""

import json

import pytest
from helpers import perturb

from piece_surgery.cli import Interrupted, Terminated


def last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


@pytest.mark.parametrize(
    "stop, code, word", [(Terminated, 143, "terminated"), (Interrupted, 130, "interrupted")]
)
def test_a_stop_after_a_saved_state_names_it(tiny, code_data, tmp_path, cli, monkeypatch, stop, code, word):
    import piece_surgery.training.loop as trainer

    original = trainer.save_state

    def save_then_stop(state_dir, sparse, optimizer, step, *rest):
        original(state_dir, sparse, optimizer, step, *rest)
        if step == 4:
            raise stop()

    monkeypatch.setattr(trainer, "save_state", save_then_stop)
    out = tmp_path / "d"
    args = ["train", tiny("llama"), "--data", code_data, "-o", out, "--batch-size", "1"]
    result = cli(*args, "--save-every", "2", "--max-steps", "6", "-q")
    assert result[0] == code
    line = last_line(result[2])
    assert line.startswith(f"error: {word};") and "nothing was written" not in line, line
    assert "resumable state (step 4)" in line and f"{out}.state" in line and "--resume" in line, line


def test_a_stop_before_any_state_says_nothing_was_written(tiny, code_data, tmp_path, cli, monkeypatch):
    import piece_surgery.training.loop as trainer

    def stop(*args, **kwargs):
        raise Terminated()

    monkeypatch.setattr(trainer, "save_state", stop)
    out = tmp_path / "d"
    args = ["train", tiny("llama"), "--data", code_data, "-o", out, "--save-every", "2", "--max-steps", "4"]
    result = cli(*args, "-q")
    assert result[0] == 143 and last_line(result[2]) == "error: terminated; nothing was written"


def test_a_stop_between_delta_json_and_the_card_says_so(tiny, tmp_path, cli, code_data, monkeypatch):
    import piece_surgery.formats.delta_folder as folder

    base = tiny("llama")
    tuned = perturb(base, tmp_path / "tuned", fraction=0.02, hard=False)
    delta = tmp_path / "delta"
    assert cli("diff", base, tuned, "-o", delta, "-q")[0] == 0
    replace = folder._replace_file

    def stop_at_the_card(path, text):
        if path.name == "README.md":
            raise Terminated()  # delta.json is replaced, the card not yet
        replace(path, text)

    monkeypatch.setattr(folder, "_replace_file", stop_at_the_card)
    result = cli("eval", base, delta, "--data", code_data, "--general", code_data, "--record", "-q")
    assert result[0] == 143
    line = last_line(result[2])
    assert "nothing was written" not in line and "delta.json" in line and "card" in line, line


def test_a_stop_after_the_output_is_written_says_so(tiny, code_data, tmp_path, cli, monkeypatch):
    """The delta is in place and only removing the state is left: the line says both."""
    import piece_surgery.recipes.train as recipe

    def stop(state_dir):
        raise Terminated()

    monkeypatch.setattr(recipe, "remove_state", stop)
    out = tmp_path / "d"
    args = ["train", tiny("llama"), "--data", code_data, "-o", out, "--save-every", "2", "--max-steps", "4"]
    result = cli(*args, "-q")
    line = last_line(result[2])
    assert result[0] == 143 and (out / "delta.json").is_file()
    assert f"'{out}' is written" in line and "resumable state (step 4)" in line, line


# ---------------------------------------------------------------- item 12: --json with RANK set alone


@pytest.mark.parametrize("rank", ["1", "3"])
def test_an_error_under_json_is_one_object_with_a_stray_rank(tmp_path, cli, monkeypatch, rank):
    """RANK set in the environment without a launcher (no WORLD_SIZE, so no process group): the
    process speaks for itself, on error as on success."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code, out, err = cli("tiny-model", tmp_path / "t", "--json", "-q")
    assert code == 0 and json.loads(out)["command"] == "tiny-model"
    code, out, err = cli("inspect", tmp_path / "missing", "--json")
    assert code == 2 and json.loads(out) == {"error": last_line(err).removeprefix("error: "), "exit_code": 2}
