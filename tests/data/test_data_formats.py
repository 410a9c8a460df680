"""Data as people have it: TRL's prompt/completion and conversational shapes, Alpaca's
instruction/input/output, .json arrays, Parquet, Arrow and `datasets` folders, each read into the
same examples as the records they map to written as JSONL, with the digest the docs give."""

import hashlib
import json
import sys

import pytest

from piece_surgery.data.dataset import load_dataset
from piece_surgery.data.examples import IGNORE
from piece_surgery.models.tiny import tiny_tokenizer
from piece_surgery.runtime.errors import PieceError


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


ALPACA_TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nAdd two numbers.\n\n### Response:\n"
)
ALPACA_INPUT_TEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\nSquare it.\n\n"
    "### Input:\nx = 3\n\n### Response:\n"
)
CHAT = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "def f(): pass"}]

# (the shape as people keep it, the records it maps to as this project's JSONL writes them)
SHAPES = {
    "text": (
        [{"text": "def add(a, b):\n    return a + b", "id": 1}, {"text": "import os", "id": 2}],
        [{"text": "def add(a, b):\n    return a + b"}, {"text": "import os"}],
    ),
    "trl-prompt-completion": (
        [{"prompt": "Square a number.", "completion": " x * x"}, {"prompt": "Add.", "completion": " a + b"}],
        [{"prompt": "Square a number.", "response": " x * x"}, {"prompt": "Add.", "response": " a + b"}],
    ),
    "trl-conversational": ([{"messages": CHAT}] * 2, [{"messages": CHAT}] * 2),
    "trl-conversational-prompt-completion": (
        [{"prompt": CHAT[:1], "completion": CHAT[1:]}] * 2,
        [{"messages": CHAT}] * 2,
    ),
    "alpaca": (
        [
            {"instruction": "Add two numbers.", "input": "", "output": "a + b"},
            {"instruction": "Square it.", "input": "x = 3", "output": "9"},
        ],
        [{"prompt": ALPACA_TEXT, "response": "a + b"}, {"prompt": ALPACA_INPUT_TEXT, "response": "9"}],
    ),
}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_examples(a, b) -> bool:
    return [(e.input_ids, e.labels) for e in a.examples] == [(e.input_ids, e.labels) for e in b.examples]


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_json_arrays_and_jsonl_of_each_shape_read_as_their_records(tmp_path, tok, shape):
    rows, records = SHAPES[shape]
    expected = load_dataset(write_jsonl(tmp_path / "mapped.jsonl", records), tok, max_length=256)
    as_jsonl = load_dataset(write_jsonl(tmp_path / "rows.jsonl", rows), tok, max_length=256)
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(rows, indent=2))
    as_array = load_dataset(array, tok, max_length=256)
    assert same_examples(as_jsonl, expected) and same_examples(as_array, expected)
    assert as_jsonl.sha256 == sha256(tmp_path / "rows.jsonl") and as_array.sha256 == sha256(array)
    assert len(expected.examples) == len(rows)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_parquet_arrow_and_datasets_folders_read_as_their_records(tmp_path, tok, shape):
    pytest.importorskip("pyarrow")
    datasets = pytest.importorskip("datasets")
    import pyarrow.feather
    import pyarrow.parquet

    rows, records = SHAPES[shape]
    expected = load_dataset(write_jsonl(tmp_path / "mapped.jsonl", records), tok, max_length=256)
    saved = datasets.Dataset.from_list(rows)
    parquet, feather = tmp_path / "rows.parquet", tmp_path / "rows.arrow"
    pyarrow.parquet.write_table(saved.data.table, parquet)
    pyarrow.feather.write_feather(saved.data.table, feather)  # an Arrow IPC file
    saved.save_to_disk(str(tmp_path / "saved"))
    stream = tmp_path / "saved" / "data-00000-of-00001.arrow"  # an Arrow IPC stream
    for path in (parquet, feather, stream):
        read = load_dataset(path, tok, max_length=256)
        assert same_examples(read, expected), path
        assert read.sha256 == sha256(path) and read.name == path.name
    folder = load_dataset(tmp_path / "saved", tok, max_length=256)
    assert same_examples(folder, expected) and folder.name == "saved"
    # the documented rule, computed here from the folder's own state.json
    state = json.loads((tmp_path / "saved" / "state.json").read_text())
    digest = hashlib.sha256()
    for entry in state["_data_files"]:
        file = tmp_path / "saved" / entry["filename"]
        digest.update(f"{file.name}\0{sha256(file)}\n".encode())
    assert folder.sha256 == digest.hexdigest()
    assert len(load_dataset(parquet, tok, max_length=256, max_samples=1).examples) == 1
    assert len(load_dataset(tmp_path / "saved", tok, max_samples=1).examples) == 1


def test_a_table_with_mixed_shapes_reads_each_row_by_its_own(tmp_path, tok):
    """A table gives every row every column: a null field is an absent one."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet

    table = pa.table(
        {"text": ["plain text", None], "prompt": [None, "Add."], "response": [None, " a + b"], "n": [1, 2]}
    )
    pyarrow.parquet.write_table(table, tmp_path / "mixed.parquet")
    records = [{"text": "plain text"}, {"prompt": "Add.", "response": " a + b"}]
    expected = load_dataset(write_jsonl(tmp_path / "mapped.jsonl", records), tok)
    assert same_examples(load_dataset(tmp_path / "mixed.parquet", tok), expected)


def test_a_conversational_prompt_carries_no_loss_even_on_its_assistant_turns(tmp_path, tok):
    history = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "earlier answer"},
        {"role": "user", "content": "second question"},
    ]
    completion = [{"role": "assistant", "content": "the completion"}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": history, "completion": completion}])
    example = load_dataset(path, tok, max_length=256).examples[0]
    learned = tok.decode([t for t in example.labels if t != IGNORE])
    assert "the completion" in learned and "earlier answer" not in learned and "question" not in learned
    as_messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": history + completion}])
    whole = load_dataset(as_messages, tok, max_length=256).examples[0]
    assert whole.input_ids == example.input_ids  # the same chat; only the loss differs
    assert "earlier answer" in tok.decode([t for t in whole.labels if t != IGNORE])


@pytest.mark.parametrize(
    "record, fragment",
    [
        ({"title": "x", "body": "y"}, "found the fields 'title', 'body'"),
        ({"prompt": "only a prompt"}, "found the fields 'prompt'"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference data"),
        ({"prompt": "p", "completion": "c", "label": True}, "unpaired preference"),
        (
            {"prompt": "p", "completion": [{"role": "assistant", "content": "c"}]},
            "must both be strings or both lists",
        ),
        ({"instruction": "do", "input": 3, "output": "done"}, "'input' must be a string"),
        ({"text": 5}, "'text' must be a string"),
        ([1, 2], "expected an object"),
    ],
)
def test_unknown_shapes_are_refused_in_one_line_naming_the_fields(tmp_path, tok, record, fragment):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, record])
    with pytest.raises(PieceError, match="d.jsonl:2: ") as caught:
        load_dataset(path, tok)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_tables_and_folders_that_are_not_data_are_refused(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    datasets = pytest.importorskip("datasets")
    import pyarrow.parquet

    pyarrow.parquet.write_table(pa.table({"question": ["q"], "answer": ["a"]}), tmp_path / "qa.parquet")
    with pytest.raises(PieceError, match="found the columns 'question', 'answer'; expected 'text'"):
        load_dataset(tmp_path / "qa.parquet", tok)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(PieceError, match="cannot be read as parquet"):
        load_dataset(tmp_path / "broken.parquet", tok)
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a"}])})
    splits["test"] = splits["train"]
    splits.save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(PieceError, match="holds the splits train, test .*e.g. .*splits/train"):
        load_dataset(tmp_path / "splits", tok)
    assert len(load_dataset(tmp_path / "splits" / "train", tok).examples) == 1
    (tmp_path / "plain").mkdir()
    with pytest.raises(PieceError, match="not a dataset saved with datasets' save_to_disk"):
        load_dataset(tmp_path / "plain", tok)
    (tmp_path / "d.csv").write_text("text\nhello\n")
    with pytest.raises(PieceError, match="must be one of .txt, .jsonl, .json, .parquet, .arrow"):
        load_dataset(tmp_path / "d.csv", tok)


def test_without_the_data_extra_a_table_names_what_to_install(tmp_path, tok, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "state.json").write_text('{"_data_files": [{"filename": "x.arrow"}]}')
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(PieceError, match=r"needs pyarrow: pip install 'piece-surgery\[data\]'"):
        load_dataset(tmp_path / "d.parquet", tok)
    with pytest.raises(PieceError, match=r"needs datasets: pip install 'piece-surgery\[data\]'"):
        load_dataset(tmp_path / "saved", tok)


def test_train_reads_a_parquet_file_as_it_reads_the_same_records_in_jsonl(tmp_path, tiny, cli):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet

    rows = [{"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(6)]
    pyarrow.parquet.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    mapped = [{"prompt": r["prompt"], "response": r["completion"]} for r in rows]
    write_jsonl(tmp_path / "qa.jsonl", mapped)
    base = tiny("llama")
    common = ["--max-steps", "2", "--density", "0.01", "--method", "piece-s", "--json", "-q"]
    code, parquet_out, err = cli(
        "train", base, "--data", tmp_path / "qa.parquet", "-o", tmp_path / "a", *common
    )
    assert code == 0, err
    code, jsonl_out, err = cli("train", base, "--data", tmp_path / "qa.jsonl", "-o", tmp_path / "b", *common)
    assert code == 0, err
    a, b = json.loads(parquet_out), json.loads(jsonl_out)
    assert a["final_train_loss"] == b["final_train_loss"] and a["entries"] == b["entries"]
    assert (tmp_path / "a" / "delta.safetensors").read_bytes() == (
        tmp_path / "b" / "delta.safetensors"
    ).read_bytes()
    recorded = json.loads((tmp_path / "a" / "delta.json").read_text())["provenance"]["data"]
    assert recorded["file"] == "qa.parquet" and recorded["sha256"] == sha256(tmp_path / "qa.parquet")
