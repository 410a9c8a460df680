"""Messages that name the right cause (issue 36, item 11): each mistake is refused in one line that
says what is wrong and advises only options the command has."""

import json
import os
import shutil

import pytest
import torch
from helpers import assert_clean_failure, perturb, snapshot
from safetensors.torch import load_file, save_file


@pytest.fixture
def work(tiny, tmp_path, cli):
    base = tiny("llama")
    tuned = perturb(base, tmp_path / "tuned", fraction=0.02, hard=False)
    assert cli("diff", base, tuned, "-o", tmp_path / "delta", "-q")[0] == 0
    return base, tmp_path / "delta"


def lora(base, folder, **config):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False, **config),
    )
    model.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- advice names the command's own options


def test_hub_advice_names_token_only_where_the_command_takes_it(tiny, tmp_path, cli, code_data, monkeypatch):
    """A download that needs a login (score, apply, ...: no --token) says how to log in without
    --token; push, which takes --token, names it."""
    import huggingface_hub
    from huggingface_hub import errors

    from piece_surgery.io.hub import hub_errors
    from piece_surgery.runtime.errors import PieceError

    def no_token(*args, **kwargs):
        raise errors.LocalTokenNotFoundError("no token")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_token)
    out = tmp_path / "m.safetensors"
    line = assert_clean_failure(cli("score", "user/private", "--data", code_data, "-o", out), "HF_TOKEN")
    assert "--token" not in line
    line = assert_clean_failure(cli("apply", tiny("llama"), "user/private", "-o", tmp_path / "x"), "HF_TOKEN")
    assert "--token" not in line

    class Refused(Exception):
        response = type("Response", (), {"status_code": 401})()

    for token_option in (False, True):
        with pytest.raises(PieceError) as refused, hub_errors("push to user/x", token_option=token_option):
            raise Refused()
        assert ("--token" in str(refused.value)) == token_option


def test_no_gradient_advice_fits_a_run_with_a_mask():
    """A masked tensor off the data's path: train refuses --exclude beside --mask (a scoring
    option), so the advice is to leave the tensor out of the mask when scoring."""
    from piece_surgery.runtime.errors import PieceError
    from piece_surgery.training.sparse_grad import SparseParameters

    model = torch.nn.ModuleDict({"used": torch.nn.Linear(4, 4), "spare": torch.nn.Linear(4, 4)})
    params = {"used.weight": model["used"].weight, "spare.weight": model["spare"].weight}
    sparse = SparseParameters(params, {n: torch.tensor([0, 5]) for n in params})
    sparse.attach(model)
    with pytest.raises(PieceError) as refused:
        sparse.probe(lambda: model["used"](torch.ones(2, 4)).sum())
    sparse.detach()
    assert "out of the mask (--exclude when scoring)" in str(refused.value)


def test_eval_takes_its_own_length_options_with_an_adapter(tiny, tmp_path, cli, code_data):
    base = tiny("llama")
    adapter = lora(base, tmp_path / "lora")
    code, _, err = cli(
        "eval", base, adapter, "--data", code_data, "--general", code_data, "--max-length", "32"
    )
    assert code == 0, err


# ---------------------------------------------------------------- the cause, not a neighbour of it


def test_a_dtype_choice_is_named_as_the_cause(work, tmp_path, cli, code_data):
    base, delta = work
    for args in (
        ["eval", base, delta, "--data", code_data, "--general", code_data, "--dtype", "bfloat16"],
        ["export", delta, "--base", base, "-o", tmp_path / "adapter", "--dtype", "bfloat16"],
    ):
        line = assert_clean_failure(cli(*args, "-q"), "--dtype bfloat16")
        assert "not made from" not in line and "not the delta's base" not in line, line


def test_an_adapter_for_another_model_says_so(tiny, tmp_path, cli):
    """An adapter trained on a deeper model of the family: its extra layers' tensors are for a
    model this base is not, not a file that does not belong to its config."""
    base = tiny("llama")
    adapter = lora(base, tmp_path / "lora")
    tensors = load_file(adapter / "adapter_model.safetensors")
    for name in list(tensors):
        deeper = name.replace("layers.0.", "layers.7.")
        if deeper != name:
            tensors[deeper] = tensors[name].clone()
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "d"
    line = assert_clean_failure(cli("import", adapter, "--base", base, "-o", out, "-q"), output=out)
    assert "another model" in line and "layers.7" in line and "does not belong" not in line, line


def test_an_unknown_peft_type_is_named(tiny, tmp_path, cli):
    base = tiny("llama")
    adapter = lora(base, tmp_path / "lora")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["peft_type"] = "FOOBAR"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "d"
    line = assert_clean_failure(cli("import", adapter, "--base", base, "-o", out, "-q"), "FOOBAR", output=out)
    assert "peft_type" in line and "LORA" in line, line


@pytest.mark.parametrize("make", ["fifo", "device"])
def test_a_fifo_or_a_device_is_not_found_nowhere(work, tmp_path, cli, code_data, make):
    base, delta = work
    path = tmp_path / "odd"
    if make == "fifo":
        os.mkfifo(path)
    else:
        os.symlink("/dev/null", path)
    said = "a FIFO" if make == "fifo" else "a device"
    for args in (
        ["apply", "--recipe", path],
        ["apply", base, path, "-o", tmp_path / "out"],
        ["inspect", path],
        ["push", path, "user/name"],
        ["score", base, "--data", path, "-o", tmp_path / "m.safetensors"],
        ["train", base, "--data", code_data, "--mask", path, "-o", tmp_path / "out"],
    ):
        line = assert_clean_failure(cli(*args, "-q"), said)
        assert "not found" not in line, line


@pytest.mark.parametrize(
    "option", ["--general", "--data", "--eval-data", "--eval-general", "--mask", "-o", "--retain"]
)
def test_an_empty_value_is_named_not_read_as_the_current_folder(work, tmp_path, cli, code_data, option):
    base, delta = work
    command = (
        ["eval", base, delta, "--data", code_data]
        if option == "--general"
        else ["train", base, "--data", code_data, "-o", tmp_path / "out"]
    )
    line = assert_clean_failure(cli(*command, option, "", "-q"), f"{option} is empty")
    assert "'.'" not in line
    assert_clean_failure(cli(*command, f"{option}=", "-q"), f"{option} is empty")


def test_a_recipe_folder_is_named_a_folder(tmp_path, cli):
    line = assert_clean_failure(cli("apply", "--recipe", tmp_path), "is a folder")
    assert "not found" not in line


def test_measure_more_often_only_where_it_is_possible(tiny, tmp_path, cli, code_data):
    """A budget the first measurement passes: "measure more often" only where steps go
    unmeasured (a measured budget with --eval-every above 1)."""
    base = tiny("llama")
    args = ["train", base, "--data", code_data, "--batch-size", "1", "--max-steps", "3", "--lr", "1e-2"]
    budget = ["--drift-budget", "1e-12", "--eval-general", code_data]
    line = assert_clean_failure(cli(*args, *budget, "--eval-every", "1", "-o", tmp_path / "a", "-q"))
    assert "already passes" in line and "more often" not in line, line
    line = assert_clean_failure(cli(*args, *budget, "--eval-every", "2", "-o", tmp_path / "b", "-q"))
    assert "already passes" in line and "more often (--eval-every" in line, line


def test_a_dry_run_says_what_force_would_do(work, tiny, tmp_path, cli):
    _, delta = work
    other = tiny("llama", seed=5)
    code, out, err = cli("apply", other, delta, "-o", tmp_path / "x", "--dry-run", "--force")
    assert code == 0 and "warning:" in err, err
    warning = next(line for line in err.splitlines() if line.startswith("warning:"))
    assert "would" in warning and "applied with --force" not in warning, warning


def test_a_base_digest_that_is_not_hex_is_named(tiny, tmp_path, cli, code_data):
    base = tiny("llama")
    delta = tmp_path / "delta"
    args = ["train", base, "--data", code_data, "-o", delta, "--max-steps", "1", "--compact", "-q"]
    assert cli(*args)[0] == 0
    description = json.loads((delta / "delta.json").read_text())
    name = next(iter(description["tensors"]))
    description["tensors"][name]["base_sha256"] = "Z" * 64
    (delta / "delta.json").write_text(json.dumps(description))
    before = snapshot(delta)
    for command in (["apply", base, delta, "-o", tmp_path / "out"], ["inspect", delta]):
        assert_clean_failure(cli(*command, "-q"), "base_sha256", unchanged=(before, [delta]))
    shutil.rmtree(delta)


def test_apply_from_a_recipe_advises_its_keys_not_flags(work, tiny, tmp_path, cli):
    """`apply --recipe` refuses every flag the recipe could hold: its advice names recipe keys."""
    base, delta = work
    other = tiny("llama", seed=5)
    tuned = perturb(base, tmp_path / "tuned2", fraction=0.02, seed=2, hard=False)
    compact = tmp_path / "compact"
    assert cli("diff", base, tuned, "-o", compact, "--compact", "-q")[0] == 0
    cases = {
        f"base: {other}\ndeltas: [{delta}]\noutput: out\n": "force: true",
        f"base: {other}\ndeltas: [{compact}]\noutput: out\n": "original_base",
        f"base: {base}\ndeltas: [{delta}, {delta}]\noutput: out\n": "allow_duplicates: true",
        f"base: {base}\ndeltas: [{delta}]\noutput: out\nshard_size: 0\n": "shard_size",
    }
    for i, (text, key) in enumerate(cases.items()):
        recipe = tmp_path / f"r{i}.yaml"
        recipe.write_text(text)
        line = assert_clean_failure(cli("apply", "--recipe", recipe, "-q"), key, output=tmp_path / "out")
        flags = ("--force", "--original-base", "--allow-duplicates", "--shard-size", "--scale")
        assert not any(flag in line for flag in flags), line
        line = assert_clean_failure(cli("apply", "--recipe", recipe, "--dry-run", "-q"), key)
