"""The mask file: the same mask makes the same bytes."""

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
