import pytest

from piece_surgery.data.batches import collate
from piece_surgery.data.dataset import load_dataset
from piece_surgery.data.examples import IGNORE
from piece_surgery.data.tokenize import tokenize_record
from piece_surgery.models.tiny import tiny_tokenizer
from piece_surgery.runtime.errors import PieceError


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_text_carries_loss_everywhere(tok):
    e = tokenize_record({"text": "def add(a, b):"}, tok, 64)
    assert e.labels == e.input_ids
    assert e.input_ids[-1] == tok.eos_token_id


def test_prompt_tokens_carry_no_loss(tok):
    e = tokenize_record({"prompt": "Square a number.", "response": "x * x"}, tok, 64)
    n_prompt = len(tok("Square a number.")["input_ids"])
    assert e.labels[:n_prompt] == [IGNORE] * n_prompt
    assert e.labels[n_prompt:] == e.input_ids[n_prompt:]
    assert tok.decode(e.input_ids[n_prompt:-1]) == "x * x"


def test_only_assistant_turns_carry_loss(tok):
    msgs = [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "def f(): pass"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "import os"},
    ]
    e = tokenize_record({"messages": msgs}, tok, 256)
    learned = tok.decode([t for t in e.labels if t != IGNORE])
    assert "def f(): pass" in learned and "import os" in learned
    assert "hi there" not in learned and "again" not in learned


def test_truncation_and_skipping(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"prompt": "a very long prompt that fills the window", "response": "ok"}\n{"text": "kept here"}\n'
    )
    ds = load_dataset(path, tok, max_length=4)
    assert len(ds.examples) == 1 and ds.skipped == 1 and ds.read == 2
    assert all(len(e.input_ids) <= 4 for e in ds.examples)


def test_txt_is_one_example_per_nonempty_line(tmp_path, tok):
    path = tmp_path / "d.txt"
    path.write_text("first line\n\nsecond line\n")
    assert len(load_dataset(path, tok).examples) == 2
    assert len(load_dataset(path, tok, max_samples=1).examples) == 1


def test_collate_pads_without_loss():
    from piece_surgery.data.examples import Example

    batch = collate([Example([5, 6, 7], [5, 6, 7]), Example([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"][1].tolist() == [8, IGNORE, IGNORE]
    assert batch["attention_mask"][1].tolist() == [1, 0, 0]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "has no examples"),
        ("not json\n", "not valid JSON"),
        ('{"title": "x"}\n', "found the fields 'title'"),
    ],
)
def test_bad_data_files(tmp_path, tok, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(PieceError, match=message):
        load_dataset(path, tok)
