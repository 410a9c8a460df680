"""A guard against upstream change: what must hold whatever the newest (or the oldest allowed)
releases of torch, transformers, safetensors, huggingface_hub and PEFT do.

The tests marked `smoke` are the subset CI also runs against the lowest versions pyproject.toml
allows (.ci/run): the pipeline end to end on two families, the exactness round trip, norm gains
trained."""

import importlib.util
import json

import pytest
import torch
from helpers import assert_clean_failure, read_all
from safetensors.torch import load_file

DATA = "\n".join(
    [
        '{"text": "def add(a, b):\\n    return a + b"}',
        '{"prompt": "Square a number.", "response": "def square(x):\\n    return x * x"}',
        '{"text": "import os\\nclass Model:\\n    pass"}',
        '{"text": "for i in range(10):\\n    print(i)"}',
    ]
)


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(DATA + "\n")
    return path


def _train(cli, base, data, mask, out, *extra):
    code, stdout, err = cli(
        "train",
        base,
        "--data",
        data,
        "--mask",
        mask,
        "-o",
        out,
        "--max-steps",
        "3",
        "--lr",
        "1e-2",
        "--json",
        "-q",
        *extra,
    )
    assert code == 0, err
    return json.loads(stdout)


@pytest.mark.smoke
@pytest.mark.parametrize("include", ["norm", "norm|proj|fc|attn"])  # norm gains only; gains among matrices
def test_norm_gains_train_the_same_values_with_hub_kernels_on_and_off(
    tiny, data, tmp_path, cli, monkeypatch, include
):
    """transformers >= 5.25 with `kernels` installed re-kernelizes RMSNorm layers on every
    train()/eval(), replacing their forwards: the trained values must not depend on it."""
    base = tiny("llama")
    mask = tmp_path / "m.safetensors"
    code, _, err = cli(
        "score", base, "--data", data, "-o", mask, "--include", include, "--density", "0.2", "-q"
    )
    assert code == 0, err
    norm_entries = sum(v.numel() for k, v in load_file(mask).items() if "norm" in k)
    assert norm_entries > 0
    deltas = {}
    for setting in ("YES", "NO"):
        monkeypatch.setenv("USE_HUB_KERNELS", setting)
        report = _train(cli, base, data, mask, tmp_path / f"d-{setting}")
        assert report["entries"] == report["mask_entries"], report  # every entry learned something
        deltas[setting] = (tmp_path / f"d-{setting}" / "delta.safetensors").read_bytes()
    assert deltas["YES"] == deltas["NO"]


def test_a_kernelized_model_trains_its_norm_gains(tiny):
    """With `kernels` installed (transformers 5.25 brings it), loading turns hub kernels on, and
    every train()/eval() kernelizes again: it takes any forward set on a norm's instance away
    (what broke the patched forwards). The hooks that train the gains stay."""
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("the kernels package is not installed")
    import types

    from transformers import AutoModelForCausalLM

    from piece_surgery.training.sparse_grad import SparseParameters

    model = AutoModelForCausalLM.from_pretrained(tiny("llama"))
    if not getattr(model, "use_kernels", False):
        pytest.skip("this transformers does not turn hub kernels on at load")
    norm = model.model.layers[0].input_layernorm
    norm.forward = types.MethodType(type(norm).forward, norm)
    model.train()
    assert "forward" not in norm.__dict__  # the instance's forward is gone

    sparse = SparseParameters({"g": norm.weight}, {"g": torch.tensor([0, 3, 7])})
    sparse.attach(model)
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(0))
    for mode in (model.train, model.eval, model.train):
        mode()
        sparse.values["g"].grad = None
        model(input_ids=ids, labels=ids).loss.backward()
        assert sparse.values["g"].grad is not None and bool(sparse.values["g"].grad.abs().sum() > 0)
    sparse.detach()


@pytest.mark.smoke
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_pipeline_end_to_end_is_exact(tiny, data, tmp_path, cli, arch):
    """score -> train -> apply -> diff: the merged folder is base + delta bit for bit, and diffing
    it against the base gives the delta back."""
    base = tiny(arch)
    mask = tmp_path / "m.safetensors"
    assert cli("score", base, "--data", data, "-o", mask, "--density", "0.02", "-q")[0] == 0
    report = _train(cli, base, data, mask, tmp_path / "d")
    assert report["entries"] > 0 and report["final_train_loss"] < report["first_train_loss"]
    assert cli("apply", base, tmp_path / "d", "-o", tmp_path / "merged", "-q")[0] == 0
    assert cli("diff", base, tmp_path / "merged", "-o", tmp_path / "d2", "-q")[0] == 0
    a, b = load_file(tmp_path / "d" / "delta.safetensors"), load_file(tmp_path / "d2" / "delta.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before, after = read_all(base), read_all(tmp_path / "merged")
    changed = sum(int((before[k] != after[k]).sum()) for k in before)
    assert changed == report["entries"]


@pytest.mark.smoke
def test_mixture_of_experts_under_transformers_4_is_refused_in_one_line(tmp_path, cli, data, monkeypatch):
    """Experts are transformers 5's fused tensors, placed by its conversion mapping: under 4 (the
    floor pyproject.toml allows for dense models) an MoE checkpoint is refused before any work, by
    every command that reads one, and tiny-model writes none; a dense config is never taken for one."""
    from piece_surgery.models import loading
    from piece_surgery.models.tiny import MOE_ARCHITECTURES, TINY_CONFIGS, make_tiny_checkpoint, tiny_config

    monkeypatch.setattr(loading, "transformers_major", lambda: 5)  # to write one, whatever is installed
    moe = make_tiny_checkpoint(tmp_path / "moe", "qwen3_moe")
    monkeypatch.setattr(loading, "transformers_major", lambda: 4)
    needs = "mixture-of-experts checkpoints need transformers>=5.0: pip install -U transformers"
    for args, output in [
        (["score", moe, "--data", data, "-o", tmp_path / "m.safetensors"], tmp_path / "m.safetensors"),
        (["train", moe, "--data", data, "-o", tmp_path / "d"], tmp_path / "d"),
        (["diff", moe, moe, "-o", tmp_path / "d"], tmp_path / "d"),
        (["tiny-model", tmp_path / "t", "--arch", "mixtral"], tmp_path / "t"),
    ]:
        line = assert_clean_failure(cli(*args), needs, output=output)
        assert line.startswith(("error: qwen3_moe is a mixture-of-experts", "error: mixtral is a mixture"))
    assert all(loading.is_mixture_of_experts(tiny_config(arch)) for arch in MOE_ARCHITECTURES)
    assert not any(loading.is_mixture_of_experts(tiny_config(arch)) for arch in TINY_CONFIGS)
