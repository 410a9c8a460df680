"""eval --record (recipes/evaluate.py, formats/delta_folder.record_evaluation), issue 36: records from
evals that run at once are all kept; a record names the weights it measured and goes into no other
delta; what a killed record left in a delta folder is cleaned by the next one."""

import json
import subprocess
import sys
import threading

import pytest
from helpers import assert_clean_failure, perturb, snapshot

from piece_surgery.formats.delta_folder import load_delta, record_evaluation


@pytest.fixture
def work(tiny, tmp_path, cli, code_data):
    base = tiny("llama")
    tuned = perturb(base, tmp_path / "tuned", fraction=0.02, hard=False)
    assert cli("diff", base, tuned, "-o", tmp_path / "delta", "-q")[0] == 0
    return base, tmp_path / "delta", code_data


def evaluation(delta, label: str) -> dict:
    """A record as eval writes it (the figures made up), for the weights in `delta`."""
    return {
        "gain": 0.5,
        "loss": 1.0,
        "base_loss": 1.5,
        "general": [{"set": label, "tokens": 3, "kl": 0.01, "top1_changed": 0.0}],
        "weights_sha256": load_delta(delta).weights_sha256,
    }


# ---------------------------------------------------------------- item 3: two records at once

# A second process records into the delta, and waits, between reading the folder and replacing
# delta.json, until the file `go` exists.
HOLDER = """
import sys, time
from pathlib import Path
import piece_surgery.formats.delta_folder as folder
delta, work, record = Path(sys.argv[1]), Path(sys.argv[2]), __import__("json").loads(sys.argv[3])
read = folder.load_delta
def read_then_wait(*args, **kwargs):
    loaded = read(*args, **kwargs)
    (work / "read").touch()
    while not (work / "go").exists():
        time.sleep(0.01)
    return loaded
folder.load_delta = read_then_wait
folder.record_evaluation(delta, record)
"""


def test_two_records_into_one_delta_at_once_are_both_kept(work, tmp_path):
    _, delta, _ = work
    first, second = evaluation(delta, "first"), evaluation(delta, "second")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(delta), str(tmp_path), json.dumps(first)], stderr=subprocess.PIPE
    )
    while not (tmp_path / "read").exists():
        assert holder.poll() is None, holder.stderr.read().decode()
    other = threading.Thread(target=record_evaluation, args=(delta, second))
    other.start()
    other.join(timeout=5)  # with the folder taken, it waits for the first (or it ends without it)
    (tmp_path / "go").touch()
    assert holder.wait(timeout=60) == 0, holder.stderr.read().decode()
    other.join()
    sets = [e["general"][0]["set"] for e in load_delta(delta).info.evaluations]
    assert sorted(sets) == ["first", "second"]
    card = (delta / "README.md").read_text()
    assert "first" in card and "second" in card


# ---------------------------------------------------------------- item 4: the weights measured


def test_a_record_for_other_weights_is_refused(work, tmp_path, tiny, cli):
    base, delta, _ = work
    record = evaluation(delta, "set")
    other = perturb(base, tmp_path / "other", fraction=0.02, seed=5, hard=False)
    assert cli("diff", base, other, "-o", delta, "--overwrite", "-q")[0] == 0  # retrained in place
    before = snapshot(delta)
    from piece_surgery.runtime.errors import PieceError

    with pytest.raises(PieceError, match="changed while eval measured it"):
        record_evaluation(delta, record)
    assert snapshot(delta) == before


def test_eval_records_into_the_delta_it_measured_or_none(work, tmp_path, cli, monkeypatch):
    """A delta replaced in its folder while eval measures it (retrained with -o there) gets no
    record of the old one's figures; a delta left alone gets one naming its weights."""
    import piece_surgery.recipes.evaluate as recipe

    base, delta, data = work
    args = ["eval", base, delta, "--data", data, "--general", data, "--record", "-q"]
    assert cli(*args)[0] == 0
    recorded = load_delta(delta).info.evaluations
    assert [e["weights_sha256"] for e in recorded] == [load_delta(delta).weights_sha256]
    measure = recipe.evaluate_candidates
    other = perturb(base, tmp_path / "other", fraction=0.02, seed=5, hard=False)

    def measure_then_replace(*a, **kw):
        measured = measure(*a, **kw)
        assert cli("diff", base, other, "-o", delta, "--overwrite", "-q")[0] == 0
        return measured

    monkeypatch.setattr(recipe, "evaluate_candidates", measure_then_replace)
    result = cli(*args)
    assert_clean_failure(result, "changed while eval measured it")
    assert load_delta(delta).info.evaluations == []  # the new delta: no figures of the old one


def test_the_record_format_names_the_weights():
    from piece_surgery.formats.schema import load_schema, problem

    schema = load_schema("delta.json")
    entry = schema["$defs"]["evaluation"]
    assert "weights_sha256" in entry["properties"]
    bad = {"general": [], "weights_sha256": "not-hex"}
    assert problem(bad, entry, schema) is not None


# ---------------------------------------------------------------- item 12: what a killed record left


def test_a_killed_record_leaves_nothing_the_next_one_does_not_clean(work, tmp_path, cli):
    """A record killed while replacing delta.json or the card leaves a marked temporary in the
    delta folder; the next record removes it (its process is gone), as the README promises."""
    base, delta, data = work
    leave = (
        "import sys; from pathlib import Path; from piece_surgery.io.outputs import _temporary_folder; "
        "_temporary_folder(Path(sys.argv[1]), 'tmp')"
    )
    for name in ("delta.json", "README.md"):
        subprocess.run([sys.executable, "-c", leave, str(delta / name)], check=True)
    assert len([p for p in delta.iterdir() if p.name.startswith(".")]) == 2
    assert cli("eval", base, delta, "--data", data, "--general", data, "--record", "-q")[0] == 0
    assert sorted(p.name for p in delta.iterdir()) == ["README.md", "delta.json", "delta.safetensors"]
