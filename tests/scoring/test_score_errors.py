"""Every bad input to `score` gets a one-line error, exit code 2, no traceback and no output file."""

import shutil

import pytest
import torch
from helpers import assert_clean_failure
from safetensors.torch import load_file, save_file


@pytest.fixture
def out(tmp_path):
    return tmp_path / "mask.safetensors"


def test_missing_checkpoint(cli, code_data, out, tmp_path):
    assert_clean_failure(
        cli("score", tmp_path / "nope", "--data", code_data, "-o", out), "not found", output=out
    )


def test_folder_without_weights(cli, code_data, out, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_failure(
        cli("score", empty, "--data", code_data, "-o", out), "no model.safetensors", output=out
    )


def test_corrupt_checkpoint(cli, tiny, code_data, out, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny("llama"), broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    assert_clean_failure(cli("score", broken, "--data", code_data, "-o", out), "corrupt", output=out)


def test_empty_data(cli, tiny, out, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert_clean_failure(cli("score", tiny("llama"), "--data", empty, "-o", out), "no examples", output=out)


def test_no_loss_bearing_token(cli, tiny, out, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a long prompt that fills everything", "response": "x"}\n')
    result = cli("score", tiny("llama"), "--data", data, "-o", out, "--max-length", "3")
    assert_clean_failure(result, "loss-bearing", output=out)


def test_unknown_method(cli, tiny, code_data, out):
    result = cli("score", tiny("llama"), "--data", code_data, "-o", out, "--method", "fisher")
    assert_clean_failure(result, "unknown method", output=out)


@pytest.mark.parametrize("density", ["0", "1.5", "-0.1"])
def test_density_out_of_range(cli, tiny, code_data, out, density):
    result = cli("score", tiny("llama"), "--data", code_data, "-o", out, f"--density={density}")
    assert_clean_failure(result, "outside (0, 1]", output=out)


def test_exclude_everything(cli, tiny, code_data, out):
    result = cli("score", tiny("llama"), "--data", code_data, "-o", out, "--exclude", ".")
    assert_clean_failure(result, "nothing to score", output=out)


def test_nan_loss(cli, tiny, code_data, out, tmp_path):
    broken = tmp_path / "nan"
    shutil.copytree(tiny("llama"), broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    result = cli("score", broken, "--data", code_data, "-o", out, "--method", "piece-s")
    assert_clean_failure(result, "loss is nan", output=out)
    result = cli("score", broken, "--data", code_data, "-o", out)  # piece-r on the shipped set
    assert_clean_failure(result, "loss is nan", output=out)
    result = cli("score", broken, "--data", code_data, "-o", out, "--retain", "self")  # writes first
    assert_clean_failure(result, "probabilities are nan or inf", output=out)


def test_existing_output_needs_overwrite(cli, tiny, code_data, out):
    out.write_bytes(b"keep me")
    code, _, stderr = cli("score", tiny("llama"), "--data", code_data, "-o", out)
    assert code == 2 and "--overwrite" in stderr and out.read_bytes() == b"keep me"
    code, _, _ = cli("score", tiny("llama"), "--data", code_data, "-o", out, "--overwrite", "-q")
    assert code == 0 and out.read_bytes() != b"keep me"


def test_inputs_are_not_modified(cli, tiny, code_data, out):
    folder = tiny("llama")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    data_before = code_data.read_bytes()
    assert cli("score", folder, "--data", code_data, "-o", out, "-q")[0] == 0
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert code_data.read_bytes() == data_before


def test_pickle_only_checkpoint_is_refused(cli, code_data, out, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    result = cli("score", folder, "--data", code_data, "-o", out)
    assert_clean_failure(result, "pickle", output=out)


def test_version_and_help(cli):
    code, stdout, _ = cli("--version")
    assert code == 0 and stdout.strip() == "piece-surgery 0.1.0"
    code, stdout, _ = cli("--help")
    assert code == 0 and all(c in stdout for c in ("score", "train", "diff", "apply", "push", "inspect"))
