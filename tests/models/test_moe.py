"""Mixture-of-experts checkpoints (issue 33), in both layouts: experts stored one tensor per expert
(the Hub layout, what transformers 5 writes; loaded fused) and stored fused, for every tiny MoE
family: score -> train -> apply is the model trained in memory bit for bit, in the stored tensors'
coordinates; diff gives the delta back, across layouts too; eval and inspect; a PEFT LoRA on the
experts imports to PEFT's own merge; export refuses what SHiRA cannot hold.
"""

import json
import shutil
import warnings

import pytest
import torch
from helpers import assert_clean_failure, bitwise_equal, read_all
from safetensors.torch import load_file, save_file

from piece_surgery.data.examples import IGNORE
from piece_surgery.formats.delta_folder import load_delta
from piece_surgery.formats.mask import load_mask
from piece_surgery.models.checkpoint import open_checkpoint
from piece_surgery.models.eligible import eligible_parameters
from piece_surgery.models.fused import ParameterSlice, fused_slices
from piece_surgery.models.loading import transformers_major
from piece_surgery.models.naming import expert_entries
from piece_surgery.models.tiny import MOE_ARCHITECTURES, make_tiny_checkpoint
from piece_surgery.scoring.importance import accumulate_gradients
from piece_surgery.training.config import TrainConfig
from piece_surgery.training.loop import train_sparse
from piece_surgery.training.sparse_grad import SparseParameters

# experts are transformers 5's fused tensors, placed by its conversion mapping: under 4 an MoE
# checkpoint is refused in one line (tests/test_upstream.py checks that)
pytestmark = pytest.mark.skipif(transformers_major() < 5, reason="mixture-of-experts needs transformers>=5")

# every family in both layouts; gpt-oss stores its experts fused on the Hub and has no other layout
CASES = [(a, layout) for a in MOE_ARCHITECTURES if a != "gpt_oss" for layout in ("per-expert", "fused")]
CASES.append(("gpt_oss", "fused"))
IDS = [f"{a}-{layout}" for a, layout in CASES]
TRAIN = ["--lr", "1e-2", "--max-steps", "3", "--batch-size", "2", "-q"]
EXPERTS = ["--method", "piece-s", "--density", "0.05", "--include", r"\.experts\."]


@pytest.fixture(scope="session")
def moe(tmp_path_factory):
    """moe(arch, layout) -> a tiny MoE checkpoint folder (built once per session)."""
    cache = {}

    def build(arch, layout, dtype=torch.float32):
        if (arch, layout, dtype) not in cache:
            folder = tmp_path_factory.mktemp(f"{arch}-{layout}")
            cache[arch, layout, dtype] = make_tiny_checkpoint(folder, arch, experts=layout, dtype=dtype)
        return cache[arch, layout, dtype]

    return build


def expert_tensors(names) -> list[str]:
    return [n for n in names if expert_entries(n, torch.empty(0, dtype=torch.long), (2, 2, 2)) is not None]


BF16 = [("mixtral", "per-expert", torch.bfloat16), ("mixtral", "fused", torch.bfloat16)]


@pytest.mark.parametrize(
    ("arch", "layout", "dtype"),
    [(a, layout, torch.float32) for a, layout in CASES] + BF16,
    ids=IDS + [f"{a}-{layout}-bf16" for a, layout, _ in BF16],
)
def test_score_train_apply_is_the_model_trained_in_memory(moe, code_data, tmp_path, cli, arch, layout, dtype):
    base = moe(arch, layout, dtype)
    mask_path = tmp_path / "m.safetensors"
    assert cli("score", base, "--data", code_data, "-o", mask_path, *EXPERTS, "-q")[0] == 0
    mask = load_mask(mask_path)
    layout_names = set(open_checkpoint(base).layout)
    assert set(mask.indices) <= layout_names  # stored coordinates: the files' own names and shapes
    assert set(expert_tensors(mask.indices)) == set(mask.indices) and mask.k > 0
    code, _, err = cli("train", base, "--data", code_data, "--mask", mask_path, "-o", tmp_path / "d", *TRAIN)
    assert code == 0, err
    assert cli("apply", base, tmp_path / "d", "-o", tmp_path / "merged", "-q")[0] == 0

    checkpoint = open_checkpoint(base)  # the same run in memory
    loaded = checkpoint.load_model(device="cpu")
    assert bool(loaded.slices) == (layout == "per-expert")
    params = loaded.parameters(mask.indices)
    config = TrainConfig(lr=1e-2, max_steps=3, batch_size=2)
    train_sparse(loaded.module, params, mask.indices, checkpoint.load_data(code_data), config)
    merged = read_all(tmp_path / "merged")
    assert merged.keys() == layout_names
    held = loaded.parameters()
    assert set(mask.indices) <= set(held)
    for name in layout_names & set(held):  # every stored weight, as the model trained in memory holds it
        assert bitwise_equal(merged[name], held[name].detach()), name
    reloaded = open_checkpoint(tmp_path / "merged").load_model(device="cpu").module.state_dict()
    for name, value in loaded.module.state_dict().items():
        assert bitwise_equal(reloaded[name], value), name

    delta = load_delta(tmp_path / "d")
    assert cli("diff", base, tmp_path / "merged", "-o", tmp_path / "d2")[0] == 0
    again = load_delta(tmp_path / "d2")
    assert again.tensors.keys() == delta.tensors.keys()
    for name, t in delta.tensors.items():
        assert torch.equal(again.tensors[name].indices, t.indices)
        assert bitwise_equal(again.tensors[name].tuned, t.tuned)
    code, out, _ = cli("inspect", tmp_path / "d", "--json")
    by_expert = json.loads(out)["by_expert"]
    assert sum(v["entries"] for v in by_expert.values()) == delta.count
    code, out, err = cli(
        "eval", base, tmp_path / "d", "--data", code_data, "--general", code_data, "--json", "-q"
    )
    assert code == 0, err
    [candidate] = json.loads(out)["candidates"]
    assert candidate["changes_outputs"] and candidate["gain"] > 0


@pytest.mark.parametrize("arch", [a for a in MOE_ARCHITECTURES if a != "gpt_oss"])
def test_layouts_select_train_and_diff_alike(moe, code_data, tmp_path, cli, arch):
    """The same weights stored either way: the same mask (each layout in its own coordinates) and
    the same trained values; diff of a per-expert base against a fused tuned checkpoint (and back)
    gives each layout's delta, paired by where loading puts each expert."""
    per_expert, fused = moe(arch, "per-expert"), moe(arch, "fused")
    deltas = {}
    for layout, base in (("per-expert", per_expert), ("fused", fused)):
        out = tmp_path / layout
        code, _, err = cli("train", base, "--data", code_data, "-o", out, *EXPERTS, *TRAIN)
        assert code == 0, err
        assert cli("apply", base, out, "-o", tmp_path / f"{layout}-merged", "-q")[0] == 0
        deltas[layout] = load_delta(out)
    in_fused = _as_fused(deltas["per-expert"], per_expert)
    assert set(in_fused) == set(deltas["fused"].tensors)
    for name, (idx, tuned) in in_fused.items():
        assert torch.equal(idx, deltas["fused"].tensors[name].indices), name
        assert bitwise_equal(tuned, deltas["fused"].tensors[name].tuned), name
    for base, tuned, layout in ((per_expert, "fused", "per-expert"), (fused, "per-expert", "fused")):
        out = tmp_path / f"cross-{layout}"
        code, _, err = cli("diff", base, tmp_path / f"{tuned}-merged", "-o", out)
        assert code == 0, err
        cross, own = load_delta(out), deltas[layout]
        assert cross.tensors.keys() == own.tensors.keys()
        assert all(torch.equal(cross.tensors[n].indices, t.indices) for n, t in own.tensors.items())
    assert_clean_failure(cli("diff", per_expert, fused, "-o", tmp_path / "none"), "identical")


@pytest.mark.parametrize("normalize", ["none", "tensor"])
def test_a_mask_does_not_depend_on_how_the_files_store_the_experts(moe, code_data, tmp_path, cli, normalize):
    """The same weights, the same mask entries (each layout in its own coordinates): with
    --normalize tensor, experts stored one tensor each share their fused weight's mean."""
    masks = {}
    for layout in ("per-expert", "fused"):
        out = tmp_path / f"{layout}.safetensors"
        options = ["--method", "piece-s", "--density", "0.05", "--normalize", normalize, "-q"]
        options += ["--include", r"\.mlp\."]  # routers, experts, shared experts (or attention wins)
        assert cli("score", moe("qwen2_moe", layout), "--data", code_data, "-o", out, *options)[0] == 0
        masks[layout] = load_mask(out)
    per_expert = _indices_in_fused(masks["per-expert"].indices, moe("qwen2_moe", "per-expert"))
    assert per_expert.keys() == masks["fused"].indices.keys()
    assert all(torch.equal(per_expert[n], masks["fused"].indices[n]) for n in per_expert)
    assert any(".experts." in n for n in per_expert)
    by_expert = [
        json.loads(cli("inspect", tmp_path / f"{lay}.safetensors", "--json")[1])["by_expert"] for lay in masks
    ]
    assert by_expert[0] == by_expert[1] and set(by_expert[0]) == {"0", "1", "2", "3"}
    counted = sum(v["entries"] for v in by_expert[0].values())
    assert counted == sum(int(i.numel()) for n, i in masks["fused"].indices.items() if ".experts." in n)


def _indices_in_fused(indices: dict, per_expert_base) -> dict[str, torch.Tensor]:
    checkpoint = open_checkpoint(per_expert_base)
    slices = fused_slices(checkpoint.skeleton(), checkpoint.layout)
    out: dict[str, list] = {}
    for name, idx in indices.items():
        s = slices.get(name)
        out.setdefault(s.param if s else name, []).append(idx + (s.offset if s else 0))
    return {n: torch.cat(parts).sort().values for n, parts in out.items()}


def _as_fused(delta, per_expert_base) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A per-expert delta in the fused parameters' coordinates (each expert's offset: models.fused,
    itself checked by brute force in test_expert_slices_are_where_loading_puts_them)."""
    checkpoint = open_checkpoint(per_expert_base)
    slices = fused_slices(checkpoint.skeleton(), checkpoint.layout)
    out: dict[str, list] = {}
    for name, t in delta.tensors.items():
        s = slices.get(name)
        key, offset = (s.param, s.offset) if s else (name, 0)
        out.setdefault(key, []).append((t.indices + offset, t.tuned))
    merged = {}
    for key, parts in out.items():
        idx = torch.cat([p[0] for p in parts])
        order = idx.argsort()
        merged[key] = (idx[order], torch.cat([p[1] for p in parts])[order])
    return merged


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_expert_slices_are_where_loading_puts_them(moe, arch):
    """Brute force: each stored expert's place in its fused parameter (models.fused) holds that
    expert's stored tensor, and the places are the ones the model's own forward reads (expert e's
    gate rows first, then its up rows)."""
    base = moe(arch, "per-expert")
    checkpoint = open_checkpoint(base)
    loaded = checkpoint.load_model(device="cpu")
    stored = read_all(base)
    params = dict(loaded.module.named_parameters())
    for name, s in loaded.slices.items():
        fused = params[s.param].detach()
        expert = int(name.split(".experts.")[1].split(".")[0])
        rows = fused.shape[1] // 2
        if s.param.endswith("gate_up_proj"):
            up = any(w in name for w in ("up_proj", ".w3."))
            expected = fused[expert, rows:] if up else fused[expert, :rows]
        else:
            expected = fused[expert]
        assert torch.equal(expected, stored[name]), name


def test_routers_are_out_and_shared_experts_in_by_default(moe):
    """The default eligible set (README: mixture-of-experts models): routed experts (per expert,
    in stored names) and shared experts, never a router unless --include names it."""
    checkpoint = open_checkpoint(moe("qwen2_moe", "per-expert"))
    skeleton = checkpoint.skeleton()
    from piece_surgery.models.pairing import parameter_keys

    keys, slices = parameter_keys(skeleton, checkpoint.layout), fused_slices(skeleton, checkpoint.layout)
    chosen = eligible_parameters(skeleton, keys, slices=slices)
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in chosen
    assert isinstance(chosen["model.layers.0.mlp.experts.3.up_proj.weight"], ParameterSlice)
    assert "model.layers.0.mlp.shared_expert.down_proj.weight" in chosen
    assert "model.layers.0.mlp.shared_expert_gate.weight" in chosen  # a sigmoid gate, not a router
    assert "model.layers.0.mlp.gate.weight" not in chosen
    routers = eligible_parameters(skeleton, keys, slices=slices, include=[r"mlp\.gate\."])
    assert sorted(routers) == ["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"]
    gpt_oss = open_checkpoint(moe("gpt_oss", "fused"))
    skeleton = gpt_oss.skeleton()
    chosen = eligible_parameters(skeleton, parameter_keys(skeleton, gpt_oss.layout))
    assert not [n for n in chosen if ".router." in n] and "model.layers.0.mlp.experts.gate_up_proj" in chosen


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_accumulators_hold_four_bytes_per_eligible_entry_and_no_more(moe, code_data, layout):
    """Score's accumulators: one fp32 tensor per eligible stored tensor, each its own storage of
    exactly its entries (no dense copy of a fused parameter beside them), and their sums are the
    fused gradient's: brute force against autograd on the whole model."""
    checkpoint = open_checkpoint(moe("qwen3_moe", layout))
    loaded = checkpoint.load_model(device="cpu")
    params = eligible_parameters(loaded.module, loaded.keys, slices=loaded.slices)
    dataset = checkpoint.load_data(code_data)
    sums, squares, _ = accumulate_gradients(
        loaded.module, params, dataset, batch_size=8, pad_id=0, keep_sum=True, keep_squares=True
    )
    eligible = sum(p.numel() for p in params.values())
    for acc in (sums, squares):
        assert acc.keys() == params.keys()
        assert sum(t.numel() for t in acc.values()) == eligible
        assert all(t.untyped_storage().nbytes() == 4 * t.numel() for t in acc.values())
    model = loaded.module
    model.zero_grad()
    examples = dataset.examples
    length = max(len(e.input_ids) for e in examples)
    ids = torch.tensor([e.input_ids + [0] * (length - len(e.input_ids)) for e in examples])
    labels = torch.tensor([e.labels + [IGNORE] * (length - len(e.labels)) for e in examples])
    mask = torch.tensor([[1] * len(e.input_ids) + [0] * (length - len(e.input_ids)) for e in examples])
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )
    loss.backward()
    for name, p in params.items():
        param = p.parameter if isinstance(p, ParameterSlice) else p
        grad = p.stored.of(param.grad) if isinstance(p, ParameterSlice) else param.grad
        torch.testing.assert_close(sums[name], grad, rtol=1e-4, atol=1e-7)


def test_expert_values_get_their_own_gradients(moe, code_data):
    """Several stored experts in one fused weight: each one's values get exactly the fused
    parameter's gradient at their entries (brute force: autograd on the dense weight)."""
    checkpoint = open_checkpoint(moe("mixtral", "per-expert"))
    loaded = checkpoint.load_model(device="cpu")
    model = loaded.module
    names = [n for n in loaded.slices if ".experts.1." in n or ".experts.2." in n]
    gen = torch.Generator().manual_seed(0)
    indices = {n: torch.randperm(loaded.slices[n].numel, generator=gen)[:7].sort().values for n in names}
    dataset = checkpoint.load_data(code_data)
    batch = torch.tensor([dataset.examples[0].input_ids])
    sparse = SparseParameters(loaded.parameters(names), indices)
    sparse.attach(model)
    model(input_ids=batch, labels=batch).loss.backward()
    sparse.detach()
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad()
    model(input_ids=batch, labels=batch).loss.backward()
    params = dict(model.named_parameters())
    for name in names:
        s = loaded.slices[name]
        dense = s.of(params[s.param].grad).reshape(-1)[indices[name]]
        torch.testing.assert_close(sparse.values[name].grad, dense, rtol=1e-5, atol=1e-8)
        assert sparse.values[name].grad.abs().sum() > 0


def _lora_on_experts(base, out, arch):
    """A PEFT LoRA on the experts (target_parameters on the fused tensors) and on o_proj, with
    random B (init_lora_weights=False), saved to `out`; returns PEFT's own merged model."""
    import transformers
    from peft import LoraConfig, get_peft_model

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    config = LoraConfig(r=2, target_modules=["o_proj"], target_parameters=targets, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = get_peft_model(model, config)
        adapted.save_pretrained(out)
        return adapted.merge_and_unload()


@pytest.mark.parametrize(("arch", "layout"), CASES, ids=IDS)
def test_expert_lora_imports_as_peft_merges_it(moe, tmp_path, cli, arch, layout):
    base = moe(arch, layout)
    merged_by_peft = _lora_on_experts(base, tmp_path / "lora", arch)
    code, _, err = cli("import", tmp_path / "lora", "--base", base, "-o", tmp_path / "d", "-q")
    assert code == 0, err
    delta = load_delta(tmp_path / "d")
    assert expert_tensors(delta.tensors) and any("o_proj" in n for n in delta.tensors)
    assert cli("apply", base, tmp_path / "d", "-o", tmp_path / "merged", "-q")[0] == 0
    ours = open_checkpoint(tmp_path / "merged").load_model(device="cpu").module
    theirs = merged_by_peft.state_dict()
    for name, value in ours.state_dict().items():
        assert bitwise_equal(value, theirs[name]), name
    ids = torch.tensor([[1, 5, 9, 17, 33, 65]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, merged_by_peft(ids).logits, rtol=0, atol=1e-6)


def test_export_refuses_experts_and_round_trips_the_rest(moe, code_data, tmp_path, cli):
    base = moe("qwen3_moe", "per-expert")
    code, _, err = cli("train", base, "--data", code_data, "-o", tmp_path / "d", *EXPERTS, *TRAIN)
    assert code == 0, err
    msg = assert_clean_failure(
        cli("export", tmp_path / "d", "--base", base, "-o", tmp_path / "a"), output=tmp_path / "a"
    )
    assert "mlp.experts." in msg and "SHiRA" in msg
    code, _, err = cli(
        "train",
        base,
        "--data",
        code_data,
        "-o",
        tmp_path / "e",
        "--method",
        "piece-s",
        "--include",
        "self_attn",
        *TRAIN,
    )
    assert code == 0, err
    assert cli("export", tmp_path / "e", "--base", base, "-o", tmp_path / "b", "-q")[0] == 0
    assert cli("import", tmp_path / "b", "--base", base, "-o", tmp_path / "e2", "-q")[0] == 0
    a, b = load_delta(tmp_path / "e"), load_delta(tmp_path / "e2")
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[n].indices, b.tensors[n].indices) for n in a.tensors)


def _copy_without(base, out, drop: str):
    shutil.copytree(base, out)
    tensors = load_file(out / "model.safetensors")
    tensors = {n: t for n, t in tensors.items() if drop not in n}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_broken_per_expert_checkpoints_are_refused_in_one_line(moe, code_data, tmp_path, cli):
    base = moe("qwen3_moe", "per-expert")
    missing = _copy_without(base, tmp_path / "missing", "layers.1.mlp.experts.2.up_proj")
    msg = assert_clean_failure(cli("score", missing, "--data", code_data, "-o", tmp_path / "m.safetensors"))
    assert "model.layers.1.mlp.experts.gate_up_proj" in msg or "experts.2" in msg
    extra = tmp_path / "extra"
    shutil.copytree(base, extra)
    tensors = load_file(extra / "model.safetensors")
    tensors["model.layers.0.mlp.experts.4.up_proj.weight"] = torch.zeros(16, 32)
    save_file(tensors, extra / "model.safetensors", metadata={"format": "pt"})
    msg = assert_clean_failure(cli("train", extra, "--data", code_data, "-o", tmp_path / "d"))
    assert "model.layers.0.mlp.experts.4.up_proj.weight" in msg and "holds 4 experts" in msg
    msg = assert_clean_failure(cli("diff", base, missing, "-o", tmp_path / "d"))
    assert "'model.layers.1.mlp.experts.2.up_proj.weight' is in the base but not in the tuned" in msg
    msg = assert_clean_failure(cli("diff", moe("qwen3_moe", "fused"), missing, "-o", tmp_path / "d"))
    assert "lacks part of 'model.layers.1.mlp.experts.gate_up_proj'" in msg
    # the last expert's tensor of a fused parameter: the tuned tensors still start at 0 and touch
    last = _copy_without(base, tmp_path / "last", "layers.1.mlp.experts.3.up_proj")
    msg = assert_clean_failure(cli("diff", base, last, "-o", tmp_path / "d"))
    assert "'model.layers.1.mlp.experts.3.up_proj.weight' is in the base but not in the tuned" in msg
    msg = assert_clean_failure(cli("diff", moe("qwen3_moe", "fused"), last, "-o", tmp_path / "d"))
    assert "lacks part of 'model.layers.1.mlp.experts.gate_up_proj'" in msg
    msg = assert_clean_failure(cli("diff", base, extra, "-o", tmp_path / "d"))
    assert "model.layers.0.mlp.experts.4.up_proj.weight" in msg
    wrong = tmp_path / "wrong"
    shutil.copytree(base, wrong)
    tensors = load_file(wrong / "model.safetensors")
    tensors["model.layers.0.mlp.experts.1.down_proj.weight"] = torch.zeros(32, 8)
    save_file(tensors, wrong / "model.safetensors", metadata={"format": "pt"})
    msg = assert_clean_failure(cli("eval", wrong, wrong, "--general", code_data))
    assert "model.layers.0.mlp.experts.1.down_proj.weight" in msg


def test_a_conversion_piece_surgery_cannot_map_is_refused_naming_the_tensor(
    moe, code_data, tmp_path, cli, monkeypatch
):
    """A converter through another operation (a transpose, here) cannot be mapped entry by entry."""
    from transformers import conversion_mapping
    from transformers.core_model_loading import Transpose, WeightConverter

    real = conversion_mapping.get_model_conversion_mapping

    def with_transpose(model, *args, **kwargs):
        transforms = []
        for t in real(model, *args, **kwargs):
            if isinstance(t, WeightConverter) and any("down_proj" in p for p in t.source_patterns):
                operations = [*t.operations, Transpose(1, 2)]
                t = WeightConverter(t._original_source_patterns, t._original_target_patterns, operations)
            transforms.append(t)
        return transforms

    monkeypatch.setattr(conversion_mapping, "get_model_conversion_mapping", with_transpose)
    msg = assert_clean_failure(
        cli("score", moe("qwen3_moe", "per-expert"), "--data", code_data, "-o", tmp_path / "m.safetensors")
    )
    assert "Transpose" in msg and ".down_proj.weight" in msg


def test_tiny_model_writes_either_layout(tmp_path, cli):
    assert cli("tiny-model", tmp_path / "f", "--arch", "olmoe", "--experts", "fused", "-q")[0] == 0
    assert cli("tiny-model", tmp_path / "p", "--arch", "olmoe", "-q")[0] == 0
    fused, per_expert = set(read_all(tmp_path / "f")), set(read_all(tmp_path / "p"))
    assert "model.layers.1.mlp.experts.gate_up_proj" in fused and not expert_numbers(fused)
    assert expert_numbers(per_expert) == {0, 1, 2, 3}
    assert_clean_failure(cli("tiny-model", tmp_path / "x", "--experts", "fused"), "mixture-of-experts")
    assert_clean_failure(cli("tiny-model", tmp_path / "y", "--arch", "olmoe", "--experts", "x"), "--experts")
    # gpt-oss has one layout, its Hub's: the default, said in --json; per-expert is refused by name
    code, out, _ = cli("tiny-model", tmp_path / "g", "--arch", "gpt_oss", "--json")
    stored = load_file(tmp_path / "g" / "model.safetensors")
    assert code == 0 and json.loads(out)["experts"] == "fused"
    assert "model.layers.0.mlp.experts.gate_up_proj" in stored
    per_expert = cli("tiny-model", tmp_path / "z", "--arch", "gpt_oss", "--experts", "per-expert")
    assert_clean_failure(per_expert, "no per-expert layout")
    code, out, _ = cli("tiny-model", tmp_path / "o", "--arch", "olmoe", "--json")
    assert json.loads(out)["experts"] == "per-expert"


def expert_numbers(names) -> set[int]:
    return {
        int(n.split(".experts.")[1].split(".")[0])
        for n in names
        if ".experts." in n and n.split(".experts.")[1][0].isdigit()
    }


def test_a_transformers_that_loads_experts_elsewhere_is_refused(moe, monkeypatch):
    """If loading put an expert anywhere but where the conversion mapping says (a transformers
    that changed it), every mask and delta of it would land on the wrong entries: refused."""
    import piece_surgery.models.checkpoint as checkpoint_module
    from piece_surgery.models.fused import StoredSlice
    from piece_surgery.runtime.errors import PieceError

    real = checkpoint_module.fused_slices

    def swapped(model, stored):
        found = real(model, stored)
        a, b = (
            "model.layers.0.mlp.experts.0.down_proj.weight",
            "model.layers.0.mlp.experts.1.down_proj.weight",
        )
        if a in found:
            found[a], found[b] = (
                StoredSlice(a, found[a].param, found[b].offset, found[a].shape),
                StoredSlice(b, found[b].param, found[a].offset, found[b].shape),
            )
        return found

    monkeypatch.setattr(checkpoint_module, "fused_slices", swapped)
    with pytest.raises(PieceError, match="loaded 'model.layers.0.mlp.experts.0.down_proj.weight' elsewhere"):
        open_checkpoint(moe("qwen3_moe", "per-expert")).load_model(device="cpu")
