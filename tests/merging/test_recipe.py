"""apply --recipe: a YAML stack that equals the same command line, byte for byte."""

from pathlib import Path

import pytest
import yaml
from helpers import assert_clean_failure, perturb, snapshot

from piece_surgery.formats.delta_folder import save_delta
from piece_surgery.merging.diff import diff


@pytest.fixture
def stack(tiny, tmp_path):
    base = tiny("llama")
    for i in range(2):
        tuned = perturb(base, tmp_path / f"t{i}", fraction=0.05, seed=i, hard=False)
        save_delta(diff(str(base), str(tuned)), tmp_path / f"d{i}")
    return base


def test_a_recipe_is_the_command_line_byte_for_byte(stack, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        stack,
        "d0",
        "d1",
        "--scale",
        "1",
        "--scale",
        "0.5",
        "--on-conflict",
        "ties",
        "--shard-size",
        "40KB",
    ]
    assert cli("apply", *args, "-o", "merged", "-q")[0] == 0
    by_hand = snapshot(tmp_path / "merged")
    (tmp_path / "merged").rename(tmp_path / "by-hand")
    recipe = {
        "base": str(stack),
        "deltas": [{"path": "d0", "scale": 1}, {"path": "d1", "scale": 0.5}],
        "on_conflict": "ties",
        "shard_size": "40KB",
        "output": "merged",
    }
    (tmp_path / "stack.yaml").write_text(yaml.safe_dump(recipe))
    assert cli("apply", "--recipe", "stack.yaml", "-q")[0] == 0
    assert snapshot(tmp_path / "merged") == by_hand  # weights, index, config, card and the recipe
    assert len([f for f in by_hand if f.endswith(".safetensors")]) > 1
    recorded = yaml.safe_load((tmp_path / "merged" / "piece-surgery-recipe.yaml").read_text())
    # paths relative to the folder the recipe lies in, so it means the same there
    assert recorded["deltas"] == [{"path": "../d0", "scale": 1.0}, {"path": "../d1", "scale": 0.5}]
    card = (tmp_path / "merged" / "README.md").read_text()
    rebuild = "piece-surgery apply --recipe merged/piece-surgery-recipe.yaml --output merged-again"
    assert rebuild in card
    assert cli(*rebuild.split()[1:], "-q")[0] == 0  # as the card says, from the folder above it
    weights = lambda files: {Path(k).name: v for k, v in files.items() if k.endswith(".safetensors")}  # noqa: E731
    assert weights(snapshot(tmp_path / "merged-again")) == weights(by_hand)
    # run as it lies, it would replace the folder holding it: refused, nothing touched
    assert_clean_failure(
        cli("apply", "--recipe", "merged/piece-surgery-recipe.yaml", "--overwrite"), "overlaps input"
    )
    assert snapshot(tmp_path / "merged") == by_hand


def test_paths_in_a_recipe_are_relative_to_its_folder(stack, tmp_path, cli, monkeypatch):
    (tmp_path / "recipes").mkdir()
    recipe = {"base": str(stack), "deltas": ["../d0"], "output": "../merged"}
    (tmp_path / "recipes" / "r.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir("/")  # anywhere but the recipe's folder
    code, _, err = cli("apply", "--recipe", tmp_path / "recipes" / "r.yaml", "-q")
    assert code == 0, err
    assert (tmp_path / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "document, fragment",
    [
        ("base: [oops", "not valid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
        ("base: b\ndeltas: [d0]\noutput: o\nscales: [1]\n", "unknown key 'scales'"),
        ("base: b\ndeltas: []\noutput: o\n", "'deltas' must be a list"),
        ("base: b\ndeltas: [{path: d0, scale: .nan}]\noutput: o\n", "finite number"),
        ("base: b\ndeltas: [{path: d0, scale: yes}]\noutput: o\n", "finite number"),
        ("deltas: [d0]\noutput: o\n", "'base' must be"),
        ("base: b\ndeltas: [d0]\noutput: o\nforce: maybe\n", "'force' must be true or false"),
    ],
)
def test_bad_recipes(tmp_path, cli, document, fragment):
    (tmp_path / "r.yaml").write_text(document)
    assert_clean_failure(cli("apply", "--recipe", tmp_path / "r.yaml"), fragment)


def test_a_recipe_with_command_line_merge_options_is_refused(stack, tmp_path, cli):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"base": str(stack), "deltas": ["d0"], "output": "o"}))
    assert_clean_failure(
        cli("apply", "--recipe", tmp_path / "r.yaml", "--scale", "2"), "give one or the other"
    )
    assert_clean_failure(cli("apply"), "apply needs BASE, DELTAS, --output (or --recipe)")
