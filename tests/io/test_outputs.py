"""Outputs against inputs however they are reached (io/outputs.py, runtime/paths.py), issue 36:
every path is compared as its reader opens it, and a path the system cannot follow (a symbolic
link loop, wherever it sits) ends a command in one line, never a traceback."""

import json
import os
import shutil

import pytest
from helpers import assert_clean_failure, image_chat, perturb, snapshot

from piece_surgery.models.tiny import write_png

# ---------------------------------------------------------------- item 1: a data file reached by a link


def test_a_linked_data_file_protects_the_images_beside_the_link(llava, tmp_path, cli):
    """`data/train.jsonl` links to a file in another folder; its reader opens the images beside the
    link (`data/images/...`, `data/run.state/...`), which no output may replace, whatever command
    and whatever output: the folder, one image, the state folder of a run, an --plot image."""
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (data / "images").mkdir(parents=True)
    elsewhere.mkdir()
    write_png(data / "images" / "a.png", 20, 20, seed=1)
    write_png(data / "images" / "chart.png", 20, 20, seed=2)
    write_png(data / "run.state" / "b.png", 20, 20, seed=3)
    paths = ["images/a.png", "images/chart.png", "run.state/b.png"]
    (elsewhere / "train.jsonl").write_text("".join(json.dumps(image_chat(p)) + "\n" for p in paths))
    (data / "train.jsonl").symlink_to(elsewhere / "train.jsonl")
    delta = tmp_path / "delta"
    args = ["train", llava, "--data", data / "train.jsonl", "--max-steps", "1", "-q"]
    assert cli(*args, "-o", delta)[0] == 0  # the images are read beside the link
    before = snapshot(data)
    for attempt in (
        [*args, "-o", data / "images", "--overwrite"],
        [*args, "-o", data / "run", "--save-every", "1"],  # its state folder holds an image
        ["score", llava, "--data", data / "train.jsonl", "-o", data / "images" / "a.png", "--overwrite"],
        [
            "eval",
            llava,
            delta,
            "--data",
            data / "train.jsonl",
            "--plot",
            data / "images" / "chart.png",
            "--overwrite",
            "-q",
        ],  # fmt: skip
    ):
        assert_clean_failure(cli(*attempt), "overlaps input", unchanged=(before, [data]))


# ---------------------------------------------------------------- item 7: symbolic link loops


def loop(folder, name="loop"):
    """A symbolic link loop at folder/name (name -> name.2 -> name)."""
    os.symlink(f"{name}.2", folder / name)
    os.symlink(name, folder / f"{name}.2")
    return folder / name


@pytest.fixture
def inputs(tiny, tmp_path, cli, code_data):
    model = shutil.copytree(tiny("llama"), tmp_path / "model")
    tuned = perturb(model, tmp_path / "tuned", fraction=0.02, hard=False)
    assert cli("diff", model, tuned, "-o", tmp_path / "delta", "-q")[0] == 0
    return model, tmp_path / "delta", code_data


@pytest.mark.parametrize(
    "command",
    [
        "score {loop} --data {data} -o {out}.safetensors",
        "score {model} --data {loop} -o {out}.safetensors",
        "score {model} --data {data} -o {loop}",
        "score {model} --data {data} -o {loop}/out.safetensors",
        "train {model} --data {data} --mask {loop} -o {out}",
        "train {model} --data {data} -o {out} --eval-data {loop}",
        "eval {model} {loop} --data {data}",
        "eval {model} {delta} --data {data} --general {loop}",
        "diff {model} {loop} -o {out}",
        "apply {model} {loop} -o {out}",
        "apply {loop} {delta} -o {out}",
        "apply --recipe {loop}",
        "inspect {loop}",
        "push {loop} user/name",
        "export {delta} --base {loop} -o {out}",
        "import {loop} --base {model} -o {out}",
    ],
)
def test_a_link_loop_given_as_a_path_is_one_line(inputs, tmp_path, cli, command):
    model, delta, data = inputs
    before = snapshot(model, delta, data)
    parts = command.format(model=model, delta=delta, data=data, out=tmp_path / "out", loop=loop(tmp_path))
    line = assert_clean_failure(cli(*parts.split(), "-q"), unchanged=(before, [model, delta, data]))
    assert "symbolic link loop" in line or "link loop" in line, line
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))]


def test_a_link_loop_inside_a_base_or_delta_folder_reads_nothing(inputs, tmp_path, cli):
    """A stray looping link beside the files a command reads is no file of the model's or the
    delta's: the command reads around it (the overlap check follows a folder's links)."""
    model, delta, data = inputs
    loop(model)
    loop(delta)
    out = tmp_path / "merged"
    for args in (
        ["score", model, "--data", data, "-o", tmp_path / "m.safetensors"],
        ["apply", model, delta, "-o", out],
        ["inspect", delta],
        ["eval", model, delta, "--data", data, "--general", data],
    ):
        code, _, err = cli(*args, "-q")
        assert code == 0 and "Traceback" not in err, err


def test_a_loop_where_a_file_of_the_model_should_be_is_one_line(inputs, tmp_path, cli):
    model, delta, data = inputs
    (model / "model.safetensors").unlink()
    loop(model, "model.safetensors")
    out = tmp_path / "merged"
    assert_clean_failure(cli("apply", model, delta, "-o", out, "-q"), output=out)
    assert_clean_failure(cli("score", model, "--data", data, "-o", out, "-q"), output=out)
