"""Fuzzing every reader of a user file: checkpoint headers and index, mask, delta (files and
delta.json), training state, data files. Each case must end in a correct result or a one-line
PieceError: never another exception, a hang, a write, or a changed input.

PIECE_FUZZ_EXAMPLES=5000 pytest tests/formats/test_fuzz_readers.py runs a longer fuzz (default: 60
cases per reader).
"""

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from piece_surgery.models.tiny import tiny_tokenizer
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.options import RunOptions

EXAMPLES = int(os.environ.get("PIECE_FUZZ_EXAMPLES", "60"))
TOKENIZER = tiny_tokenizer()
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=5000,  # a case that takes 5 s counts as a hang
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same cases on every run: CI stays deterministic
)

# ---------------------------------------------------------------- mutations


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


@st.composite
def mutated_bytes(draw, data: bytes) -> bytes:
    """Truncate, flip bytes, insert junk, or rewrite the safetensors length prefix."""
    how = draw(st.sampled_from(["truncate", "flip", "insert", "length", "junk"]))
    if how == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= draw(st.integers(1, 255))
        return bytes(out)
    if how == "insert":
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(st.binary(min_size=1, max_size=64)) + data[i:]
    if how == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + data[8:]
    return draw(st.binary(max_size=256))


@st.composite
def mutated_header(draw, data: bytes) -> bytes:
    """A well-framed safetensors file whose header JSON is changed: a tensor's dtype, shape or
    offsets, the metadata, or a key removed."""
    header, body = split_safetensors(data)
    names = [k for k in header if k != "__metadata__"]
    name = draw(st.sampled_from(names))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "metadata"]))
    if field == "dtype":
        header[name]["dtype"] = draw(
            st.sampled_from(["F32", "BF16", "F16", "I64", "U8", "BOOL", "F8_E4M3", "X"])
        )
    elif field == "shape":
        header[name]["shape"] = draw(st.lists(st.integers(-2, 2**40), max_size=3) | JSON_VALUES)
    elif field == "data_offsets":
        header[name]["data_offsets"] = draw(st.lists(st.integers(-1, 2**40), min_size=2, max_size=2))
    elif field == "drop":
        del header[name]
    else:
        meta = header.setdefault("__metadata__", {})
        key = draw(st.sampled_from(sorted(meta) or ["format"]))
        meta[key] = draw(st.text(max_size=40) | JSON_VALUES.map(json.dumps))
    return join_safetensors(header, body)


def any_mutation(data: bytes):
    return st.one_of(mutated_bytes(data), mutated_header(data))


@st.composite
def mutated_json(draw, value):
    """Replace one value somewhere in a JSON document (or drop its key)."""
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node[:3]):
                walk(v, (*path, i))

    walk(value, ())
    path = draw(st.sampled_from(paths))
    if not path:
        return draw(JSON_VALUES)
    doc = json.loads(json.dumps(value))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(JSON_VALUES)
    return doc


# ---------------------------------------------------------------- the property


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_or_refuse(reader, folder: Path):
    """Run a reader: it returns, or raises a one-line PieceError; it writes and changes nothing."""
    before = files_of(folder)
    try:
        result = reader()
    except PieceError as exc:
        assert "\n" not in str(exc) and str(exc), repr(exc)
        result = None
    assert files_of(folder) == before, "a reader changed or wrote a file"
    return result


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny):
    """A model, a mask and a delta of it, and a training state, made once."""
    from piece_surgery.formats.delta_folder import save_delta
    from piece_surgery.formats.mask import save_mask
    from piece_surgery.merging.diff import diff
    from piece_surgery.recipes.score import score_checkpoint
    from piece_surgery.scoring.options import ScoreOptions

    root = tmp_path_factory.mktemp("fuzz")
    model = shutil.copytree(tiny("llama", dtype=torch.bfloat16), root / "model")
    mask, _, _ = score_checkpoint(
        str(model), None, ScoreOptions(method="random", density=0.01), run=RunOptions(device="cpu")
    )
    save_mask(mask, root / "mask.safetensors")
    tuned = shutil.copytree(model, root / "tuned")
    tensors = load_file(tuned / "model.safetensors")
    for t in tensors.values():
        t.view(-1)[::97] += 0.25
    save_file(tensors, tuned / "model.safetensors", metadata={"format": "pt"})
    save_delta(diff(str(model), str(tuned)), root / "delta")
    return root


# ---------------------------------------------------------------- readers


@FUZZ
@given(data=st.data())
def test_checkpoint_headers(work, tmp_path_factory, data):
    from piece_surgery.models.checkpoint import open_checkpoint

    folder = tmp_path_factory.mktemp("ckpt")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(work / "model" / f, folder / f)
    original = (work / "model" / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data.draw(any_mutation(original)))
    checkpoint = read_or_refuse(lambda: open_checkpoint(str(folder)), folder)
    if checkpoint is not None:  # it read: the layout must describe the file as it is
        assert all(info.file == "model.safetensors" for info in checkpoint.layout.values())
        assert len(checkpoint.identity.fingerprint) == 64


@FUZZ
@given(data=st.data())
def test_checkpoint_index(work, tmp_path_factory, data):
    from piece_surgery.models.checkpoint import open_checkpoint

    folder = tmp_path_factory.mktemp("sharded")
    shutil.copy(work / "model" / "config.json", folder / "config.json")
    shutil.copy(work / "model" / "model.safetensors", folder / "model-00001-of-00001.safetensors")
    with safe_open(str(folder / "model-00001-of-00001.safetensors"), "pt") as f:
        names = list(f.keys())
    index = {
        "metadata": {"total_size": 1},
        "weight_map": dict.fromkeys(names, "model-00001-of-00001.safetensors"),
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(data.draw(mutated_json(index))))
    read_or_refuse(lambda: open_checkpoint(str(folder)), folder)


@FUZZ
@given(data=st.data())
def test_mask_files(work, tmp_path_factory, data):
    from piece_surgery.formats.mask import load_mask

    folder = tmp_path_factory.mktemp("mask")
    path = folder / "mask.safetensors"
    path.write_bytes(data.draw(any_mutation((work / "mask.safetensors").read_bytes())))
    mask = read_or_refuse(lambda: load_mask(path), folder)
    if mask is not None:
        for name, idx in mask.indices.items():
            size = 1
            for d in mask.shapes[name]:
                size *= d
            assert idx.numel() and int(idx.min()) >= 0 and int(idx.max()) < size
            assert bool((idx[1:] > idx[:-1]).all())


@FUZZ
@given(data=st.data())
def test_mask_metadata_values(work, tmp_path_factory, data):
    """Well-formed files whose header metadata holds JSON of the wrong shape."""
    from piece_surgery.formats.mask import load_mask

    folder = tmp_path_factory.mktemp("maskmeta")
    with safe_open(str(work / "mask.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = data.draw(st.sampled_from(sorted(meta)))
    meta[key] = data.draw(JSON_VALUES.map(json.dumps) | st.text(max_size=20))
    save_file(tensors, folder / "mask.safetensors", metadata=meta)
    read_or_refuse(lambda: load_mask(folder / "mask.safetensors"), folder)


def reseal_delta(folder: Path) -> None:
    from piece_surgery.runtime.json_files import file_sha256

    info = json.loads((folder / "delta.json").read_text())
    if isinstance(info, dict):
        info["weights_sha256"] = file_sha256(folder / "delta.safetensors")
        (folder / "delta.json").write_text(json.dumps(info))


@FUZZ
@given(data=st.data(), reseal=st.booleans())
def test_delta_weights(work, tmp_path_factory, data, reseal):
    """Mutated delta.safetensors, with its digest re-sealed (so the parser sees it) or not."""
    from piece_surgery.formats.delta_folder import load_delta

    folder = shutil.copytree(work / "delta", tmp_path_factory.mktemp("delta") / "d")
    original = (folder / "delta.safetensors").read_bytes()
    (folder / "delta.safetensors").write_bytes(data.draw(any_mutation(original)))
    if reseal:
        reseal_delta(folder)
    delta = read_or_refuse(lambda: load_delta(folder), folder)
    if delta is not None:
        for t in delta.tensors.values():
            assert t.indices.numel() == t.base.numel() == t.tuned.numel() > 0
            assert bool(torch.isfinite(t.tuned[torch.isfinite(t.base)]).all())


@FUZZ
@given(data=st.data())
def test_delta_description(work, tmp_path_factory, data):
    """delta.json of the wrong shape: any value replaced or dropped, anywhere in the document."""
    from piece_surgery.formats.delta_folder import load_delta

    folder = shutil.copytree(work / "delta", tmp_path_factory.mktemp("deltajson") / "d")
    description = json.loads((folder / "delta.json").read_text())
    (folder / "delta.json").write_text(json.dumps(data.draw(mutated_json(description))))
    read_or_refuse(lambda: load_delta(folder), folder)


@FUZZ
@given(data=st.data())
def test_training_state(work, tmp_path_factory, data):
    """A saved state with state.json or state.safetensors damaged (sha256 re-sealed or not)."""
    from piece_surgery.runtime.json_files import file_sha256
    from piece_surgery.training.sparse_grad import SparseParameters
    from piece_surgery.training.state import load_state, save_state

    folder = tmp_path_factory.mktemp("state")
    params = {"w": torch.nn.Parameter(torch.randn(6, 4))}
    indices = {"w": torch.tensor([1, 5, 17])}
    sparse = SparseParameters(params, indices)
    optimizer = torch.optim.AdamW(list(sparse.values.values()))
    sum(v.sum() for v in sparse.values.values()).backward()
    optimizer.step()
    key = {"model": "m", "config": {"lr": 1}}
    save_state(folder / "s", sparse, optimizer, 3, [{"step": 3, "loss": 1.0}], key)
    target = data.draw(st.sampled_from(["state.json", "state.safetensors"]))
    path = folder / "s" / target
    if target == "state.json":
        path.write_text(json.dumps(data.draw(mutated_json(json.loads(path.read_text())))))
    else:
        path.write_bytes(data.draw(any_mutation(path.read_bytes())))
        if data.draw(st.booleans()):
            description = json.loads((folder / "s" / "state.json").read_text())
            description["state_sha256"] = file_sha256(path)
            (folder / "s" / "state.json").write_text(json.dumps(description))
    fresh = SparseParameters(params, indices)
    result = read_or_refuse(
        lambda: load_state(folder / "s", fresh, torch.optim.AdamW(list(fresh.values.values())), key), folder
    )
    if result is not None:
        assert isinstance(result[0], int) and result[0] >= 0


@FUZZ
@given(
    lines=st.lists(
        st.one_of(
            JSON_VALUES.map(json.dumps),
            st.fixed_dictionaries({"text": JSON_VALUES}).map(json.dumps),
            st.fixed_dictionaries({"prompt": JSON_VALUES, "response": JSON_VALUES}).map(json.dumps),
            st.fixed_dictionaries(
                {
                    "messages": st.lists(
                        st.fixed_dictionaries({"role": JSON_VALUES, "content": JSON_VALUES}), max_size=3
                    )
                }
            ).map(json.dumps),
            st.text(max_size=60),
        ),
        max_size=5,
    ),
    suffix=st.sampled_from([".jsonl", ".txt", ".json"]),
    raw=st.none() | st.binary(max_size=80),
)
def test_data_files(tmp_path_factory, lines, suffix, raw):
    from piece_surgery.data.dataset import load_dataset

    folder = tmp_path_factory.mktemp("data")
    path = folder / f"data{suffix}"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("\n".join(lines))
    dataset = read_or_refuse(lambda: load_dataset(path, TOKENIZER, max_length=32), folder)
    if dataset is not None:
        assert dataset.examples and all(0 < len(e.input_ids) <= 32 for e in dataset.examples)
        assert all(e.loss_tokens > 0 for e in dataset.examples)
