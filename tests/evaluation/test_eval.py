"""`eval`: what a delta learned and forgot, against an independent computation; in memory as in a
merged folder; recorded in the delta; measured during training; refused in one line when wrong."""

import json
import shutil

import pytest
import torch
from helpers import assert_clean_failure, perturb, read_all

from piece_surgery.data.dataset import load_dataset, load_tokenizer
from piece_surgery.models.loading import load_causal_lm


@pytest.fixture
def setup(tiny, tmp_path, cli, code_data):
    base = tiny("llama")
    tuned = perturb(base, tmp_path / "tuned", fraction=0.05, seed=3, hard=False)
    assert cli("diff", base, tuned, "-o", tmp_path / "delta", "-q")[0] == 0
    general = tmp_path / "general.txt"
    general.write_text(
        "The quick brown fox jumps over the lazy dog.\nRivers flow to the sea, and the sea is deep.\n"
    )
    return base, tuned, tmp_path / "delta", general


def brute_force(base, tuned, data):
    """Per example, unpadded: token losses of both models, KL(base || tuned), top-1 changes."""
    tokenizer = load_tokenizer(base)
    examples = load_dataset(data, tokenizer).examples
    models = [
        load_causal_lm(m, dtype=torch.float32, device=torch.device("cpu")).eval() for m in (base, tuned)
    ]
    sums = {"tokens": 0, "base_loss": 0.0, "loss": 0.0, "kl": 0.0, "top1": 0}
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.input_ids])
            targets = torch.tensor(e.labels[1:])
            keep = targets != -100
            lb, lt = (torch.log_softmax(m(input_ids=ids).logits[0, :-1][keep].double(), -1) for m in models)
            t = targets[keep]
            sums["tokens"] += int(keep.sum())
            sums["base_loss"] -= float(lb.gather(1, t[:, None]).sum())
            sums["loss"] -= float(lt.gather(1, t[:, None]).sum())
            sums["kl"] += float((lb.exp() * (lb - lt)).sum())
            sums["top1"] += int((lb.argmax(-1) != lt.argmax(-1)).sum())
    n = sums["tokens"]
    return {
        "tokens": n,
        "base_loss": sums["base_loss"] / n,
        "loss": sums["loss"] / n,
        "kl": sums["kl"] / n,
        "top1": sums["top1"] / n,
    }


def run_eval(cli, *args) -> dict:
    code, stdout, stderr = cli("eval", *args, "--json", "-q")
    assert code == 0, stderr
    return json.loads(stdout)


def test_figures_match_an_independent_computation(setup, cli, code_data):
    base, tuned, delta, general = setup
    result = run_eval(cli, base, delta, "--data", code_data, "--general", general)
    row = result["candidates"][0]
    domain, drift = brute_force(base, tuned, code_data), brute_force(base, tuned, general)
    assert row["kind"] == "delta" and row["changes_outputs"]
    assert row["loss"] == pytest.approx(domain["loss"], rel=1e-5)
    assert row["base_loss"] == pytest.approx(domain["base_loss"], rel=1e-5)
    assert row["gain"] == pytest.approx(domain["base_loss"] - domain["loss"], rel=1e-4, abs=1e-6)
    (g,) = row["general"]
    assert g["tokens"] == drift["tokens"] and row["tokens"] == domain["tokens"] + drift["tokens"]
    assert row["drift"] == g["kl"] == pytest.approx(drift["kl"], rel=1e-4, abs=1e-9)
    assert g["loss"] == pytest.approx(drift["loss"], rel=1e-5)
    assert row["top1_changed"] == pytest.approx(drift["top1"])


def test_a_delta_in_memory_measures_as_its_merged_folder(setup, tmp_path, cli, code_data):
    """The delta is switched into the one loaded base; the merged folder is loaded beside it: the
    logits are the same bits, so every figure is the same number."""
    base, _, delta, general = setup
    assert cli("apply", base, delta, "-o", tmp_path / "merged", "-q")[0] == 0
    result = run_eval(cli, base, delta, tmp_path / "merged", "--data", code_data, "--general", general)
    in_memory, merged = result["candidates"]
    assert merged["kind"] == "checkpoint"
    for key in ("gain", "loss", "base_loss", "drift", "top1_changed", "tokens", "general"):
        assert in_memory[key] == merged[key], key


def test_a_candidate_that_changes_nothing_is_said_to(setup, tmp_path, cli):
    base, _, delta, general = setup
    copy = shutil.copytree(base, tmp_path / "copy")
    code, stdout, _ = cli("eval", base, copy, delta, "--general", general)
    assert code == 0 and "copy: identical to the base on every token measured" in stdout
    result = run_eval(cli, base, copy, "--general", general)
    assert result["candidates"][0]["changes_outputs"] is False and result["candidates"][0]["drift"] == 0.0


def test_the_table_shows_every_general_set_of_every_candidate_and_record_says_where(setup, tmp_path, cli):
    base, _, delta, general = setup
    other = tmp_path / "other.txt"
    other.write_text("Numbers count up: one, two, three, four.\n")
    copy = shutil.copytree(base, tmp_path / "copy")  # identical to the base: its zeros shown too
    code, stdout, err = cli("eval", base, copy, delta, "--general", general, "--general", other, "--record")
    assert code == 0, err
    lines = stdout.splitlines()
    for name in (general.name, other.name):
        assert sum(name in line for line in lines) == 2, stdout  # a row per candidate
    (recorded,) = [line for line in lines if line.startswith("recorded")]
    assert recorded.endswith(str(delta)) and "[" not in recorded


def test_self_text_is_the_default_general_set(setup, cli):
    base, _, delta, _ = setup
    result = run_eval(cli, base, delta, "--self-samples", "3", "--self-length", "9")
    assert result["general"][0]["file"] == "self" and result["general"][0]["examples"] == 3
    assert result["candidates"][0]["general"][0]["tokens"] == 3 * 9


def test_recorded_figures_travel_with_the_delta(setup, tmp_path, cli, code_data):
    base, tuned, delta, general = setup
    before = json.loads((delta / "delta.json").read_text())
    assert cli("apply", base, delta, "-o", tmp_path / "merged", "-q")[0] == 0
    run_eval(cli, base, delta, tmp_path / "merged", "--data", code_data, "--general", general, "--record")
    after = json.loads((delta / "delta.json").read_text())
    assert after["weights_sha256"] == before["weights_sha256"] and after["tensors"] == before["tensors"]
    (record,) = after["evaluations"]
    assert record["data"] == {
        "file": code_data.name,
        "sha256": record["data"]["sha256"],
        "tokens": record["data"]["tokens"],
    }
    assert record["general"][0]["set"] == general.name and str(tmp_path) not in json.dumps(record)
    assert "What it learned and what it kept" in (delta / "README.md").read_text()
    code, stdout, _ = cli("inspect", delta, "--json")
    assert json.loads(stdout)["evaluations"] == [record]
    # the delta is the same delta: it applies as before, bit for bit
    assert cli("apply", base, delta, "-o", tmp_path / "again", "-q")[0] == 0
    assert all(
        torch.equal(a, b)
        for a, b in zip(read_all(tmp_path / "again").values(), read_all(tuned).values(), strict=True)
    )


def test_training_measures_its_drift_as_eval_does(tiny, tmp_path, cli, code_data):
    base = tiny("llama")
    out = tmp_path / "d"
    args = ["train", base, "--data", code_data, "-o", out, "--lr", "1e-2", "--max-steps", "4", "-q", "--json"]
    code, stdout, err = cli(*args, "--eval-general", "self", "--eval-every", "2")
    assert code == 0, err
    trained = json.loads(stdout)
    measured = run_eval(cli, base, out, "--general", "self")["candidates"][0]["drift"]
    assert trained["measured_drift"] == pytest.approx(measured, rel=1e-6) and measured > 0
    assert (
        json.loads((out / "delta.json").read_text())["provenance"]["measured_drift"]
        == trained["measured_drift"]
    )


def test_drift_budget_keeps_the_last_step_measured_within_it(tiny, tmp_path, cli, code_data):
    """By default --drift-budget measures the KL on the shipped general set; a run that passes the
    budget at step 3 must give exactly the delta of a run asked for 2 steps (same data order)."""
    base = tiny("llama")
    common = ["train", base, "--data", code_data, "--lr", "1e-2", "--batch-size", "1", "-q", "--json"]
    measured = {}
    for steps in (2, 3):
        out = tmp_path / f"steps{steps}"
        code, stdout, err = cli(*common, "-o", out, "--max-steps", str(steps), "--eval-general", "general")
        assert code == 0, err
        measured[steps] = json.loads(stdout)["measured_drift"]
    assert 0 < measured[2] < measured[3]
    budget = (measured[2] + measured[3]) / 2
    out = tmp_path / "budget"
    code, stdout, err = cli(*common, "-o", out, "--max-steps", "6", "--drift-budget", str(budget))
    assert code == 0, err
    report = json.loads(stdout)
    assert report["stopped_by_drift_budget"] and report["steps"] == 2
    assert report["drift_budget_passed"]["step"] == 3
    assert report["drift_budget_passed"]["drift"] == pytest.approx(measured[3], rel=1e-9)
    assert report["measured_drift"] == pytest.approx(measured[2], rel=1e-9)
    kept, asked = read_all(out), read_all(tmp_path / "steps2")
    assert kept.keys() == asked.keys() and all(torch.equal(kept[n], asked[n]) for n in kept)
    provenance = json.loads((out / "delta.json").read_text())["provenance"]
    assert provenance["eval_general"]["file"] == "general" and provenance["steps"] == 2
    assert provenance["hyperparameters"]["eval_every"] == 1  # a tenth of 6 steps, rounded up
    # a budget the first measurement already passes leaves nothing to keep: refused, nothing written
    assert_clean_failure(
        cli(*common, "-o", tmp_path / "none", "--max-steps", "3", "--drift-budget", "1e-12"),
        "nothing to keep",
        output=tmp_path / "none",
    )


@pytest.mark.parametrize("arch, include", [("llama", "norm"), ("gpt2", "wte"), ("llama", ".")])
def test_training_measures_drift_in_every_kind_of_tensor(tiny, tmp_path, cli, code_data, arch, include):
    """Norm gains and shared (tied) weights take the trained values inside their forward: the base
    pass must hold the base's values there too, so train's drift is eval's on the same delta."""
    base, out = tiny(arch), tmp_path / "d"
    mask = tmp_path / "m.safetensors"
    assert (
        cli("score", base, "--method", "random", "--include", include, "--density", "0.2", "-o", mask)[0] == 0
    )
    args = ["--mask", mask, "--lr", "0.1", "--max-steps", "3", "-q", "--json", "--eval-general", "general"]
    code, stdout, err = cli("train", base, "--data", code_data, "-o", out, *args)
    assert code == 0, err
    trained = json.loads(stdout)["measured_drift"]
    measured = run_eval(cli, base, out, "--general", "general")["candidates"][0]["drift"]
    assert measured > 0 and trained == pytest.approx(measured, rel=1e-6)


def test_a_budgeted_run_checks_its_last_step_and_resumes_as_it_would_have_run(
    tiny, tmp_path, cli, code_data, monkeypatch
):
    import piece_surgery.training.loop as train_module

    base = tiny("llama")
    common = ["train", base, "--data", code_data, "--lr", "1e-2", "--batch-size", "1", "-q", "--json"]
    drifts = {}
    for steps in (2, 4):
        code, stdout, err = cli(
            *common, "-o", tmp_path / f"s{steps}", "--max-steps", str(steps), "--eval-general", "general"
        )
        assert code == 0, err
        drifts[steps] = json.loads(stdout)["measured_drift"]
    assert 0 < drifts[2] < drifts[4]
    budget = str((drifts[2] + drifts[4]) / 2)
    # measured only at the last step (the period is longer than the run): still checked
    assert_clean_failure(
        cli(
            *common,
            "-o",
            tmp_path / "late",
            "--max-steps",
            "4",
            "--eval-every",
            "9",
            "--drift-budget",
            budget,
        ),
        "nothing to keep",
        output=tmp_path / "late",
    )
    args = ["--max-steps", "8", "--eval-every", "2", "--drift-budget", budget]
    code, stdout, err = cli(*common, "-o", tmp_path / "straight", *args)
    straight_report = json.loads(stdout)
    assert code == 0 and straight_report["steps"] == 2, err
    straight = read_all(tmp_path / "straight")
    assert all(torch.equal(straight[k], read_all(tmp_path / "s2")[k]) for k in straight)
    original = train_module.save_state
    # interrupted after the state of step 3 (within the budget: it carries step 2's values along),
    # or of step 4 (already past it), then resumed: the same delta and report either way
    for save_every in (3, 4):

        def save_then_crash(state_dir, sparse, optimizer, step, *rest, at=save_every):
            original(state_dir, sparse, optimizer, step, *rest)
            if step == at:
                raise KeyboardInterrupt

        out = tmp_path / f"resumed{save_every}"
        monkeypatch.setattr(train_module, "save_state", save_then_crash)
        assert cli(*common, "-o", out, *args, "--save-every", str(save_every))[0] == 130
        monkeypatch.setattr(train_module, "save_state", original)
        code, stdout, err = cli(*common, "-o", out, *args, "--save-every", str(save_every), "--resume")
        assert code == 0, err
        report = json.loads(stdout)
        assert report["resumed_from"] == save_every and report["steps"] == 2
        assert report["drift_budget_passed"] == straight_report["drift_budget_passed"]
        assert report["measured_drift"] == straight_report["measured_drift"]
        resumed = read_all(out)
        assert straight.keys() == resumed.keys() and all(
            torch.equal(straight[k], resumed[k]) for k in straight
        )
    # a budget passed at once, with a saved state: no delta, and the state is named
    line = assert_clean_failure(
        cli(
            *common,
            "-o",
            tmp_path / "none",
            "--max-steps",
            "3",
            "--save-every",
            "1",
            "--drift-budget",
            "1e-12",
        ),
        "nothing to keep",
        output=tmp_path / "none",
    )
    assert "none.state" in line and "--resume" in line
    # as it says: a higher budget continues the state
    code, stdout, err = cli(
        *common, "-o", tmp_path / "none", "--max-steps", "3", "--drift-budget", "1e9", "--resume"
    )
    assert code == 0 and json.loads(stdout)["steps"] == 3, err


def test_a_run_resumed_at_its_last_step_reports_what_that_step_measured(
    tiny, tmp_path, cli, code_data, monkeypatch
):
    import piece_surgery.training.loop as train_module

    base = tiny("llama")
    args = ["train", base, "--data", code_data, "--lr", "1e-2", "--max-steps", "2", "-q", "--json"]
    args += ["--eval-general", "general", "--eval-data", code_data, "--eval-every", "1", "--save-every", "2"]
    code, stdout, err = cli(*args, "-o", tmp_path / "straight")
    assert code == 0, err
    original = train_module.save_state

    def save_then_crash(state_dir, sparse, optimizer, step, *rest):
        original(state_dir, sparse, optimizer, step, *rest)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_state", save_then_crash)
    assert cli(*args, "-o", tmp_path / "resumed")[0] == 130
    monkeypatch.setattr(train_module, "save_state", original)
    code, resumed, err = cli(*args, "-o", tmp_path / "resumed", "--resume")
    assert code == 0, err
    straight, resumed = json.loads(stdout), json.loads(resumed)
    assert resumed["resumed_from"] == 2 and resumed["measured_drift"] is not None
    for key in ("measured_drift", "final_eval_loss", "final_train_loss"):
        assert resumed[key] == straight[key]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("--budget-on", "measured"), "give --drift-budget too"),
        (("--budget-on", "predicted", "--drift-budget", "0.1", "--method", "piece-s"), "retain Fisher"),
        (("--eval-every", "2"), "--eval-every needs --eval-data or --eval-general"),
    ],
)
def test_training_measurement_options_are_checked_first(tiny, tmp_path, cli, code_data, args, fragment):
    out = tmp_path / "d"
    assert_clean_failure(
        cli("train", tiny("llama"), "--data", code_data, "-o", out, *args), fragment, output=out
    )


def test_a_drift_set_neither_file_nor_word_names_the_words_before_data_is_read(tiny, tmp_path, cli):
    base, missing = tiny("llama"), tmp_path / "missing.jsonl"  # read first, were the word not checked
    words = "give a data file, self (text the model writes itself) or general"
    failure = cli("eval", base, base, "--data", missing, "--general", "self", "--general", "chat")
    assert "--general 'chat': no such data file" in assert_clean_failure(failure, words)
    out = tmp_path / "d"
    failure = cli("train", base, "--data", missing, "--eval-general", "chat", "-o", out)
    assert "--eval-general 'chat'" in assert_clean_failure(failure, words, output=out)


def test_bad_eval_inputs_are_one_line(setup, tmp_path, cli, tiny, code_data):
    base, _, delta, general = setup
    other = tiny("llama", seed=1)
    assert_clean_failure(cli("eval", other, delta, "--general", general), "was not made from this model")
    (tmp_path / "empty.txt").write_text("\n\n")
    assert_clean_failure(cli("eval", base, delta, "--data", tmp_path / "empty.txt"), "has no examples")
    # a prompt so long that truncation leaves no response token to measure
    (tmp_path / "nothing.jsonl").write_text(json.dumps({"prompt": "word " * 64, "response": "x"}) + "\n")
    failure = cli("eval", base, delta, "--general", tmp_path / "nothing.jsonl", "--max-length", "16")
    assert_clean_failure(failure, "loss-bearing token")
    assert_clean_failure(cli("eval", base, tmp_path / "missing"), "not found")
    assert_clean_failure(cli("eval", base, base, "--record"), "no candidate is one")
    result = cli("eval", base, delta, "--data", code_data, "--plot", tmp_path / "figure.jpg")
    assert_clean_failure(result, "a .png image")
    assert_clean_failure(cli("eval", base, delta, "--tasks-path", tmp_path), "--tasks-path does nothing")


def test_tasks_without_lm_eval_say_how_to_install(setup, cli, monkeypatch):
    import sys

    base, _, delta, general = setup
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    assert_clean_failure(
        cli("eval", base, delta, "--tasks", "anything"), "pip install 'piece-surgery[lm-eval]'"
    )


def test_a_plot_of_gain_against_drift(setup, tmp_path, cli, code_data):
    base, _, delta, general = setup
    out = tmp_path / "frontier.png"
    result = cli("eval", base, delta, "--data", code_data, "--general", general, "--plot", out, "-q")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert_clean_failure(result, "pip install 'piece-surgery[plot]'", output=out)
        return
    assert result[0] == 0 and out.read_bytes().startswith(b"\x89PNG")


def test_lm_eval_tasks_run_on_every_candidate(setup, tmp_path, cli):
    """A task of our own (lm-eval's include_path), on a data file the test writes: the base and the
    delta get their accuracy, the delta switched in on the one base."""
    pytest.importorskip("lm_eval")
    base, tuned, delta, _ = setup
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [
        {"question": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1)], "label": 0}
        for a in range(1, 5)
        for b in range(2, 6)
    ]
    (tasks / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "sums.yaml").write_text(
        "task: tiny_sums\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'sums.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n"
    )
    result = run_eval(cli, base, delta, "--tasks", "tiny_sums", "--tasks-path", tasks, "--device", "cpu")
    assert set(result["tasks"]) == {"base", str(delta)}
    # the delta switched in on the base scores as the tuned model, by lm-eval's rule computed here
    for name, model in (("base", base), (str(delta), tuned)):
        expected = choice_accuracy(model, rows)
        assert result["tasks"][name]["tiny_sums"]["acc,none"] == pytest.approx(expected)
    assert_clean_failure(cli("eval", base, delta, "--tasks", "no_such_task_anywhere"), "knows no task")


def choice_accuracy(model_path, rows) -> float:
    """Multiple-choice accuracy as lm-eval defines it: the choice (after a space) with the highest
    summed log-probability given the question, the pair encoded whole and split where the question's
    own tokens end, no special tokens."""
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path, dtype=torch.float32, device=torch.device("cpu")).eval()
    right = 0
    for row in rows:
        scores = []
        for choice in row["choices"]:
            context = tokenizer(row["question"], add_special_tokens=False)["input_ids"]
            whole = tokenizer(row["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(context), len(whole))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == row["label"])
    return right / len(rows)


def test_what_a_review_found_is_refused_in_one_line(setup, tmp_path, cli, code_data, monkeypatch):
    """The same candidate or set twice (however spelled), two sets of one name, --plot without
    --data, and a record into a delta that cannot be written: refused before any work."""
    base, _, delta, general = setup
    monkeypatch.chdir(tmp_path)
    for spelling in ("./delta/", "delta/../delta"):
        result = cli("eval", base, "delta", spelling, "--data", code_data, "--general", general)
        assert_clean_failure(result, "again; give each once")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(general, other / general.name)
    result = cli("eval", base, delta, "--general", general, "--general", other / general.name)
    assert_clean_failure(result, "share the name 'general.txt'")
    result = cli("eval", base, delta, "--general", general, "--plot", tmp_path / "p.png")
    assert_clean_failure(result, "add --data", output=tmp_path / "p.png")
    before = {p.name: p.read_bytes() for p in delta.iterdir()}

    def unwritable(*args, dir=None, **kwargs):
        raise PermissionError(13, "Operation not permitted", str(dir))

    import tempfile

    monkeypatch.setattr(tempfile, "mkstemp", unwritable)
    result = cli("eval", base, delta, "--data", code_data, "--general", general, "--record")
    assert_clean_failure(result, "--record cannot write into delta")
    assert {p.name: p.read_bytes() for p in delta.iterdir()} == before


@pytest.mark.parametrize(
    "entry",
    [
        {"gain": "abc", "general": [], "data": None},
        {"gain": 0.1, "general": 5, "data": None},
        {"gain": 0.1, "general": [{"set": "g", "tokens": 3, "kl": "x", "top1_changed": 0}], "data": None},
        {"gain": 0.1, "general": [], "data": 3},
    ],
)
def test_a_hand_edited_record_is_one_line_everywhere(setup, tmp_path, cli, code_data, entry):
    base, _, delta, general = setup
    edited = shutil.copytree(delta, tmp_path / "edited")
    description = json.loads((edited / "delta.json").read_text())
    description["evaluations"] = [entry]
    (edited / "delta.json").write_text(json.dumps(description))
    assert_clean_failure(cli("inspect", edited), "evaluations[0]")
    result = cli("eval", base, edited, "--data", code_data, "--general", general, "--record")
    assert_clean_failure(result, "evaluations[0]")


def test_quiet_keeps_the_table(setup, cli, code_data):
    base, _, delta, general = setup
    code, stdout, _ = cli("eval", base, delta, "--data", code_data, "--general", general, "-q")
    assert code == 0 and "general.txt" in stdout and "drift (KL)" in stdout and "gain" in stdout
