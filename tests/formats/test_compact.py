"""Compact deltas (format 2): index gaps and tuned values only, with a digest of the base values."""

import json

import numpy as np
import pytest
import torch
from helpers import assert_clean_failure, perturb, read_all, same_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st

from piece_surgery.formats.codec import decode_indices, encode_indices
from piece_surgery.formats.delta_folder import load_delta, save_delta
from piece_surgery.merging.diff import diff
from piece_surgery.merging.live import apply_to_model
from piece_surgery.recipes.apply import apply

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 2**40), max_size=60, unique=True))
def test_index_gaps_round_trip(values):
    indices = np.array(sorted(values), dtype=np.int64)
    data, encoding = encode_indices(indices)
    assert np.array_equal(decode_indices(data, encoding), indices)
    widths = {"u8": 1, "u16": 2, "u32": 4, "u64": 8}
    gaps = np.diff(indices, prepend=0)
    fixed = len(indices) * next((w for w in widths.values() if (gaps.max(initial=0) < 256**w)), 8)
    assert data.size <= fixed  # never worse than the smallest fixed width that holds every gap


def numpy_reader(folder):
    """docs/formats.md's reader for format 2, with safetensors + numpy alone."""
    from safetensors.numpy import load_file

    arrays = load_file(str(folder / "delta.safetensors"))
    info = json.loads((folder / "delta.json").read_text())
    widths = {"u8": "<u1", "u16": "<u2", "u32": "<u4", "u64": "<u8"}
    out = {}
    for name, meta in info["tensors"].items():
        raw = arrays[f"{name}::gaps"]
        if meta["gaps"] == "varint":
            ends = np.flatnonzero(raw < 128)  # a value's last byte has the high bit clear
            value = np.concatenate([[0], np.cumsum(raw < 128)[:-1]])
            starts = np.concatenate([[0], ends[:-1] + 1])
            shift = (7 * (np.arange(raw.size) - starts[value])).astype(np.uint64)
            gaps = np.zeros(ends.size, dtype=np.uint64)
            np.add.at(gaps, value, (raw & 127).astype(np.uint64) << shift)
        else:
            gaps = raw.view(widths[meta["gaps"]]).astype(np.uint64)
        out[name] = (np.cumsum(gaps).astype(np.int64), arrays[f"{name}::tuned"])
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_round_trip_is_bit_exact_and_numpy_readable(tiny, tmp_path, dtype):
    base = tiny("llama", dtype=dtype)
    tuned = perturb(base, tmp_path / "tuned", fraction=0.03, seed=1)
    delta = diff(str(base), str(tuned))
    save_delta(delta, tmp_path / "v1")
    save_delta(delta, tmp_path / "v2", format_version=2)
    info = json.loads((tmp_path / "v2" / "delta.json").read_text())
    assert info["format_version"] == 2 and info["count"] == delta.count
    loaded = load_delta(tmp_path / "v2")
    assert all(t.base is None and len(t.base_sha256) == 64 for t in loaded.tensors.values())
    apply(str(base), [str(tmp_path / "v2")], tmp_path / "merged")
    assert same_checkpoint(tmp_path / "merged", tuned)
    bits = {torch.float32: np.int32, torch.bfloat16: np.int16, torch.float16: np.int16}[dtype]
    t = read_all(tuned)
    for name, (idx, tuned_bits) in numpy_reader(tmp_path / "v2").items():
        assert np.array_equal(idx, delta.tensors[name].indices.numpy())
        expected = (
            t[name]
            .view(-1)[torch.from_numpy(idx)]
            .contiguous()
            .view({4: torch.int32, 2: torch.int16}[t[name].element_size()])
        )
        assert tuned_bits.dtype == bits and np.array_equal(tuned_bits, expected.numpy())
    v1 = json.loads((tmp_path / "v1" / "delta.json").read_text())["tensor_bytes"]
    assert info["tensor_bytes"] < v1


def test_inspect_reports_compact_bytes_per_entry(tiny, tmp_path, cli):
    base = tiny("llama", dtype=torch.bfloat16)
    tuned = perturb(base, tmp_path / "tuned", fraction=0.01, hard=False)
    assert cli("diff", base, tuned, "-o", tmp_path / "d", "--compact", "-q")[0] == 0
    summary = json.loads(cli("inspect", tmp_path / "d", "--json")[1])
    stored = json.loads((tmp_path / "d" / "delta.json").read_text())["tensor_bytes"]
    assert summary["tensor_bytes"] == stored and summary["bytes_per_entry"] == stored / summary["entries"]
    assert summary["bytes_per_entry"] < 8.0  # format 1 stores 8 for bf16


def test_compact_deltas_stack_and_apply_in_place(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny("llama", dtype=torch.bfloat16)
    t1 = perturb(base, tmp_path / "t1", fraction=0.05, seed=1)
    t2 = perturb(t1, tmp_path / "t2", fraction=0.05, seed=2)  # trained on top of the first
    save_delta(diff(str(base), str(t1)), tmp_path / "d1", format_version=2)
    save_delta(diff(str(t1), str(t2)), tmp_path / "d2", format_version=2)
    result = apply(str(base), [str(tmp_path / "d1"), str(tmp_path / "d2")], tmp_path / "merged")
    assert result.overlap.chained > 0 and same_checkpoint(tmp_path / "merged", t2)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    handle = apply_to_model(model, load_delta(tmp_path / "d1"))
    expected = read_all(t1)
    assert all(torch.equal(p, expected[n]) for n, p in model.state_dict().items() if n in expected)
    handle.revert()
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


def test_a_compact_delta_onto_another_base_needs_the_original(tiny, tmp_path, cli):
    base = tiny("llama")
    other = perturb(base, tmp_path / "other", fraction=0.5, seed=9, hard=False)
    tuned = perturb(base, tmp_path / "tuned", fraction=0.02, seed=1, hard=False)
    assert cli("diff", base, tuned, "-o", tmp_path / "d", "--compact", "-q")[0] == 0
    for extra in ([], ["--force"]):
        result = cli("apply", other, tmp_path / "d", "-o", tmp_path / "out", *extra, "-q")
        assert_clean_failure(result, "give --original-base", output=tmp_path / "out")
    code, _, err = cli(
        "apply", other, tmp_path / "d", "-o", tmp_path / "out", "--force", "--original-base", base, "-q"
    )
    assert code == 0, err
    b, t, o, out = read_all(base), read_all(tuned), read_all(other), read_all(tmp_path / "out")
    for name in b:  # task arithmetic: other + (tuned - base), rounded once
        expected = (o[name].double() + (t[name].double() - b[name].double())).to(b[name].dtype)
        assert torch.equal(out[name], expected), name
