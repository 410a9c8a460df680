"""The resumable state of train (training/state.py, recipes/train.py), issue 36: a resumed run never
replaces a folder that holds anything but a state; every option that changes what is trained or
recorded is in the resume key, or documented as free; the digest covers the whole state; and a
state whose parts are malformed (sealed again, so only the edit is wrong) is one line."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from helpers import assert_clean_failure, snapshot
from safetensors import safe_open
from safetensors.torch import save_file

from piece_surgery.runtime.json_files import file_sha256
from piece_surgery.runtime.options import RunOptions
from piece_surgery.training.config import TrainConfig

README = Path(__file__).parents[2] / "README.md"


@pytest.fixture
def model(tiny):
    return tiny("llama")


@pytest.fixture
def mask(model, tmp_path, cli):
    """A mask given to every run, so that what a resumed run reads is all the key can tell apart
    (a mask scored anew would differ with the data's length and count)."""
    path = tmp_path / "mask.safetensors"
    assert cli("score", model, "-o", path, "--method", "magnitude", "--density", "0.02", "-q")[0] == 0
    return path


def interrupted_run(model, data, out, cli, monkeypatch, *extra):
    """A run with --save-every 2 stopped (Ctrl-C) right after saving its state at step 4 of 6;
    returns the arguments that resume it (with --resume)."""
    import piece_surgery.training.loop as trainer

    original = trainer.save_state

    def save_then_stop(state_dir, sparse, optimizer, step, *rest):
        original(state_dir, sparse, optimizer, step, *rest)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_state", save_then_stop)
    args = ["--data", data, "-o", out, "--batch-size", "1", "--save-every", "2", "--max-steps", "6", *extra]
    assert cli("train", model, *args, "-q")[0] == 130
    monkeypatch.setattr(trainer, "save_state", original)
    return [*args, "-q"]


# ---------------------------------------------------------------- item 2: what else is in OUT.state


def test_a_resumed_run_never_replaces_a_state_folder_that_holds_something_else(
    model, code_data, tmp_path, cli, monkeypatch
):
    out = tmp_path / "d"
    args = interrupted_run(model, code_data, out, cli, monkeypatch)
    notes = tmp_path / "d.state" / "notes.txt"
    notes.write_text("mine")
    before = snapshot(tmp_path / "d.state")
    result = cli("train", model, *args, "--resume")
    assert_clean_failure(result, "holds something else", output=out)
    assert snapshot(tmp_path / "d.state") == before


def test_saving_a_state_never_replaces_a_folder_that_holds_something_else(tmp_path):
    """The writer holds the rule too (a library caller, a file that appeared during the run)."""
    from piece_surgery.runtime.errors import PieceError
    from piece_surgery.training.sparse_grad import SparseParameters
    from piece_surgery.training.state import save_state

    params = {"w": torch.nn.Parameter(torch.randn(4, 4))}
    sparse = SparseParameters(params, {"w": torch.tensor([1, 5])})
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(PieceError, match="holds something else"):
        save_state(folder, sparse, torch.optim.AdamW(list(sparse.values.values())), 1, [], {})
    assert (folder / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- item 5: the resume key


@pytest.mark.parametrize(
    "option, value",
    [
        ("--max-length", "16"),
        ("--max-samples", "3"),
        ("--dtype", "bfloat16"),
        ("--eval-data", "other"),
        ("--eval-general", "other"),
    ],
)
def test_resume_refuses_an_option_that_changes_what_is_trained_or_recorded(
    model, mask, code_data, tmp_path, cli, monkeypatch, option, value
):
    out = tmp_path / "d"
    args = interrupted_run(model, code_data, out, cli, monkeypatch, "--mask", mask)
    other = tmp_path / "other.txt"
    other.write_text("def g(y):\n    return y - 1\nclass K:\n    pass\n")
    value = other if value == "other" else value
    result = cli("train", model, *args, option, value, "--resume")
    assert_clean_failure(result, "the saved state was made with another", output=out)
    code, _, err = cli("train", model, *args, "--resume")  # as saved: it continues
    assert code == 0, err


def test_resume_names_each_option_that_differs_with_both_values(
    model, mask, code_data, tmp_path, cli, monkeypatch
):
    out = tmp_path / "d"
    args = interrupted_run(model, code_data, out, cli, monkeypatch, "--mask", mask, "--lr", "0.001")
    result = cli("train", model, *args, "--lr", "0.005", "--warmup-steps", "1", "--resume")
    line = assert_clean_failure(result, "other training options", output=out)
    assert "(--lr: 0.001 saved, 0.005 now; --warmup-steps: 0 saved, 1 now)" in line, line
    line = assert_clean_failure(cli("train", model, *args, "--max-length", "16", "--resume"), "--max-length")
    assert "(512 saved, 16 now)" in line, line
    code, _, err = cli("train", model, *args, "--resume")  # as saved: it continues
    assert code == 0, err


def test_every_run_option_is_in_the_resume_key_or_documented_free():
    """A new option of RunOptions (or TrainConfig) must be sorted: in the key, or free, and the
    free ones are the README's."""
    from piece_surgery.recipes.train import RESUME_FREE_RUN_OPTIONS

    keyed = {"max_length", "max_samples", "dtype"}  # recipes/train._resume_key
    run = {f.name for f in dataclasses.fields(RunOptions)}
    assert run == keyed | set(RESUME_FREE_RUN_OPTIONS)
    config = {f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("transient")}
    free = config - set(TrainConfig().resume_key())
    readme = " ".join(README.read_text().split())
    said = re.search(r"A resumed run may change only (.*?)\.", readme)
    assert said, "README says which options a resumed run may change"
    for name in free | set(RESUME_FREE_RUN_OPTIONS) - {"quiet"}:
        assert f"--{name.replace('_', '-')}" in said[1], name


# ---------------------------------------------------------------- items 6 and 9: the state itself


def reseal(state: Path, edit_description=None, edit_tensors=None) -> None:
    """Edit a saved state and seal it again as save_state would (digest, description in the file
    and in state.json), so only the edit itself is wrong. Writes the description into state.json
    as well, so a reader of either copy sees the edit."""
    with safe_open(str(state / "state.safetensors"), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    description = json.loads(meta.get("description") or (state / "state.json").read_text())
    description.pop("state_sha256", None)
    if edit_description:
        edit_description(description)
    if edit_tensors:
        edit_tensors(tensors)
    meta["description"] = json.dumps(description)
    save_file(tensors, state / "state.safetensors", metadata=meta)
    sealed = {**description, "state_sha256": file_sha256(state / "state.safetensors")}
    (state / "state.json").write_text(json.dumps(sealed))


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(step=3),
        lambda d: d.update(step=True),
        lambda d: d["history"][0].update(loss=-7.0),
    ],
    ids=["step", "step-true", "first-loss"],
)
def test_state_json_is_covered_by_the_digest(model, code_data, tmp_path, cli, monkeypatch, edit):
    out = tmp_path / "d"
    args = interrupted_run(model, code_data, out, cli, monkeypatch)
    state = tmp_path / "d.state" / "state.json"
    description = json.loads(state.read_text())
    edit(description)
    state.write_text(json.dumps(description))  # the state file and its recorded sha256 as they were
    result = cli("train", model, *args, "--resume")
    assert_clean_failure(result, "--resume:", output=out)


@pytest.mark.parametrize(
    "edit_description, edit_tensors",
    [
        (lambda d: d["history"].__setitem__(0, {"step": 1}), None),
        (lambda d: d["history"].__setitem__(1, "a record"), None),
        (lambda d: d["history"][2].update(loss="low"), None),
        (lambda d: d["history"].pop(), None),
        (lambda d: d.update(step=True), None),
        (lambda d: d.update(kept_step=99), None),
        (None, lambda t: t["rng::torch"].zero_()),
    ],
    ids=["no-loss", "not-a-record", "loss-text", "a-record-short", "step-true", "kept-past", "rng-zero"],
)
def test_a_malformed_state_sealed_again_is_one_line(
    model, code_data, tmp_path, cli, monkeypatch, edit_description, edit_tensors
):
    out = tmp_path / "d"
    args = interrupted_run(model, code_data, out, cli, monkeypatch)
    reseal(tmp_path / "d.state", edit_description, edit_tensors)
    before = snapshot(tmp_path / "d.state")
    result = cli("train", model, *args, "--resume")
    assert_clean_failure(result, "--resume:", output=out, unchanged=(before, [tmp_path / "d.state"]))
