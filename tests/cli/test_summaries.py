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
