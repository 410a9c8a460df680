"""The mask file (the same mask makes the same bytes) and the cards written beside artifacts."""

import json

from piece_surgery.formats.mask import load_mask, save_mask


def test_the_same_mask_writes_the_same_bytes(tiny, code_data, tmp_path, cli):
    """safetensors (0.8) writes header metadata in a hash map's order, different from one write to
    the next: a mask's header is sorted, so a mask compares by its bytes (sha256), and still loads."""
    out = tmp_path / "m.safetensors"
    assert cli("score", tiny("llama"), "--data", code_data, "-o", out, "-q", "--retain", "general")[0] == 0
    mask = load_mask(out)
    copies = [tmp_path / f"copy{i}.safetensors" for i in range(6)]
    for copy in copies:
        save_mask(mask, copy)
    written = {copy.read_bytes() for copy in [out, *copies]}
    assert len(written) == 1
    raw = out.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    keys = list(header["__metadata__"])
    assert len(keys) > 2 and keys == sorted(keys)
    again = load_mask(copies[-1])
    assert again.info == mask.info and all(again.indices[k].equal(v) for k, v in mask.indices.items())


def test_a_cards_cells_escape_the_names_read_from_files():
    """eval --record's table in a delta's card (what push uploads): a newline or `|` in a file's name
    would end the row or add a cell, an ESC would go to whoever cats the card."""
    from piece_surgery.formats.card import evaluation_lines

    measured = {
        "data": {"file": "a|b\nerror: x.jsonl", "tokens": 3},
        "gain": 0.1,
        "general": [{"set": "g\x1b[2J", "tokens": 2, "kl": 0.01, "top1_changed": 0.0}],
    }
    row = evaluation_lines([measured])[-2]
    assert row.startswith("| a\\|b\\nerror: x.jsonl (3 tokens) | 0.1000 | g\\x1b[2J (2 tokens) |")
    assert "\n" not in row and "\x1b" not in row and row.count(" | ") == 4
