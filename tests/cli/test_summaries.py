"""What a command tells of its run: the examples it skipped, the length it cut at (review fixB)."""

import json

from piece_surgery.formats.delta_folder import load_delta

NO_ASSISTANT = '{"messages": [{"role": "user", "content": "hi there"}]}'


def with_unlabelled(code_data, tmp_path):
    """code_data and two chats with no assistant turn (no loss-bearing token: skipped)."""
    path = tmp_path / "mixed.jsonl"
    path.write_text(code_data.read_text() + "\n" + NO_ASSISTANT + "\n" + NO_ASSISTANT + "\n")
    return path


def test_train_says_how_many_examples_it_skipped_and_why(tiny, code_data, tmp_path, cli):
    base, data = tiny("llama"), with_unlabelled(code_data, tmp_path)
    code, out, err = cli("train", base, "--data", data, "-o", tmp_path / "d", "--max-steps", "1")
    assert code == 0, err
    assert "trained on 5 examples; skipped 2 with no loss-bearing token" in out
    code, out, err = cli("train", base, "--data", data, "-o", tmp_path / "d2", "--max-steps", "1", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["examples"], report["skipped_examples"]) == (5, 2)
    recorded = load_delta(tmp_path / "d2").info.provenance.data
    assert (recorded.examples, recorded.skipped) == (5, 2)
    code, out, err = cli("train", base, "--data", code_data, "-o", tmp_path / "d3", "--max-steps", "1")
    assert code == 0, err
    assert "skipped" not in out

    # eval --json: the examples measured and those skipped, per set
    code, out, err = cli("eval", base, tmp_path / "d2", "--data", data, "--general", code_data, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["data"]["examples"], report["data"]["skipped"]) == (5, 2)
    assert (report["general"][0]["examples"], report["general"][0]["skipped"]) == (5, 0)


def test_a_max_length_past_the_context_is_said_once_and_errors_agree(tiny, code_data, tmp_path, cli):
    base, note = tiny("llama"), "warning: --max-length 100000 is more than the model's 128 positions"
    args = ["--data", code_data, "--eval-data", code_data, "--max-steps", "1"]
    code, _, err = cli("train", base, *args, "-o", tmp_path / "d", "--max-length", "100000")
    assert code == 0, err
    assert err.count(note) == 1, err  # two data files read, one note
    code, _, err = cli("train", base, *args, "-o", tmp_path / "d2")
    assert code == 0, err
    assert "is more than the model's" not in err  # the default is cut silently, as its help says
    # a prompt that fills the context: the error names the length the examples were cut at, and why
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 400, "response": "x"}) + "\n")
    code, _, err = cli(
        "score", base, "--data", long, "-o", tmp_path / "m.safetensors", "--max-length", "100000"
    )
    assert code == 2 and note in err, err
    assert "after truncation to 128 tokens, the model's context" in err, err


def test_a_cause_is_named_as_it_is(tiny, tmp_path, cli):
    from helpers import assert_clean_failure

    base, mask = tiny("llama"), tmp_path / "m.safetensors"
    chats = tmp_path / "chats.jsonl"
    chats.write_text(NO_ASSISTANT + "\n" + NO_ASSISTANT + "\n")
    line = assert_clean_failure(cli("score", base, "--data", chats, "-o", mask), "has an assistant turn")
    assert "truncation" not in line, line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b c"}\n{x\n')
    line = assert_clean_failure(
        cli("score", base, "--data", bad, "-o", mask), "bad.jsonl:2: is not valid JSON"
    )
    assert "(column 2)" in line and "line 1" not in line, line


def test_records_in_memory_name_the_record_a_chat_error_is_in(tiny):
    import pytest

    from piece_surgery.data.dataset import dataset_from_records, load_tokenizer
    from piece_surgery.runtime.errors import PieceError

    parts = [{"type": "text", "text": "ok"}]
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": parts}]}
    with pytest.raises(PieceError, match=r"^mine, record 2: the tokenizer's chat template drops"):
        dataset_from_records(["hello world", chat], load_tokenizer(tiny("llama")), name="mine")


def test_names_from_a_file_are_printed_escaped_never_as_terminal_commands(tiny, code_data, tmp_path, cli):
    """A tensor name is the file's text: inspect's table and lines print its control codes escaped
    (ESC would start a terminal command) and its brackets as they are (never rich markup)."""
    import dataclasses

    from piece_surgery.formats.mask import load_mask, save_mask

    hostile = "model.\x1b[2J\x1b]0;pwned\x07[red]x[/red]\u202e\nerror: forged.weight"
    out = tmp_path / "m.safetensors"
    assert cli("score", tiny("llama"), "--data", code_data, "-o", out, "-q")[0] == 0
    mask = load_mask(out)
    name = next(iter(mask.indices))
    renamed = lambda d: {hostile if k == name else k: v for k, v in d.items()}  # noqa: E731
    fisher = renamed(mask.fisher) if mask.fisher is not None else None
    odd = dataclasses.replace(mask, indices=renamed(mask.indices), shapes=renamed(mask.shapes), fisher=fisher)
    save_mask(odd, tmp_path / "odd.safetensors")
    code, shown, err = cli("inspect", tmp_path / "odd.safetensors")
    assert code == 0, err
    assert not any(c in shown for c in "\x1b\x07\u202e")
    assert "\\x1b[2J\\x1b]0;pwned\\x07[red]x[/red]\\u202e\\nerror: forged" in shown.replace("\n", "")
    assert not any(line.startswith("error: forged") for line in shown.splitlines())
    family = (
        tmp_path / "fam\U0001f468\u200d\U0001f469\u200d\U0001f467.safetensors"
    )  # joined emoji: as written
    code, shown, err = cli("score", tiny("llama"), "--data", code_data, "-o", family)
    assert code == 0, err
    assert family.name in shown and "\\u200d" not in shown
