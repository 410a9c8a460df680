"""The library on a model in memory: score as the CLI scores, sparsify so that any loop trains the
masked entries alone, and a delta that applies to the base as exactly as `train`'s."""

import json

import pytest
import torch
from helpers import bitwise_equal, delta_entries, moved_by_brute_force, read_all
from transformers import AutoModelForCausalLM

import piece_surgery as ps
from piece_surgery.formats.delta_folder import load_delta
from piece_surgery.formats.mask import load_mask
from piece_surgery.runtime.errors import PieceError

RECORDS = [
    {"text": "def add(a, b):\n    return a + b"},
    {"prompt": "Square a number.", "response": "def square(x):\n    return x * x"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "def f(): pass"}]},
    "for i in range(10):\n    print(i)",
]


@pytest.fixture
def records_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r if isinstance(r, dict) else {"text": r}) for r in RECORDS) + "\n")
    return path


@pytest.mark.parametrize("method", ["piece-s", "piece-r"])
def test_score_in_memory_selects_what_the_cli_selects(tiny, records_file, tmp_path, cli, method):
    base = tiny("llama")
    out = tmp_path / "m.safetensors"
    assert (
        cli("score", base, "--data", records_file, "-o", out, "--method", method, "--density", "0.02", "-q")[
            0
        ]
        == 0
    )
    model = AutoModelForCausalLM.from_pretrained(base)
    mask = ps.score(model, RECORDS, method=method, density=0.02)
    from_file = load_mask(out)
    assert mask.indices.keys() == from_file.indices.keys()
    assert all(torch.equal(mask.indices[n], from_file.indices[n]) for n in mask.indices)
    assert mask.info.model.fingerprint == from_file.info.model.fingerprint  # the checkpoint it came from


def test_a_datasets_dataset_scores_as_its_rows(tiny):
    datasets = pytest.importorskip("datasets")
    model = AutoModelForCausalLM.from_pretrained(tiny("llama"))
    rows = [{"prompt": "Square a number.", "response": "x * x"}, {"prompt": "Add.", "response": "a + b"}]
    a = ps.score(model, rows, method="piece-s", density=0.02)
    b = ps.score(model, datasets.Dataset.from_list(rows), method="piece-s", density=0.02)
    assert (
        all(torch.equal(a.indices[n], b.indices[n]) for n in a.indices)
        and a.indices.keys() == b.indices.keys()
    )
    assert a.info.data.sha256 == b.info.data.sha256


def test_only_the_values_train_in_a_plain_loop_and_the_delta_applies_exactly(tiny, tmp_path, cli):
    base = tiny("llama", dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base)
    mask = ps.score(model, RECORDS, method="piece-s", density=0.02)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparse = ps.sparsify(model, mask)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == mask.k and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("piece_surgery."))
        optimizer.step()
        optimizer.zero_grad()
    sparse.save_delta(tmp_path / "delta")
    assert load_delta(tmp_path / "delta").info.provenance.made_by == "trainer"
    assert cli("apply", base, tmp_path / "delta", "-o", tmp_path / "merged", "-q")[0] == 0
    sparse.write()
    merged, now = read_all(tmp_path / "merged"), dict(model.named_parameters())
    for name, weight in merged.items():
        assert bitwise_equal(weight, now[name].detach()), name
    changed = {n for n in before if not bitwise_equal(before[n], now[n].detach())}
    assert changed and changed <= set(mask.indices)  # only masked tensors moved

    sparse.unsparsify()  # back as it was: the base's weights, every parameter trainable, no hook
    assert not hasattr(model, "piece_surgery") and all(p.requires_grad for p in model.parameters())
    assert all(bitwise_equal(before[n], p.detach()) for n, p in model.named_parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_mask_of_another_model_is_one_line(tiny):
    mask = ps.score(
        AutoModelForCausalLM.from_pretrained(tiny("qwen2")), RECORDS, method="piece-s", density=0.02
    )
    model = AutoModelForCausalLM.from_pretrained(tiny("llama"))
    with pytest.raises(PieceError, match="another model|does not have"):
        ps.sparsify(model, mask)
    with pytest.raises(PieceError, match="record 2"):
        ps.score(model, ["text", {"prompt": 3, "response": "x"}], method="piece-s")
    sparse = ps.sparsify(model, ps.score(model, RECORDS, method="piece-s", density=0.02))
    with pytest.raises(PieceError, match="sparsified already"):
        ps.sparsify(model, sparse.mask)


@pytest.mark.parametrize("lr", [1e-2, 1e-9])
def test_a_model_trained_in_bf16_from_fp32_files_records_only_what_training_moved(tiny, tmp_path, cli, lr):
    """to_delta by train's rule: the rounding of the fp32 files into the bf16 model is no change."""
    base = tiny("llama")
    model = AutoModelForCausalLM.from_pretrained(base).to(torch.bfloat16)
    mask = ps.score(model, RECORDS, method="piece-s", density=0.02)
    sparse = ps.sparsify(model, mask)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    values = {n: v.detach() for n, v in sparse.values.items()}
    expected = moved_by_brute_force(read_all(base), mask.indices, values, torch.bfloat16)
    delta = sparse.to_delta()
    assert delta_entries(delta) == expected and bool(expected) == (lr == 1e-2)
    if lr == 1e-2:  # the fp32 base with the delta, loaded in bf16, is the model trained
        sparse.save_delta(tmp_path / "delta")
        assert cli("apply", base, tmp_path / "delta", "-o", tmp_path / "merged", "-q")[0] == 0
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").to(torch.bfloat16)
        sparse.write()
        now = dict(model.named_parameters())
        assert all(bitwise_equal(p.detach(), now[n].detach()) for n, p in merged.named_parameters())
