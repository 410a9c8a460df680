"""Deltas to and from PEFT: a SHiRA adapter stock PEFT loads, and adapters merged back into deltas."""

import json

import pytest
import torch
from helpers import assert_clean_failure, read_all

peft = pytest.importorskip("peft")


@pytest.fixture
def trained(tiny, code_data, tmp_path, cli):
    """A delta on a magnitude mask: linear entries and norm gains."""

    def make(dtype=torch.float32):
        base = tiny("llama", dtype=dtype)
        mask = tmp_path / f"mask-{dtype}.safetensors"
        assert cli("score", base, "-o", mask, "--method", "magnitude", "--density", "0.02", "-q")[0] == 0
        delta = tmp_path / f"delta-{dtype}"
        assert (
            cli(
                "train",
                base,
                "--data",
                code_data,
                "--mask",
                mask,
                "-o",
                delta,
                "--lr",
                "1e-2",
                "--max-steps",
                "3",
                "-q",
            )[0]
            == 0
        )
        return base, delta

    return make


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_loads_the_export_and_gives_the_merged_outputs(trained, tmp_path, cli, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, delta = trained(dtype)
    code, stdout, err = cli("export", delta, "--base", base, "-o", tmp_path / "adapter", "--json", "-q")
    assert code == 0, err
    report = json.loads(stdout)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SHIRA" and report["saved_modules"] == config["modules_to_save"]
    assert any("norm" in m for m in config["modules_to_save"])  # norm gains travel whole
    assert cli("apply", base, delta, "-o", tmp_path / "merged", "-q")[0] == 0
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=dtype), tmp_path / "adapter"
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=dtype)
    ids = torch.tensor([[1, 5, 9, 30, 100, 7, 8, 11]])
    with torch.no_grad():
        a, b = adapted(ids).logits, merged(ids).logits
    # the stated tolerance (docs/interop.md): equal up to the dtype's rounding of base + change
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 0.0}[dtype]
    assert float((a - b).abs().max()) <= tolerance * float(b.abs().max())
    weights = read_all(tmp_path / "merged")
    folded = adapted.merge_and_unload().state_dict()
    for name, w in weights.items():
        assert torch.allclose(
            folded[name].float(), w.float(), rtol=2e-7 if dtype == torch.float32 else 0, atol=0
        ), name


@pytest.mark.smoke
def test_an_exported_delta_imports_back_exactly(trained, tmp_path, cli):
    from piece_surgery.formats.delta_folder import load_delta

    base, delta = trained(torch.bfloat16)
    assert cli("export", delta, "--base", base, "-o", tmp_path / "adapter", "-q")[0] == 0
    code, _, err = cli("import", tmp_path / "adapter", "--base", base, "-o", tmp_path / "back", "-q")
    assert code == 0, err
    a, b = load_delta(delta), load_delta(tmp_path / "back")
    assert a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        assert torch.equal(a.tensors[name].indices, b.tensors[name].indices), name
        assert torch.equal(a.tensors[name].tuned, b.tensors[name].tuned), name


@pytest.mark.smoke
def test_a_lora_adapter_imports_as_the_change_its_merge_makes(tiny, tmp_path, cli):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from piece_surgery.formats.delta_folder import load_delta

    base = tiny("llama")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / "lora")
    code, _, err = cli("import", tmp_path / "lora", "--base", base, "-o", tmp_path / "d", "-q")
    assert code == 0, err
    merged = model.merge_and_unload().state_dict()
    original = read_all(base)
    delta = load_delta(tmp_path / "d")
    assert sorted(delta.tensors) == sorted(n for n in original if "q_proj" in n)
    for name, t in delta.tensors.items():
        assert torch.equal(t.tuned, merged[name].view(-1)[t.indices])
        assert t.indices.numel() == int((merged[name] != original[name]).sum())


def test_export_refuses_what_shira_cannot_hold(tiny, code_data, tmp_path, cli):
    base = tiny("qwen2")  # its lm_head is the embedding: one weight, two modules
    mask = tmp_path / "m.safetensors"
    assert (
        cli(
            "score",
            base,
            "-o",
            mask,
            "--method",
            "random",
            "--density",
            "0.5",
            "--include",
            "embed|bias",
            "-q",
        )[0]
        == 0
    )
    assert (
        cli(
            "train",
            base,
            "--data",
            code_data,
            "--mask",
            mask,
            "-o",
            tmp_path / "d",
            "--lr",
            "1e-2",
            "--max-steps",
            "1",
            "-q",
        )[0]
        == 0
    )
    result = cli("export", tmp_path / "d", "--base", base, "-o", tmp_path / "adapter")
    # every kind it cannot hold named at once, by the patterns that leave them out
    line = assert_clean_failure(result, "a SHiRA adapter cannot hold (first: '", output=tmp_path / "adapter")
    assert "(--exclude embed --exclude bias, and no --include naming them)" in line  # the default restated


def test_export_and_import_errors(trained, tmp_path, cli, tiny):
    base, delta = trained()
    assert_clean_failure(
        cli("export", delta, "-o", tmp_path / "a"), "name it with --base", output=tmp_path / "a"
    )
    assert_clean_failure(
        cli("export", delta, "--base", base, "-o", tmp_path / "a", "--to", "gguf"), "unknown --to"
    )
    other = tiny("llama", seed=5)
    assert_clean_failure(cli("export", delta, "--base", other, "-o", tmp_path / "a"), "not the delta's base")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "adapter_config.json").write_text("{}")
    (tmp_path / "fake" / "adapter_model.bin").write_bytes(b"\x80pickle")
    assert_clean_failure(
        cli("import", tmp_path / "fake", "--base", base, "-o", tmp_path / "d"), "not read for safety"
    )
    # an adapter (or a checkpoint) where a delta is wanted: the message says how to make one of it
    assert cli("export", delta, "--base", base, "-o", tmp_path / "adapter", "-q")[0] == 0
    for command in (
        ("apply", base, tmp_path / "adapter", "-o", tmp_path / "m"),
        ("inspect", tmp_path / "adapter"),
    ):
        assert_clean_failure(
            cli(*command), f"make a delta of it with `piece-surgery import {tmp_path / 'adapter'}"
        )
    assert_clean_failure(
        cli("apply", base, base, "-o", tmp_path / "m"), "model checkpoint: `piece-surgery diff BASE"
    )


def test_a_busy_layer_is_saved_whole_rather_than_padding_every_other(tiny, tmp_path, cli):
    """One r for every SHiRA layer: a layer with a third of its entries changed would make every
    other layer pad to that size, so it travels whole in modules_to_save; the merge stays exact."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from piece_surgery.merging.shira import _SLOT_BYTES, cheapest_layout

    base = tiny("llama")
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    for f in base.iterdir():
        (tuned / f.name).write_bytes(f.read_bytes())
    weights = load_file(base / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    for name, w in weights.items():
        if name.endswith("proj.weight"):
            share = 0.3 if name == "model.layers.0.mlp.down_proj.weight" else 0.002
            chosen = torch.rand(w.numel(), generator=gen) < share
            w.view(-1)[chosen] += 0.01
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})
    delta = tmp_path / "delta"
    assert cli("diff", base, tuned, "-o", delta, "-q")[0] == 0
    code, stdout, err = cli("export", delta, "--base", base, "-o", tmp_path / "adapter", "--json", "-q")
    assert code == 0, err
    report = json.loads(stdout)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.layers.0.mlp.down_proj"] == report["saved_modules"]
    assert "model.layers.0.mlp.down_proj" not in config["target_modules"]

    # the layout chosen is the cheapest of every r, by brute force over r and the layers that fit
    model = AutoModelForCausalLM.from_pretrained(base)
    counts = {n: int(c) for n, c in _changed_per_layer(base, tuned).items()}
    layers = {n: model.get_submodule(n) for n in counts}

    def size(r):
        total = 0
        for n, m in layers.items():
            slots = r * (m.in_features + m.out_features)
            fits = counts[n] <= slots <= m.in_features * m.out_features
            total += slots * _SLOT_BYTES if fits else m.weight.numel() * m.weight.element_size()
        return total

    r, whole = cheapest_layout(layers, counts)
    assert r == report["r"] and size(r) == min(size(x) for x in range(1, 200))
    assert whole == {"model.layers.0.mlp.down_proj"}

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    folded = adapted.merge_and_unload().state_dict()
    for name, w in load_file(tuned / "model.safetensors").items():
        assert torch.allclose(folded[name], w, rtol=2e-7, atol=0), name


def _changed_per_layer(base, tuned):
    from safetensors.torch import load_file

    a, b = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    return {k.removesuffix(".weight"): (a[k] != b[k]).sum() for k in a if (a[k] != b[k]).any()}
