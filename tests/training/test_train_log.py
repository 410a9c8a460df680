"""The training log: every step's loss, learning rate, gradient norm and drift in the delta's
provenance and in train --json, checked against a recomputation outside the trainer; --report-to
TensorBoard and W&B (offline) through their own libraries; inspect --plot."""

import json
import math
import sys

import pytest
import torch
from helpers import assert_clean_failure, perturb
from safetensors.torch import load_file

from piece_surgery.data.dataset import load_dataset
from piece_surgery.formats.delta import TrainLog

TEXTS = [
    "def add(a, b):\n    return a + b",
    "import os\nclass Model:\n    pass",
    "x = [i * i for i in range(9)]",
]


@pytest.fixture
def setup(tmp_path, tiny, cli):
    base = tiny("llama")
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    general = tmp_path / "general.txt"
    general.write_text("The quick brown fox jumps over the lazy dog.\nRivers flow to the sea.\n")
    mask = tmp_path / "mask.safetensors"
    code, _, err = cli(
        "score", base, "--data", data, "-o", mask, "--method", "piece-s", "--density", "0.02", "-q"
    )
    assert code == 0, err
    return base, data, general, mask


def train_json(cli, base, data, mask, out, steps, *extra) -> dict:
    # a batch larger than the data: every step's batch is the whole data set
    code, stdout, err = cli(
        "train", base, "--data", data, "--mask", mask, "-o", out, "--max-steps", steps,
        "--batch-size", "8", "--lr", "1e-2", "--warmup-steps", "2", "--json", "-q", *extra,
    )  # fmt: skip
    assert code == 0, err
    return json.loads(stdout)


def mean_token_loss(folder, data) -> float:
    """The mean token loss of a checkpoint on the data, with transformers alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    examples = load_dataset(data, AutoTokenizer.from_pretrained(folder)).examples
    total, tokens = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logits = model(torch.tensor([e.input_ids])).logits[0, :-1].double()
            labels = torch.tensor(e.labels[1:])
            keep = labels != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            tokens += int(keep.sum())
    return total / tokens


def test_the_log_holds_every_step_as_a_recomputation_gives_it(setup, tmp_path, cli):
    base, data, general, mask = setup
    report = train_json(
        cli, base, data, mask, tmp_path / "d3", "3", "--eval-general", general, "--eval-every", "2"
    )
    log = report["log"]
    assert log["step"] == [1, 2, 3] and report["ranks"] == 1
    assert log["lr"] == pytest.approx([0.005, 0.01, 0.01])  # warm-up over 2 steps, then constant
    # step k's loss is that of the values after k - 1 steps: the merged delta of a (k - 1)-step run
    losses = [mean_token_loss(base, data)]
    for k in (1, 2):
        train_json(cli, base, data, mask, tmp_path / f"d{k}", str(k))
        code, _, err = cli("apply", base, tmp_path / f"d{k}", "-o", tmp_path / f"m{k}", "-q")
        assert code == 0, err
        losses.append(mean_token_loss(tmp_path / f"m{k}", data))
    assert log["loss"] == pytest.approx(losses, rel=1e-5)
    assert report["first_train_loss"] == pytest.approx(losses[0], rel=1e-6)
    # step 1's gradient norm: the base's dense gradient at the mask's entries
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    examples = load_dataset(data, AutoTokenizer.from_pretrained(base)).examples
    summed, tokens = 0.0, sum(e.loss_tokens for e in examples)
    for e in examples:
        logits = model(torch.tensor([e.input_ids])).logits[0, :-1]
        summed = summed + torch.nn.functional.cross_entropy(
            logits, torch.tensor(e.labels[1:]), reduction="sum"
        )
    (summed / tokens).backward()
    params = dict(model.named_parameters())
    selected = load_file(mask)
    norm = math.sqrt(
        sum(float(params[n].grad.reshape(-1)[i.long()].double().pow(2).sum()) for n, i in selected.items())
    )
    assert log["grad_norm"][0] == pytest.approx(norm, rel=1e-4)
    # the drift, measured at steps 2 and 3 (the last), is what eval measures on the same text
    assert log["measured_drift"][0] is None and None not in log["measured_drift"][1:]
    code, stdout, err = cli("eval", base, tmp_path / "d3", "--general", general, "--json", "-q")
    assert code == 0, err
    assert log["measured_drift"][2] == pytest.approx(json.loads(stdout)["candidates"][0]["drift"], rel=1e-4)
    assert log["predicted_drift"] is None and log["eval_loss"] is None
    # the delta records the same log, and reads it back
    provenance = json.loads((tmp_path / "d3" / "delta.json").read_text())["provenance"]
    assert provenance["log"] == log and provenance["ranks"] == 1
    rows = TrainLog.from_json(provenance["log"]).rows()
    assert [r["step"] for r in rows] == [1, 2, 3] and "measured_drift" not in rows[0]
    code, stdout, _ = cli("inspect", tmp_path / "d3")
    assert code == 0 and "trained 3 steps in one process" in stdout


def test_report_to_writes_tensorboard_and_wandb_only_when_asked(setup, tmp_path, cli, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base, data, _, mask = setup
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    quiet = train_json(cli, base, data, mask, tmp_path / "plain", "2")
    assert not (tmp_path / "plain.logs").exists() and not (tmp_path / "wandb").exists()
    report = train_json(cli, base, data, mask, tmp_path / "d", "3", "--report-to", "tensorboard,wandb")
    assert report["log"]["loss"][:2] == quiet["log"]["loss"]  # reporting changes nothing trained
    events = EventAccumulator(str(tmp_path / "d.logs"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in logged] == [1, 2, 3]
    assert [v for _, v in logged] == pytest.approx(report["log"]["loss"], rel=1e-6)
    assert [e.value for e in events.Scalars("train/grad_norm")] == pytest.approx(
        report["log"]["grad_norm"], rel=1e-6
    )
    runs = list((tmp_path / "d.logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    custom = tmp_path / "elsewhere"
    train_json(
        cli, base, data, mask, tmp_path / "e", "1", "--report-to", "tensorboard", "--logging-dir", custom
    )
    assert list(custom.glob("events.out.tfevents.*")) and not (tmp_path / "e.logs").exists()


def test_report_to_mistakes_are_one_line(setup, tmp_path, cli, monkeypatch):
    base, data, _, mask = setup
    args = ["train", base, "--data", data, "--mask", mask, "--max-steps", "1"]
    out = tmp_path / "d"
    assert_clean_failure(
        cli(*args, "-o", out, "--report-to", "mlflow"), "unknown --report-to 'mlflow'", output=out
    )
    assert_clean_failure(
        cli(*args, "-o", out, "--logging-dir", tmp_path / "logs"), "give --report-to too", output=out
    )
    assert_clean_failure(
        cli(*args, "-o", out, "--report-to", "tensorboard", "--logging-dir", data.parent),
        "overlaps input",
        output=out,
    )
    # the delta folder (or its state folder) replaces whatever is there: the logs would be lost, and
    # the delta was refused at the end as "written by another command"
    for logs in (out, out / "logs", tmp_path / "d.state"):
        assert_clean_failure(
            cli(*args, "-o", out, "--report-to", "tensorboard", "--logging-dir", logs),
            "--logging-dir",
            output=out,
        )
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert_clean_failure(
        cli(*args, "-o", out, "--report-to", "tensorboard"),
        "needs tensorboard: pip install 'piece-surgery[tensorboard]'",
        output=out,
    )


def test_inspect_plot_draws_a_trained_deltas_log(setup, tmp_path, cli, monkeypatch):
    pytest.importorskip("matplotlib")
    base, data, general, mask = setup
    train_json(cli, base, data, mask, tmp_path / "d", "3", "--eval-general", general, "--eval-every", "1")
    code, stdout, err = cli("inspect", tmp_path / "d", "--plot", tmp_path / "log.png", "--json")
    assert code == 0, err
    assert json.loads(stdout)["plot"] == str(tmp_path / "log.png")
    assert (tmp_path / "log.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_clean_failure(cli("inspect", tmp_path / "d", "--plot", tmp_path / "log.png"), "already exists")
    assert_clean_failure(
        cli("inspect", mask, "--plot", tmp_path / "m.png"), "is a mask", output=tmp_path / "m.png"
    )
    code, _, err = cli("diff", base, perturb(base, tmp_path / "tuned"), "-o", tmp_path / "diffed", "-q")
    assert code == 0, err
    assert_clean_failure(
        cli("inspect", tmp_path / "diffed", "--plot", tmp_path / "x.png"), "not made by `train`"
    )
    assert_clean_failure(cli("inspect", tmp_path / "d", "--plot", tmp_path / "log.jpg"), "writes a .png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert_clean_failure(
        cli("inspect", tmp_path / "d", "--plot", tmp_path / "x.png"), "pip install 'piece-surgery[plot]'"
    )
