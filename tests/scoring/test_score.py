import json

import pytest
import torch
from helpers import as_lists, brute_force_scores, brute_force_top_k
from safetensors import safe_open

from piece_surgery.formats.mask import load_mask, select_top_k
from piece_surgery.recipes.score import score_checkpoint
from piece_surgery.runtime.options import RunOptions
from piece_surgery.scoring.options import ScoreOptions


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["piece-s", "piece-f", "gradient", "piece-s-rel"])
def test_estimators_match_brute_force(tiny, code_data, arch, method):
    folder = tiny(arch)
    mask, stats, _ = score_checkpoint(
        str(folder), code_data, ScoreOptions(method=method, density=0.01), run=RunOptions(device="cpu")
    )
    expected_scores = brute_force_scores(folder, code_data, method, batch_size=1)
    k = int(0.01 * sum(s.numel() for s in expected_scores.values()))
    assert mask.k == k
    assert as_lists(mask.indices) == brute_force_top_k(expected_scores, k)
    assert stats.batches == 5


def test_micro_batch_defines_the_gradient(tiny, code_data):
    folder = tiny("llama")
    options = ScoreOptions(method="piece-f", density=0.01, batch_size=2)
    mask, stats, _ = score_checkpoint(str(folder), code_data, options, run=RunOptions(device="cpu"))
    expected = brute_force_scores(folder, code_data, "piece-f", batch_size=2)
    assert stats.batches == 3
    assert as_lists(mask.indices) == brute_force_top_k(expected, mask.k)
    single, _, _ = score_checkpoint(
        str(folder), code_data, ScoreOptions("piece-f", 0.01), run=RunOptions(device="cpu")
    )
    assert as_lists(single.indices) != as_lists(mask.indices)


def test_magnitude_selects_largest_weights(tiny):
    folder = tiny("llama")
    mask, _, _ = score_checkpoint(
        str(folder), None, ScoreOptions(method="magnitude", density=0.02), run=RunOptions(device="cpu")
    )
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        weights = {n: f.get_tensor(n).abs() for n in f.keys() if "embed" not in n}
    assert as_lists(mask.indices) == brute_force_top_k(weights, mask.k)


def test_random_is_seeded(tiny):
    folder = str(tiny("llama"))
    a, _, _ = score_checkpoint(
        folder, None, ScoreOptions(method="random", seed=1, density=0.01), run=RunOptions(device="cpu")
    )
    b, _, _ = score_checkpoint(
        folder, None, ScoreOptions(method="random", seed=1, density=0.01), run=RunOptions(device="cpu")
    )
    c, _, _ = score_checkpoint(
        folder, None, ScoreOptions(method="random", seed=2, density=0.01), run=RunOptions(device="cpu")
    )
    assert as_lists(a.indices) == as_lists(b.indices)
    assert as_lists(a.indices) != as_lists(c.indices)
    assert a.k == c.k == int(0.01 * a.eligible)


def test_select_top_k_matches_sorting_with_ties():
    gen = torch.Generator().manual_seed(0)
    scores = {
        "b": torch.randint(0, 5, (7, 9), generator=gen).float() / 4,
        "a": torch.randint(0, 5, (13,), generator=gen).float() / 4,
        "c": torch.zeros(4, 4),
    }
    for k in (1, 5, 17, 40, 80, 92):
        assert as_lists(select_top_k(scores, k)) == brute_force_top_k(scores, k)


def test_select_top_k_handles_tiny_and_huge_values():
    scores = {"x": torch.tensor([1e-40, 0.0, 3e38, float("inf"), 1e-30, 2.0])}
    assert select_top_k(scores, 3)["x"].tolist() == [2, 3, 5]
    assert select_top_k(scores, 5)["x"].tolist() == [0, 2, 3, 4, 5]


def test_embeddings_excluded_by_default_and_include_exclude(tiny):
    llama, gpt2 = str(tiny("llama")), str(tiny("gpt2"))
    mask, _, _ = score_checkpoint(
        llama, None, ScoreOptions(method="magnitude", density=0.5), run=RunOptions(device="cpu")
    )
    assert not any("embed" in n for n in mask.shapes)
    assert "lm_head.weight" in mask.shapes
    gmask, _, _ = score_checkpoint(
        gpt2, None, ScoreOptions(method="magnitude", density=0.5), run=RunOptions(device="cpu")
    )
    # GPT-2 names its tables wte/wpe; they are excluded as embeddings, and lm_head is tied to wte
    assert not any(n.endswith(("wte.weight", "wpe.weight")) for n in gmask.shapes)
    only_mlp, _, _ = score_checkpoint(
        llama,
        None,
        ScoreOptions(method="magnitude", density=0.1, include=[r"\.mlp\."]),
        run=RunOptions(device="cpu"),
    )
    assert only_mlp.shapes and all(".mlp." in n for n in only_mlp.shapes)
    no_norm, _, _ = score_checkpoint(
        llama,
        None,
        ScoreOptions(method="magnitude", density=0.1, exclude=["embed", "norm"]),
        run=RunOptions(device="cpu"),
    )
    assert not any("norm" in n for n in no_norm.shapes)


def test_sharded_checkpoint_gives_the_same_mask(tiny, code_data):
    single = tiny("llama")
    sharded = tiny("llama", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    options = ScoreOptions(method="piece-s", density=0.01)
    a, _, _ = score_checkpoint(str(single), code_data, options, run=RunOptions(device="cpu"))
    b, _, _ = score_checkpoint(str(sharded), code_data, options, run=RunOptions(device="cpu"))
    assert as_lists(a.indices) == as_lists(b.indices)


def test_gradient_checkpointing_recomputes_layers_and_gives_the_same_mask(tiny, code_data, monkeypatch):
    from transformers.models.llama import modeling_llama

    calls = []
    real_forward = modeling_llama.LlamaMLP.forward  # inside each layer (the layer's own is wrapped)

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counted)
    folder = tiny("llama")
    plain, _, _ = score_checkpoint(
        str(folder), code_data, ScoreOptions(method="piece-s", density=0.01), run=RunOptions(device="cpu")
    )
    plain_calls = len(calls)
    options = ScoreOptions(method="piece-s", density=0.01, gradient_checkpointing=True)
    checkpointed, _, _ = score_checkpoint(str(folder), code_data, options, run=RunOptions(device="cpu"))
    assert len(calls) - plain_calls == 2 * plain_calls  # each layer ran again in backward
    assert as_lists(plain.indices) == as_lists(checkpointed.indices)


def test_score_cli_writes_documented_mask(tiny, code_data, tmp_path, cli):
    out = tmp_path / "mask.safetensors"
    code, stdout, _ = cli(
        "score", tiny("llama"), "--data", code_data, "-o", out, "--density", "0.01", "--json", "--quiet"
    )
    assert code == 0
    result = json.loads(stdout)
    mask = load_mask(out)
    assert result["entries"] == mask.k == int(0.01 * mask.eligible)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        names = [n for n in f.keys() if "::" not in n]
        for name in names:
            idx = f.get_tensor(name)
            assert idx.dtype == torch.int32 and bool((idx[1:] > idx[:-1]).all())
            fisher = f.get_tensor(f"{name}::fisher")  # the default, piece-r, carries the retain Fisher
            assert fisher.dtype == torch.float32 and fisher.shape == idx.shape and bool((fisher >= 0).all())
        assert sorted(f.keys()) == sorted([*names, *(f"{n}::fisher" for n in names)])
    assert meta["format"] == "piece-surgery/mask" and meta["format_version"] == "1"
    for key in ("method", "density", "k", "eligible", "shapes", "model", "data", "seed", "tool_version"):
        json.loads(meta[key])
    assert json.loads(meta["data"])["examples"] == 5
    assert len(json.loads(meta["model"])["fingerprint"]) == 64
    code, stdout, _ = cli("inspect", out, "--json")
    assert code == 0 and json.loads(stdout)["entries"] == mask.k


def test_per_tensor_normalisation_ranks_relative_scores(tiny, code_data):
    folder = tiny("llama")
    options = ScoreOptions(method="piece-f", density=0.02, normalize="tensor")
    mask, _, _ = score_checkpoint(str(folder), code_data, options, run=RunOptions(device="cpu"))
    raw = brute_force_scores(folder, code_data, "piece-f", batch_size=1)
    relative = {n: s / s.double().mean().float() for n, s in raw.items()}
    assert as_lists(mask.indices) == brute_force_top_k(relative, mask.k)
    plain, _, _ = score_checkpoint(
        str(folder), code_data, ScoreOptions("piece-f", 0.02), run=RunOptions(device="cpu")
    )
    assert as_lists(plain.indices) != as_lists(mask.indices)


def test_offloaded_accumulators_give_the_same_mask(tiny, code_data):
    """--offload-accumulators keeps the sums in host memory (on CPU: the same device); same result."""
    folder = tiny("llama")
    options = ScoreOptions(method="piece-s", density=0.01, offload_accumulators=True)
    offloaded, _, _ = score_checkpoint(str(folder), code_data, options, run=RunOptions(device="cpu"))
    expected = brute_force_scores(folder, code_data, "piece-s", batch_size=1)
    assert as_lists(offloaded.indices) == brute_force_top_k(expected, offloaded.k)
