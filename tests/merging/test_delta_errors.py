"""Bad input to diff/apply: one-line error, exit 2, nothing written, inputs untouched."""

import hashlib
import json
import shutil

import pytest
import torch
from helpers import assert_clean_failure, perturb, same_checkpoint, snapshot
from safetensors.torch import load_file, save_file

from piece_surgery.models.tiny import make_tiny_checkpoint


@pytest.fixture
def made(tiny, tmp_path):
    base = tiny("llama")
    tuned = perturb(base, tmp_path / "tuned", fraction=0.02)
    from piece_surgery.formats.delta_folder import save_delta
    from piece_surgery.merging.diff import diff

    save_delta(diff(str(base), str(tuned)), tmp_path / "delta")
    return base, tmp_path / "delta"


def rewrite_delta(folder, edit):
    """Edit delta.safetensors and re-seal its digest, so only the edit itself is wrong."""
    tensors = load_file(folder / "delta.safetensors")
    edit(tensors)
    save_file(tensors, folder / "delta.safetensors", metadata={"format": "piece-surgery/delta"})
    info = json.loads((folder / "delta.json").read_text())
    info["weights_sha256"] = hashlib.sha256((folder / "delta.safetensors").read_bytes()).hexdigest()
    (folder / "delta.json").write_text(json.dumps(info))


def test_base_that_is_not_the_deltas_base(cli, made, tiny, tmp_path):
    _, delta = made
    other = tiny("llama", seed=7)
    before = snapshot(other, delta)
    result = cli("apply", other, delta, "-o", tmp_path / "out")
    assert_clean_failure(
        result,
        "not made from this base: tensor '",
        output=tmp_path / "out",
        unchanged=(before, (other, delta)),
    )
    code, _, stderr = cli("apply", other, delta, "-o", tmp_path / "out", "--force", "-q")
    assert code == 0 and "warning:" in stderr and (tmp_path / "out").is_dir()


def test_delta_of_another_architecture(cli, made, tiny, tmp_path):
    _, delta = made
    gpt2 = tiny("gpt2")
    assert_clean_failure(
        cli("apply", gpt2, delta, "-o", tmp_path / "out"), "does not have", output=tmp_path / "out"
    )


def test_shape_mismatch(cli, made, tmp_path):
    _, delta = made
    wider = make_tiny_checkpoint(tmp_path / "wider", "llama", intermediate_size=48)
    assert_clean_failure(
        cli("apply", wider, delta, "-o", tmp_path / "out"), "has shape", output=tmp_path / "out"
    )


def test_dtype_mismatch(cli, made, tiny, tmp_path):
    _, delta = made
    bf16 = tiny("llama", dtype=torch.bfloat16)
    assert_clean_failure(
        cli("apply", bf16, delta, "-o", tmp_path / "out"), "float32 in the delta", output=tmp_path / "out"
    )


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (
            lambda t: t.__setitem__("lm_head.weight::indices", t["lm_head.weight::indices"] + 10**6),
            "out of range",
        ),
        (
            lambda t: t.__setitem__("lm_head.weight::indices", t["lm_head.weight::indices"].flip(0)),
            "not sorted",
        ),
        (
            lambda t: t["lm_head.weight::indices"].__setitem__(1, t["lm_head.weight::indices"][0]),
            "not sorted",
        ),
    ],
)
def test_bad_indices(cli, made, tmp_path, edit, fragment):
    base, delta = made
    rewrite_delta(delta, edit)
    assert_clean_failure(cli("apply", base, delta, "-o", tmp_path / "out"), fragment, output=tmp_path / "out")


def test_truncated_and_corrupt_files(cli, made, tmp_path):
    base, delta = made
    broken = tmp_path / "broken"
    shutil.copytree(delta, broken)
    data = (broken / "delta.safetensors").read_bytes()
    (broken / "delta.safetensors").write_bytes(data[: len(data) // 2])
    assert_clean_failure(
        cli("apply", base, broken, "-o", tmp_path / "out"), "corrupt or truncated", output=tmp_path / "out"
    )
    (broken / "delta.safetensors").write_bytes(data)
    (broken / "delta.json").write_text("{not json")
    assert_clean_failure(
        cli("apply", base, broken, "-o", tmp_path / "out"), "not valid JSON", output=tmp_path / "out"
    )


@pytest.mark.parametrize("dropped", ["one", "all"])
def test_a_description_that_leaves_out_stored_tensors_is_refused(cli, made, tmp_path, dropped):
    """delta.json hand-edited to list fewer tensors than delta.safetensors holds (its digest still
    matches the file): apply left the unlisted tensors out, silently (all of them: a merge that
    changed nothing), and inspect counted what was left."""
    base, delta = made
    info = json.loads((delta / "delta.json").read_text())
    names = sorted(info["tensors"])
    assert len(names) > 1
    info["tensors"] = {} if dropped == "all" else {n: info["tensors"][n] for n in names[1:]}
    (delta / "delta.json").write_text(json.dumps(info))
    before = snapshot(base, delta)
    out = tmp_path / "out"
    line = assert_clean_failure(cli("apply", base, delta, "-o", out), "delta.json does not list", output=out)
    assert names[0] in line
    assert_clean_failure(cli("inspect", delta), "delta.json does not list")
    assert snapshot(base, delta) == before


def test_output_equal_to_base(cli, made, tmp_path):
    base, delta = made
    before = snapshot(base)
    code, _, stderr = cli("apply", base, delta, "-o", base, "--overwrite")
    assert code == 2 and "overlaps input" in stderr and snapshot(base) == before


def test_existing_output(cli, made, tmp_path):
    base, delta = made
    (tmp_path / "out").mkdir()
    code, _, stderr = cli("apply", base, delta, "-o", tmp_path / "out")
    assert code == 2 and "--overwrite" in stderr
    assert cli("apply", base, delta, "-o", tmp_path / "out", "--overwrite", "-q")[0] == 0
    assert same_checkpoint(tmp_path / "out", tmp_path / "tuned")


def test_diff_of_different_architectures(cli, tiny, tmp_path):
    result = cli("diff", tiny("llama"), tiny("gpt2"), "-o", tmp_path / "out")
    assert_clean_failure(result, "not in the tuned checkpoint", output=tmp_path / "out")


def test_diff_of_identical_checkpoints(cli, tiny, tmp_path):
    result = cli("diff", tiny("llama"), tiny("llama"), "-o", tmp_path / "out")
    assert_clean_failure(result, "identical", output=tmp_path / "out")


def test_scale_count_mismatch(cli, made, tmp_path):
    base, delta = made
    result = cli("apply", base, delta, delta, delta, "-o", tmp_path / "out", "--scale", "1", "--scale", "2")
    assert_clean_failure(result, "--scale values", output=tmp_path / "out")
