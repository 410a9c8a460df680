"""The family matrix (issue 33): one end-to-end run per model family on a tiny config of it, each
with its own chat template where one is in tests/fixtures/chat_templates: a two-turn chat's labels,
score -> train -> apply equal to the same training done in memory bit for bit, diff giving the
delta back, and export -> import giving it back where PEFT's SHiRA takes the family's modules (a
family it does not take is refused in one line, naming the tensor).

A family is one row of FAMILIES (and of models/tiny.py's TINY_CONFIGS); the README's family table
says what each row covers."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from chat_expectations import EXPECTED, TEMPLATES, TWO_TURNS, labelled_runs
from helpers import assert_clean_failure

from piece_surgery.data.tokenize import tokenize_record
from piece_surgery.formats.artifacts import open_delta
from piece_surgery.formats.mask import load_mask
from piece_surgery.models.checkpoint import open_checkpoint
from piece_surgery.models.tiny import make_tiny_checkpoint, tiny_tokenizer
from piece_surgery.training.config import TrainConfig
from piece_surgery.training.loop import train_sparse


@dataclass(frozen=True)
class Family:
    arch: str  # a TINY_CONFIGS row
    template: str | None = None  # its chat template in tests/fixtures/chat_templates (None: CHAT_TEMPLATE)
    chat_family: str | None = None  # whose special tokens the template writes (CHAT_FAMILIES)
    shira: bool = True  # PEFT's SHiRA takes the family's linear layers
    biases: bool = False  # it has biases, which SHiRA cannot hold: scored without them

    def __str__(self) -> str:
        return self.arch


FAMILIES = [
    Family("llama", "llama3_1", "llama3"),
    Family("mistral", "mistral_nemo", "mistral"),
    Family("qwen2", "qwen2_5", "qwen", biases=True),
    Family("qwen3", "qwen3", "qwen"),
    Family("gemma2", "gemma2", "gemma"),
    Family("gemma3", "gemma3", "gemma"),
    Family("phi3", "phi3_5", "phi3"),
    Family("gpt2", shira=False, biases=True),  # Conv1D layers: SHiRA has no place for them
    Family("olmo2"),
    Family("gpt_neox", biases=True),
    Family("falcon", biases=True),
    # mixture-of-experts families run the same pipeline in both expert layouts: tests/models/test_moe.py
]
CHAT_TEMPLATE_RUNS = ["Few weights.</s>", "Every weight.</s>"]
TRAIN = ["--lr", "1e-2", "--max-steps", "2", "--batch-size", "2"]
DTYPE = torch.bfloat16  # where export -> import is exact (fp32's base + change can round)


def _data(folder: Path) -> Path:
    records = [
        {"messages": TWO_TURNS},
        {"text": "def add(a, b):\n    return a + b"},
        {"prompt": "Square a number.", "response": "def square(x):\n    return x * x"},
        {"messages": TWO_TURNS[:2]},
    ]
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _trained_in_memory(base: Path, data: Path, mask_path: Path) -> torch.nn.Module:
    """The model train would make, trained here in memory with the same options (train_sparse)."""
    checkpoint = open_checkpoint(base)
    mask = load_mask(mask_path)
    loaded = checkpoint.load_model(device="cpu", dtype="bfloat16")
    config = TrainConfig(lr=1e-2, max_steps=2, batch_size=2).for_mask(
        mask.info.method, mask.fisher is not None
    )
    dataset = checkpoint.load_data(data)
    train_sparse(
        loaded.module,
        loaded.parameters(mask.indices),
        mask.indices,
        dataset,
        config,
        pad_id=checkpoint.pad_id,
    )
    return loaded.module


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_a_family_end_to_end(family, tmp_path, cli):
    from transformers import AutoModelForCausalLM

    template = (TEMPLATES / f"{family.template}.jinja").read_text() if family.template else None
    tokenizer = tiny_tokenizer(chat_family=family.chat_family, chat_template=template)
    runs = labelled_runs(tokenize_record({"messages": TWO_TURNS}, tokenizer, 256), tokenizer)
    assert runs == (EXPECTED[family.template] if family.template else CHAT_TEMPLATE_RUNS)

    base = make_tiny_checkpoint(tmp_path / "base", family.arch, tokenizer=tokenizer, dtype=DTYPE)
    data, mask, delta, merged = (
        _data(tmp_path),
        tmp_path / "m.safetensors",
        tmp_path / "delta",
        tmp_path / "merged",
    )
    score = ["score", base, "--data", data, "--method", "piece-s", "--density", "0.05", "-o", mask, "-q"]
    assert cli(*score, *(["--exclude", "embed", "--exclude", "bias"] if family.biases else []))[0] == 0
    assert cli("train", base, "--data", data, "--mask", mask, "-o", delta, *TRAIN, "-q")[0] == 0
    assert cli("apply", base, delta, "-o", merged, "-q")[0] == 0

    # apply gives the model trained in memory, bit for bit, and it moved
    expected = _trained_in_memory(base, data, mask).state_dict()
    got = AutoModelForCausalLM.from_pretrained(merged, dtype=DTYPE).state_dict()
    original = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPE).state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in got)
    assert any(not torch.equal(got[n], original[n]) for n in got)

    # diff of the two folders gives the delta back: its entries that changed, their values
    assert cli("diff", base, merged, "-o", tmp_path / "diff", "-q")[0] == 0
    trained, again = open_delta(delta).tensors, open_delta(tmp_path / "diff").tensors
    changed = {n: t for n, t in trained.items() if not torch.equal(t.tuned, t.base)}
    assert again.keys() == changed.keys()
    for name, t in changed.items():
        moved = t.tuned != t.base
        assert torch.equal(again[name].indices, t.indices[moved]) and torch.equal(
            again[name].tuned, t.tuned[moved]
        )

    # export to PEFT (SHiRA) and import back: the same delta, or a one-line refusal
    adapter = tmp_path / "adapter"
    if not family.shira:
        assert_clean_failure(
            cli("export", delta, "--base", base, "-o", adapter),
            "not a linear layer's weight or a norm's gain): score without them (--exclude",
            output=adapter,
        )
        return
    assert cli("export", delta, "--base", base, "-o", adapter, "-q")[0] == 0
    assert cli("import", adapter, "--base", base, "-o", tmp_path / "back", "-q")[0] == 0
    back = open_delta(tmp_path / "back").tensors
    assert back.keys() == trained.keys()
    assert all(
        torch.equal(back[n].indices, t.indices) and torch.equal(back[n].tuned, t.tuned)
        for n, t in trained.items()
    )
