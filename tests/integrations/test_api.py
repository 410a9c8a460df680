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


def _one_line(match: str, call) -> str:
    """`call()` raises a PieceError of one line that contains `match`; returns the line."""
    with pytest.raises(PieceError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and match in message, message
    return message


def test_api_mistakes_are_one_line_errors(tiny, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny("llama"))
    _one_line("must be a Mask", lambda: ps.sparsify(model, {"a": 1}))
    _one_line("not found", lambda: ps.sparsify(model, tmp_path / "no-mask.safetensors"))
    _one_line("must be a loaded model", lambda: ps.sparsify("model", tmp_path / "m.safetensors"))
    _one_line("'density' must be a number", lambda: ps.score(model, RECORDS, density="0.1"))
    _one_line("retain must be", lambda: ps.score(model, RECORDS, method="piece-r", retain=5))
    # a string is a named set, a Path a file, texts go in a list
    _one_line("is not general, self or chat", lambda: ps.score(model, RECORDS, method="piece-r", retain="hi"))
    _one_line("one record (a dict)", lambda: ps.score(model, {"text": "x = 1"}, method="piece-s"))
    _one_line("one string", lambda: ps.score(model, "x = 1", method="piece-s"))
    _one_line("reads no data", lambda: ps.score(model, RECORDS, method="magnitude"))
    _one_line("has no option 'colour'", lambda: ps.score(model, RECORDS, colour=1))

    mask = ps.score(model, RECORDS, method="piece-s", density=0.02)
    sparse = ps.sparsify(model, mask)
    _one_line("this model is sparsified", lambda: ps.score(model, RECORDS, method="piece-s"))
    _one_line("must be a folder or Hub repo id", lambda: sparse.to_delta(base=5))
    _one_line("finite number >= 0", lambda: sparse.add_retain_penalty(-1.0))
    _one_line("folder must be a path", lambda: sparse.save_delta(5))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    _one_line("pass overwrite=True to replace it", lambda: sparse.save_delta(tmp_path / "taken"))
    message = _one_line(
        "overwrite=True only replaces a delta", lambda: sparse.save_delta(tmp_path / "taken", overwrite=True)
    )
    assert "--overwrite" not in message and (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    sparse.unsparsify()
    _one_line("unsparsify() ran already", sparse.unsparsify)
    _one_line("unsparsify() ran", lambda: sparse.save_delta(tmp_path / "delta"))
    assert not (tmp_path / "delta").exists()

    switcher = ps.DeltaSwitcher(model)
    _one_line("must be a Delta", lambda: switcher.add("x", 5))
    _one_line("scale must be a finite number", lambda: switcher.add("x", tmp_path, scale="1"))
    _one_line("no resident delta named 'x'", lambda: switcher.activate("x"))


def test_paths_are_taken_where_objects_are(tiny, tmp_path):
    """A mask file for sparsify, a folder for to_delta's base, a delta folder for DeltaSwitcher.add."""
    base = tiny("llama")
    model = AutoModelForCausalLM.from_pretrained(base)
    mask = ps.score(model, RECORDS, method="piece-s", density=0.02)
    ps.save_mask(mask, tmp_path / "m.safetensors")
    sparse = ps.sparsify(model, tmp_path / "m.safetensors")
    assert all(torch.equal(sparse.mask.indices[n], mask.indices[n]) for n in mask.indices)
    with torch.no_grad():
        for value in sparse.values.values():
            value.add_(0.5)
    by_path, by_default = sparse.to_delta(base=str(base)), sparse.to_delta()
    assert by_path.count == by_default.count == mask.k
    sparse.save_delta(tmp_path / "delta")
    sparse.write()
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("piece_")}
    sparse.unsparsify()
    switcher = ps.DeltaSwitcher(model)
    switcher.add("code", tmp_path / "delta")
    switcher.activate("code")
    assert all(bitwise_equal(trained[n], p.detach()) for n, p in model.named_parameters())


def test_named_retain_sets_and_texts(tiny):
    """'chat' is a named set as on the command line; texts in a list are records of their own."""
    model = AutoModelForCausalLM.from_pretrained(tiny("llama"))
    chat = ps.score(model, RECORDS, method="piece-r", retain="chat", density=0.02, self_length=4)
    assert [s.file for s in chat.info.retain.sources] == ["chat"] and chat.info.retain.chat_sampling
    texts = ps.score(model, RECORDS, method="piece-r", retain=["general", ["x = 1", "y = 2"]], density=0.02)
    assert [s.file for s in texts.info.retain.sources][0] == "general"
    assert len(texts.info.retain.sources) == 2
    _one_line(
        "retain 'general' is the same set as retain 'general'",
        lambda: ps.score(model, RECORDS, retain=["general", "general"]),
    )


def test_a_set_given_twice_and_a_token_past_the_table_are_one_line(tiny, tmp_path):
    """As on the command line: the same retain file however spelled, or the same records, counted
    twice, is refused; a token id the model's embedding table has no row for is refused before any
    pass indexes past it."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from piece_surgery.scoring.retain import general_text

    model = AutoModelForCausalLM.from_pretrained(tiny("llama"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "keep.txt").write_text("a text to keep\n")
    twice = [
        [tmp_path / "keep.txt", tmp_path / "sub" / ".." / "keep.txt"],
        ["general", general_text()],
        [RECORDS, RECORDS],
    ]
    for sources in twice:
        _one_line("is the same set as retain", lambda s=sources: ps.score(model, RECORDS, retain=s))
    tokenizer = AutoTokenizer.from_pretrained(tiny("llama"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<new>"]})
    for data, retain in (([{"text": "x <new> y"}], None), (RECORDS, [[{"text": "x <new> y"}]])):
        call = lambda d=data, r=retain: ps.score(model, d, tokenizer=tokenizer, retain=r)  # noqa: E731
        _one_line("has token id 384, but the model's embedding table has 384 rows", call)
    assert Path(general_text()).is_file()


def test_the_model_and_the_mask_must_be_the_checkpoints(tiny, tmp_path):
    """Same architecture, other weights: a mask of one is refused for the other, and a model is
    refused as a checkpoint it does not hold (score's and to_delta's)."""
    base, other = tiny("llama"), tiny("llama", seed=1)
    model = AutoModelForCausalLM.from_pretrained(base)
    other_model = AutoModelForCausalLM.from_pretrained(other)
    other_mask = ps.score(other_model, RECORDS, method="piece-s", density=0.02)
    _one_line("scored on another model", lambda: ps.sparsify(model, other_mask))
    _one_line(
        "not those of checkpoint", lambda: ps.score(other_model, RECORDS, method="piece-s", checkpoint=base)
    )
    sparse = ps.sparsify(model, ps.score(model, RECORDS, method="piece-s", density=0.02))
    _one_line("not those of checkpoint", lambda: sparse.to_delta(base=other))
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)  # a weight the mask does not select, changed after sparsify
    sparse.unsparsify()
    _one_line("not those of checkpoint", lambda: ps.score(model, RECORDS, method="piece-s"))


def test_the_state_dict_holds_the_trained_weights_and_the_models_keys_alone(tiny, tmp_path):
    """save_pretrained right after optimizer.step() (no forward since) writes the trained model, a
    plain checkpoint; loading it into a model sparsified with the same mask brings the values back,
    and with another mask is one line."""
    base = tiny("llama")
    model = AutoModelForCausalLM.from_pretrained(base)
    keys = set(model.state_dict())
    mask = ps.score(model, RECORDS, method="piece-s", density=0.02)
    sparse = ps.sparsify(model, mask)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    trained = {n: v.detach().clone() for n, v in sparse.values.items()}
    assert set(model.state_dict()) == keys
    model.save_pretrained(tmp_path / "saved")
    sparse.save_delta(tmp_path / "delta")
    saved = read_all(tmp_path / "saved")
    assert set(saved) <= keys
    for name, idx in mask.indices.items():  # the trained values, not those before the step
        assert torch.equal(saved[name].reshape(-1)[idx], trained[name])
        assert not torch.equal(trained[name], sparse.sparse.base_values[name])

    again = AutoModelForCausalLM.from_pretrained(base)
    resumed = ps.sparsify(again, mask)
    again.load_state_dict(saved, strict=False)
    assert all(torch.equal(resumed.values[n], trained[n]) for n in trained)
    elsewhere = AutoModelForCausalLM.from_pretrained(base)
    ps.sparsify(elsewhere, ps.score(elsewhere, method="random", density=0.02, seed=3))
    _one_line("trained with another mask", lambda: elsewhere.load_state_dict(saved, strict=False))


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


def test_the_top_level_writers_follow_the_output_rules(tiny, tmp_path):
    """piece_surgery.save_mask and save_delta refuse what the CLI's outputs refuse: an existing path
    without overwrite=True, a folder of other files even with it; a non-path is one line."""
    model = AutoModelForCausalLM.from_pretrained(tiny("llama"))
    mask = ps.score(model, RECORDS, method="piece-s", density=0.02)
    delta = ps.sparsify(model, mask).to_delta()
    precious = tmp_path / "precious.safetensors"
    precious.write_bytes(b"mine")
    _one_line("pass overwrite=True to replace it", lambda: ps.save_mask(mask, precious))
    assert precious.read_bytes() == b"mine"
    ps.save_mask(mask, precious, overwrite=True)
    assert ps.load_mask(precious).k == mask.k
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    _one_line("pass overwrite=True to replace it", lambda: ps.save_delta(delta, other))
    _one_line("only replaces a delta", lambda: ps.save_delta(delta, other, overwrite=True))
    assert (other / "notes.txt").read_text() == "mine"
    _one_line("folder must be a path", lambda: ps.save_delta(delta, 5))
    _one_line("delta must be a Delta", lambda: ps.save_delta(mask, tmp_path / "d"))
    ps.save_delta(delta, tmp_path / "d")
    ps.save_delta(delta, tmp_path / "d", overwrite=True)  # a delta may replace a delta
    assert ps.load_delta(tmp_path / "d").count == delta.count
