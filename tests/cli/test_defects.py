"""Defects found by trying the tool as a new user and as an adversary (issue 12); each test failed
before its fix. Every bad input ends in one line on stderr, exit 2, no output and unchanged inputs."""

import hashlib
import json
import os
import shutil
import stat

import pytest
import torch
from helpers import assert_clean_failure, perturb, snapshot
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from piece_surgery.models.tiny import make_tiny_checkpoint


@pytest.fixture
def model(tiny, tmp_path):
    """A private copy of the tiny model: tests may try to damage it."""
    return shutil.copytree(tiny("llama"), tmp_path / "model")


@pytest.fixture
def delta(model, tmp_path, cli):
    tuned = perturb(model, tmp_path / "tuned", fraction=0.02, hard=False)
    assert cli("diff", model, tuned, "-o", tmp_path / "delta", "-q")[0] == 0
    return tmp_path / "delta"


def reseal(folder, edit_tensors=None, edit_json=None):
    """Edit a delta folder and re-seal its digest, so only the edit itself is wrong."""
    if edit_tensors:
        tensors = load_file(folder / "delta.safetensors")
        edit_tensors(tensors)
        save_file(tensors, folder / "delta.safetensors", metadata={"format": "piece-surgery/delta"})
    info = json.loads((folder / "delta.json").read_text())
    info["weights_sha256"] = hashlib.sha256((folder / "delta.safetensors").read_bytes()).hexdigest()
    if edit_json:
        edit_json(info)
    (folder / "delta.json").write_text(json.dumps(info))


# ---------------------------------------------------------------- 1. an output may not overwrite an input


@pytest.mark.parametrize("target", ["model.safetensors", "config.json"])
def test_score_output_inside_the_model_is_refused(model, code_data, cli, target):
    before = snapshot(model)
    result = cli("score", model, "--data", code_data, "-o", model / target, "--overwrite", "-q")
    assert_clean_failure(result, "overlaps input", unchanged=(before, [model]))


def test_apply_output_onto_its_own_delta_is_refused(model, delta, cli):
    before = snapshot(model, delta)
    result = cli("apply", model, delta, "-o", delta, "--overwrite", "-q")
    assert_clean_failure(result, "overlaps input", unchanged=(before, [model, delta]))


def test_train_and_diff_outputs_may_not_hit_their_inputs(model, code_data, tmp_path, cli):
    before = snapshot(model, code_data)
    assert_clean_failure(
        cli("train", model, "--data", code_data, "-o", code_data, "--overwrite", "-q"),
        "overlaps input",
        unchanged=(before, [model, code_data]),
    )
    assert_clean_failure(
        cli("diff", model, model, "-o", model / "sub", "-q"),
        "overlaps input",
        unchanged=(before, [model, code_data]),
    )


# ---------------------------------------------------------------- 2. non-finite numbers


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_scale_is_refused(model, delta, tmp_path, cli, value):
    result = cli("apply", model, delta, "-o", tmp_path / "out", f"--scale={value}", "-q")
    assert_clean_failure(result, "not a finite number", output=tmp_path / "out")


@pytest.mark.parametrize(
    "option, fragment",
    [
        ("--weight-decay=inf", "--weight-decay must be a finite number"),
        ("--weight-decay=nan", "--weight-decay must be a finite number"),
        ("--clip=nan", "--clip must be a finite number"),
        ("--lr=1e39", "--lr must be positive and at most 1"),
        ("--lr=nan", "--lr must be positive"),
    ],
)
def test_non_finite_or_absurd_train_options_are_refused(model, code_data, tmp_path, cli, option, fragment):
    out = tmp_path / "out"
    assert_clean_failure(
        cli("train", model, "--data", code_data, "-o", out, option, "-q"), fragment, output=out
    )


def test_training_that_makes_values_non_finite_writes_no_delta(model, code_data, tmp_path, cli):
    out = tmp_path / "out"
    result = cli(
        "train",
        model,
        "--data",
        code_data,
        "-o",
        out,
        "--lr",
        "1",
        "--weight-decay",
        "1e38",
        "--max-steps",
        "2",
        "-q",
    )
    assert_clean_failure(result, "became non-finite", output=out)


def test_a_delta_that_makes_a_weight_nan_is_refused_everywhere(model, delta, tmp_path, cli, hub):
    name = next(k[: -len("::tuned")] for k in load_file(delta / "delta.safetensors") if k.endswith("::tuned"))
    index = int(load_file(delta / "delta.safetensors")[f"{name}::indices"][0])

    def poison(tensors):
        tuned = tensors[f"{name}::tuned"].view(torch.float32)
        tuned[0] = float("nan")

    reseal(delta, poison)
    before = snapshot(delta)
    for args in (
        ("apply", model, delta, "-o", tmp_path / "out"),
        ("apply", model, delta, "-o", tmp_path / "out", "--dry-run"),
        ("inspect", delta),
        ("push", delta, "user/poisoned"),
    ):
        line = assert_clean_failure(
            cli(*args, "-q"), "may not make a weight non-finite", unchanged=(before, [delta])
        )
        assert name in line and str(index) in line
    assert not (tmp_path / "out").exists() and "user/poisoned" not in hub.state.repos


def test_a_base_that_held_a_non_finite_value_may_keep_one(model, tmp_path, cli):
    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"][3] = float("inf")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    tuned = shutil.copytree(model, tmp_path / "tuned")
    t = load_file(tuned / "model.safetensors")
    t["model.norm.weight"][3] = float("-inf")
    t["model.norm.weight"][4] = 0.5
    save_file(t, tuned / "model.safetensors", metadata={"format": "pt"})
    assert cli("diff", model, tuned, "-o", tmp_path / "d", "-q")[0] == 0
    assert cli("inspect", tmp_path / "d", "-q")[0] == 0


# ---------------------------------------------------------------- 3. one line, not a traceback


def test_chat_starting_with_the_assistant_is_learned(model, tmp_path, cli):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "assistant", "content": "def f(): pass"}]}) + "\n")
    code, stdout, stderr = cli(
        "score", model, "--data", data, "-o", tmp_path / "m.safetensors", "--json", "-q"
    )
    assert code == 0, stderr
    assert json.loads(stdout)["tokens"] > 0


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([{"role": "user"}, {"role": "assistant", "content": "x"}], "message 1 must be an object"),
        ([{"role": "user", "content": 3}], "message 1: 'content' must be a string"),
        ("hello", "'messages' must be a non-empty list"),
        ([], "'messages' must be a non-empty list"),
    ],
)
def test_malformed_chats(model, tmp_path, cli, messages, fragment):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": messages}) + "\n")
    out = tmp_path / "m.safetensors"
    line = assert_clean_failure(cli("score", model, "--data", data, "-o", out, "-q"), fragment, output=out)
    assert "chat.jsonl:1" in line


def test_a_chat_template_that_raises(model, tmp_path, cli):
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ raise_exception('no system messages here') }}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n")
    out = tmp_path / "m.safetensors"
    assert_clean_failure(
        cli("score", model, "--data", data, "-o", out, "-q"), "chat template failed", output=out
    )


def test_a_mask_tensor_with_no_indices(model, code_data, tmp_path, cli):
    assert cli("score", model, "--data", code_data, "-o", tmp_path / "m.safetensors", "-q")[0] == 0
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors[next(iter(tensors))] = torch.zeros(0, dtype=torch.int32)
    save_file(tensors, tmp_path / "m.safetensors", metadata=meta)
    out = tmp_path / "d"
    result = cli("train", model, "--data", code_data, "--mask", tmp_path / "m.safetensors", "-o", out, "-q")
    assert_clean_failure(result, "must be a non-empty int32/int64 array", output=out)


@pytest.mark.parametrize("command", ["apply", "train"])
def test_an_existing_file_as_folder_output(model, delta, code_data, tmp_path, cli, command, monkeypatch):
    import piece_surgery.training.loop as trainer

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the output was checked")

    monkeypatch.setattr(trainer, "train_sparse", no_training)
    out = tmp_path / "a-file"
    out.write_text("keep me")
    args = ("apply", model, delta) if command == "apply" else ("train", model, "--data", code_data)
    assert_clean_failure(
        cli(*args, "-o", out, "--overwrite", "-q"), "is a file and this command writes a folder"
    )
    assert out.read_text() == "keep me"


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda info: info.__setitem__("tensors", list(info["tensors"])), "'tensors' must be an object"),
        (lambda info: next(iter(info["tensors"].values())).__setitem__("shape", "32x32"), "shape of"),
        (lambda info: next(iter(info["tensors"].values())).__setitem__("count", -1), "count of"),
        (lambda info: next(iter(info["tensors"].values())).__setitem__("dtype", "int8"), "dtype of"),
        (lambda info: info.__setitem__("base", [1, 2]), "'base' must be an object"),
        (lambda info: info.pop("weights_sha256"), "weights_sha256"),
    ],
)
def test_hand_edited_delta_json(model, delta, tmp_path, cli, edit, fragment):
    reseal(delta, edit_json=edit)
    assert_clean_failure(
        cli("apply", model, delta, "-o", tmp_path / "out", "-q"), fragment, output=tmp_path / "out"
    )


def test_a_checkpoint_tensor_of_the_wrong_shape(model, code_data, tmp_path, cli):
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "m.safetensors"
    line = assert_clean_failure(
        cli("score", model, "--data", code_data, "-o", out, "-q"), "[3, 3]", output=out
    )
    assert "model.layers.0.mlp.up_proj.weight" in line


# ---------------------------------------------------------------- 4. missing weights are not made up


def test_a_missing_weight_is_named(model, code_data, tmp_path, cli):
    tensors = load_file(model / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.weight"]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "m.safetensors"
    result = cli("score", model, "--data", code_data, "-o", out, "-q")
    assert_clean_failure(
        result, "lacks 1 of the model's weights (first: 'model.layers.1.self_attn.o_proj.weight')"
    )


def test_a_config_that_does_not_match_the_weights(model, tiny, code_data, tmp_path, cli):
    shutil.copy(tiny("gpt2") / "config.json", model / "config.json")
    out = tmp_path / "m.safetensors"
    assert_clean_failure(
        cli("score", model, "--data", code_data, "-o", out, "-q"), "does not match its weights"
    )


def test_a_tied_alias_is_not_missing(tiny, code_data, tmp_path, cli):
    assert "lm_head.weight" not in load_file(tiny("qwen2") / "model.safetensors")
    assert cli("score", tiny("qwen2"), "--data", code_data, "-o", tmp_path / "m.safetensors", "-q")[0] == 0


# ---------------------------------------------------------------- 5, 6. resuming


def interrupted_run(model, code_data, out, cli, monkeypatch, *extra):
    import piece_surgery.training.loop as trainer

    original = trainer.save_state

    def save_then_stop(state_dir, sparse, optimizer, step, *rest):
        original(state_dir, sparse, optimizer, step, *rest)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_state", save_then_stop)
    args = ["--data", code_data, "-o", out, "--batch-size", "1", "--save-every", "2", "-q", *extra]
    assert cli("train", model, *args, "--max-steps", "6")[0] == 130
    monkeypatch.setattr(trainer, "save_state", original)
    return args


def test_resume_with_fewer_steps_than_saved_is_refused(model, code_data, tmp_path, cli, monkeypatch):
    out = tmp_path / "d"
    args = interrupted_run(model, code_data, out, cli, monkeypatch)
    result = cli("train", model, *args, "--max-steps", "3", "--resume")
    assert_clean_failure(result, "the saved state is at step 4, past the 3 steps", output=out)
    assert cli("train", model, *args, "--max-steps", "4", "--resume", "--json")[0] == 0
    assert json.loads((out / "delta.json").read_text())["provenance"]["steps"] == 4


def test_an_edited_state_is_refused(model, code_data, tmp_path, cli, monkeypatch):
    out = tmp_path / "d"
    args = interrupted_run(model, code_data, out, cli, monkeypatch)
    state = tmp_path / "d.state" / "state.safetensors"
    tensors = load_file(state)
    key = next(k for k in tensors if k.endswith("::values"))
    tensors[key][0] += 1.0
    save_file(tensors, state, metadata={"format": "piece-surgery/train-state"})
    result = cli("train", model, *args, "--max-steps", "6", "--resume")
    assert_clean_failure(result, "does not match its recorded sha256", output=out)


def test_a_saved_state_is_not_deleted_without_resume_or_overwrite(
    model, code_data, tmp_path, cli, monkeypatch
):
    out = tmp_path / "d"
    args = interrupted_run(model, code_data, out, cli, monkeypatch)
    before = snapshot(tmp_path / "d.state")
    result = cli("train", model, *args, "--max-steps", "6")
    assert_clean_failure(result, "add --resume to continue it, or --overwrite", output=out)
    assert snapshot(tmp_path / "d.state") == before
    assert cli("train", model, *args, "--max-steps", "2", "--overwrite")[0] == 0
    assert not (tmp_path / "d.state").exists()


# ---------------------------------------------------------------- 8. permissions


def test_outputs_get_the_permissions_of_the_umask(model, delta, code_data, tmp_path, cli):
    old = os.umask(0o022)
    try:
        assert cli("score", model, "--data", code_data, "-o", tmp_path / "m.safetensors", "-q")[0] == 0
        assert cli("apply", model, delta, "-o", tmp_path / "merged", "-q")[0] == 0
        assert cli("tiny-model", tmp_path / "tiny", "-q")[0] == 0
        assert cli("diff", model, tmp_path / "merged", "-o", tmp_path / "d2", "-q")[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o644
    for folder in (tmp_path / "merged", tmp_path / "tiny", tmp_path / "d2"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
        for f in folder.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


# ---------------------------------------------------------------- options that would do nothing


def test_options_that_do_nothing_are_refused(model, code_data, tmp_path, cli):
    out = tmp_path / "o"
    assert_clean_failure(
        cli("train", model, "--data", code_data, "-o", out, "--eval-every", "2", "-q"),
        "--eval-every needs --eval-data",
    )
    assert cli("score", model, "--data", code_data, "-o", tmp_path / "m.safetensors", "-q")[0] == 0
    result = cli(
        "train",
        model,
        "--data",
        code_data,
        "-o",
        out,
        "--mask",
        tmp_path / "m.safetensors",
        "--density",
        "0.1",
    )
    assert_clean_failure(result, "do nothing with --mask", output=out)
    result = cli("score", model, "--data", tmp_path / "missing.jsonl", "-o", out, "--method", "magnitude")
    assert_clean_failure(result, "reads no data", output=out)


def test_the_same_delta_twice(model, delta, tmp_path, cli):
    copy = shutil.copytree(delta, tmp_path / "copy")
    for second in (delta, copy):
        result = cli("apply", model, delta, second, "-o", tmp_path / "out", "-q")
        assert_clean_failure(result, "is the same delta as", output=tmp_path / "out")
    assert cli("apply", model, delta, delta, "-o", tmp_path / "twice", "--allow-duplicates", "-q")[0] == 0
    assert cli("apply", model, delta, "-o", tmp_path / "scaled", "--scale", "2", "-q")[0] == 0
    twice, scaled = (
        load_file(tmp_path / "twice" / "model.safetensors"),
        load_file(tmp_path / "scaled" / "model.safetensors"),
    )
    assert all(torch.equal(twice[k], scaled[k]) for k in twice)


def test_no_local_path_goes_into_shareable_files(model, code_data, tmp_path, cli):
    assert cli("score", model, "--data", code_data, "-o", tmp_path / "m.safetensors", "-q")[0] == 0
    assert (
        cli(
            "train",
            model,
            "--data",
            code_data,
            "--mask",
            tmp_path / "m.safetensors",
            "-o",
            tmp_path / "d",
            "-q",
        )[0]
        == 0
    )
    tuned = perturb(model, tmp_path / "tuned", fraction=0.01, hard=False)
    assert cli("diff", model, tuned, "-o", tmp_path / "d2", "-q")[0] == 0
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        texts = [json.dumps(f.metadata())]
    for folder in (tmp_path / "d", tmp_path / "d2"):
        texts += [(folder / "delta.json").read_text(), (folder / "README.md").read_text()]
    for text in texts:
        assert str(tmp_path) not in text and "/tmp" not in text
    info = json.loads((tmp_path / "d" / "delta.json").read_text())
    assert info["provenance"]["data"]["file"] == "code.jsonl" and info["base"]["name"] == "model"


def test_a_huge_record_is_tokenized_a_bounded_prefix_at_a_time():
    from piece_surgery.data.tokenize import tokenize_record
    from piece_surgery.models.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    seen = []

    class Spy:
        eos_token_id = tokenizer.eos_token_id

        def __call__(self, text, **kwargs):
            seen.append(len(text))
            return tokenizer(text, **kwargs)

    text = "def add(a, b):\n    return a + b\n" * 100_000  # 3.3 MB on one line of JSON
    example = tokenize_record({"text": text}, Spy(), 64)
    assert max(seen) <= 64 * 8 * 4 * 4  # a few growing prefixes, never the whole record
    assert example.input_ids == tokenizer(text[:20_000])["input_ids"][:64]


def test_help_fits_80_columns(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    for command in ("score", "train", "diff", "apply", "push", "inspect", "export", "import", "tiny-model"):
        code, stdout, _ = cli(command, "--help")
        assert code == 0 and "…" not in stdout
        assert max(len(line) for line in stdout.splitlines()) <= 80, command
    assert "--offload-accumulators" in cli("score", "--help")[1]
    assert "--score-batch-size" in cli("train", "--help")[1]


def test_a_shard_index_may_not_point_outside_the_folder(model, code_data, tmp_path, cli):
    make_tiny_checkpoint(tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../model/model.safetensors"
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "m.safetensors"
    result = cli("score", tmp_path / "sharded", "--data", code_data, "-o", out, "-q")
    assert_clean_failure(result, "which is not a file in the folder", output=out)
