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


@pytest.mark.parametrize(
    "name, content",
    [
        ("d.txt", "first line\r\nsecond line\r\n"),
        ("d.jsonl", '{"text": "first line"}\r\n{"text": "second line"}\r\n'),
        ("d.json", '[{"text": "first line"}, {"text": "second line"}]'),
    ],
)
def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path, name, content):
    # Windows editors and PowerShell write UTF-8 with a BOM: it is no character of the first record
    # (a .txt line kept it and trained on it; a .jsonl or .json file was refused as invalid JSON)
    from piece_surgery.data.files import read_records

    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + content.encode())
    records = [record for _, record in read_records(path)]
    expected = ["first line", "second line"]
    assert records == (expected if name.endswith(".txt") else [{"text": t} for t in expected])


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


def _adding(bos: bool, eos: bool):
    """tiny_tokenizer configured to add BOS, EOS, both or neither itself (as Llama, some Gemma
    fine-tunes and GPT-2 are), with a chat template that writes BOS and each turn's EOS."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = tiny_tokenizer()
    single = " ".join([*(["<s>"] if bos else []), "$A", *(["</s>"] if eos else [])])
    specials = [(t, tokenizer.convert_tokens_to_ids(t)) for t in ("<s>", "</s>")]
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single=single, special_tokens=specials)
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    assert tokenizer("a")["input_ids"].count(tokenizer.eos_token_id) == int(eos)  # configured as meant
    return tokenizer


@pytest.mark.parametrize("bos, eos", [(False, False), (True, False), (False, True), (True, True)])
def test_special_tokens_appear_once_however_the_tokenizer_adds_them(bos, eos):
    tokenizer = _adding(bos, eos)
    b, e = tokenizer.bos_token_id, tokenizer.eos_token_id
    body = tokenizer("def add(a, b):", add_special_tokens=False)["input_ids"]
    text = tokenize_record({"text": "def add(a, b):"}, tokenizer, 64)
    assert text.input_ids == [b] * bos + body + [e] and text.labels == text.input_ids
    pair = tokenize_record({"prompt": "def add(a, b):", "response": "x * x"}, tokenizer, 64)
    response = tokenizer("x * x", add_special_tokens=False)["input_ids"]
    assert pair.input_ids == [b] * bos + body + response + [e]
    assert pair.labels == [IGNORE] * (bos + len(body)) + response + [e]
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x * x"}]
    turns = tokenize_record({"messages": chat}, tokenizer, 64)
    assert turns.input_ids.count(b) == 1 and turns.input_ids[0] == b  # the template's BOS, once
    assert turns.input_ids.count(e) == 2 and turns.input_ids[-1] == e  # each turn's end, as written
