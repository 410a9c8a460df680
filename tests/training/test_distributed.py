"""Several processes on the CPU (gloo, 2 ranks, launched by torchrun): score and train give what one
process gives, only the k trained values travel, a failing rank ends every rank, resume works."""

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import assert_clean_failure, run_launcher
from safetensors.torch import load_file

from piece_surgery.models.tiny import local_torchrun

DRIVER = Path(__file__).parent / "distributed_driver.py"


def torchrun(*args, ranks=2, env=None, timeout=180):
    """`torchrun --nproc-per-node RANKS piece-surgery ARGS` (through the test driver)."""
    command = [*local_torchrun(ranks), str(DRIVER), *map(str, args)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PIECE_DIST_TIMEOUT": "60", **(env or {})}
    return run_launcher(command, env=environment, timeout=timeout)


def indices(path):
    return {k: v.tolist() for k, v in load_file(path).items() if "::" not in k}


def assert_deltas_close(one: Path, two: Path) -> None:
    """The same changed entries, and fp32 values within the documented tolerance (docs/distributed.md:
    1e-5 relative): runs that differ only in how their sums are ordered."""
    a, b = load_file(one / "delta.safetensors"), load_file(two / "delta.safetensors")
    assert a.keys() == b.keys()
    for key in (k for k in a if k.endswith("::tuned")):
        torch.testing.assert_close(
            b[key].view(torch.float32), a[key].view(torch.float32), rtol=1e-5, atol=1e-6
        )


@pytest.fixture
def data(tmp_path):
    """Eleven examples: micro-batches do not split evenly over two ranks."""
    path = tmp_path / "data.txt"
    path.write_text("\n".join(f"def f{i}(x):    return x * {i} + {i * i}" for i in range(11)) + "\n")
    return path


def test_distributed_score_is_the_one_process_mask(tiny, data, code_data, tmp_path, cli):
    model = tiny("llama")
    for extra in (["--method", "piece-s"], ["--method", "piece-r", "--retain", code_data]):
        one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
        args = ["score", model, "--data", data, "--density", "0.02", *extra, "-q", "--overwrite"]
        assert cli(*args, "-o", one)[0] == 0
        run = torchrun(*args, "-o", two)
        assert run.returncode == 0, run.stderr
        assert indices(one) == indices(two)


@pytest.fixture
def mask(tiny, data, tmp_path, cli):
    path = tmp_path / "mask.safetensors"
    assert cli("score", tiny("llama"), "--data", data, "-o", path, "--density", "0.05", "-q")[0] == 0
    return path


def train_args(model, data, mask, out, *extra):
    return ["train", model, "--data", data, "--mask", mask, "-o", out, "--lr", "1e-2", "-q", *extra]


def test_distributed_train_matches_one_process_with_the_same_global_batch(tiny, data, mask, tmp_path, cli):
    """2 ranks x batch 2 x accumulation 1 against 1 process x batch 2 x accumulation 2: the same
    data order and steps; only the order of the floating-point sums differs."""
    model = tiny("llama")
    assert (
        cli(
            *train_args(
                model, data, mask, tmp_path / "one", "--batch-size", "2", "--grad-accum", "2", "--epochs", "3"
            )
        )[0]
        == 0
    )
    run = torchrun(
        *train_args(model, data, mask, tmp_path / "two", "--batch-size", "2", "--epochs", "3", "--json")
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)  # rank 0 alone prints
    assert report["steps"] == 9  # ceil(11 / 4) steps per epoch
    assert_deltas_close(tmp_path / "one", tmp_path / "two")


def test_a_measured_drift_budget_stops_every_rank_at_the_one_process_step(tiny, data, mask, tmp_path, cli):
    """Each rank measures the drift, and all of them act on rank 0's number: 2 ranks keep the step
    one process keeps (the budget lies midway between the drifts of steps 2 and 3)."""
    model = tiny("llama")
    drifts = {}
    for steps in (2, 3):
        out = tmp_path / f"one{steps}"
        args = train_args(model, data, mask, out, "--batch-size", "4", "--max-steps", str(steps), "--json")
        code, stdout, err = cli(*args, "--eval-general", "general")
        assert code == 0, err
        drifts[steps] = json.loads(stdout)["measured_drift"]
    assert 0 < drifts[2] < drifts[3]
    budget = (drifts[2] + drifts[3]) / 2
    run = torchrun(
        *train_args(model, data, mask, tmp_path / "two", "--batch-size", "2", "--max-steps", "6", "--json"),
        "--drift-budget",
        budget,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["steps"] == 2 and report["drift_budget_passed"]["step"] == 3
    assert report["measured_drift"] == pytest.approx(drifts[2], rel=1e-4)
    assert_deltas_close(tmp_path / "one2", tmp_path / "two")


def test_ranks_split_a_global_batch_like_one_process(tiny, tmp_path, mask, cli):
    """2 ranks x batch 2 against 1 process x batch 4, on examples of very different lengths: the
    step's loss is the mean over all the step's tokens, over ranks too, so the values agree."""
    data = tmp_path / "mixed.txt"
    data.write_text("\n".join(("x = 1", "import os " * 9, "a", "def f(x): return x * 2 " * 3)) + "\n")
    model = tiny("llama")
    assert (
        cli(*train_args(model, data, mask, tmp_path / "one", "--batch-size", "4", "--max-steps", "3"))[0] == 0
    )
    run = torchrun(*train_args(model, data, mask, tmp_path / "two", "--batch-size", "2", "--max-steps", "3"))
    assert run.returncode == 0, run.stderr
    one, two = (load_file(tmp_path / d / "delta.safetensors") for d in ("one", "two"))
    assert one.keys() == two.keys()
    for key in (k for k in one if k.endswith("::tuned")):
        torch.testing.assert_close(
            two[key].view(torch.float32), one[key].view(torch.float32), rtol=1e-5, atol=1e-6
        )


def test_only_the_k_trained_values_are_communicated(tiny, data, mask, tmp_path):
    log = tmp_path / "comm.jsonl"
    run = torchrun(
        *train_args(tiny("llama"), data, mask, tmp_path / "d", "--batch-size", "1", "--max-steps", "3"),
        env={"PIECE_TEST_COMM_LOG": str(log)},
    )
    assert run.returncode == 0, run.stderr
    k = sum(len(v) for v in indices(mask).values())
    buckets = [json.loads(line)["bytes"] for line in log.read_text().splitlines()]
    assert sum(buckets) == 3 * 4 * k  # three steps, one fp32 gradient per trained value, nothing dense


def test_a_failure_on_one_rank_ends_every_rank_with_one_line(tiny, data, mask, tmp_path):
    out = tmp_path / "d"
    run = torchrun(
        *train_args(tiny("llama"), data, mask, out, "--batch-size", "1"), env={"PIECE_TEST_NAN_RANK": "1"}
    )
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode != 0 and len(lines) == 2 and lines[0] == lines[1], run.stderr
    assert "the loss became nan" in lines[0]
    # no rank printed a traceback (torchrun itself reports the failed workers with one of its own)
    assert "[rank0]: Traceback" not in run.stderr and "[rank1]: Traceback" not in run.stderr
    assert "piece_surgery/" not in run.stderr and "terminate called" not in run.stderr
    assert not out.exists()


def test_resume_under_ddp_and_on_another_world_size(tiny, data, mask, tmp_path, cli):
    model = tiny("llama")
    args = ["--batch-size", "1", "--max-steps", "8", "--save-every", "2"]
    straight = torchrun(*train_args(model, data, mask, tmp_path / "straight", *args))
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "resumed"
    stopped = torchrun(
        *train_args(model, data, mask, out, *args),
        env={"PIECE_TEST_STOP_AT": "4", "PIECE_TEST_SAVE_EVERY": "2"},
    )
    assert stopped.returncode != 0 and (tmp_path / "resumed.state" / "state.json").is_file()
    assert json.loads((tmp_path / "resumed.state" / "state.json").read_text())["step"] == 4
    result = cli(*train_args(model, data, mask, out, *args, "--resume"))  # one process, not two
    assert_clean_failure(result, "another number of processes", output=out)
    resumed = torchrun(*train_args(model, data, mask, out, *args, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(tmp_path / "straight" / "delta.safetensors"), load_file(out / "delta.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra", [["--method", "piece-s"], ["--method", "piece-r", "--retain", "CODE"]])
def test_fsdp_score_is_the_one_process_mask(tiny, data, code_data, tmp_path, cli, extra):
    """Weights and accumulators sharded over the ranks (FSDP2); the global top-k from summed counts."""
    extra = [str(code_data) if e == "CODE" else e for e in extra]
    args = ["score", tiny("llama"), "--data", data, "--density", "0.02", *extra, "-q"]
    assert cli(*args, "-o", tmp_path / "one.safetensors")[0] == 0
    run = torchrun(*args, "-o", tmp_path / "fsdp.safetensors", "--fsdp")
    assert run.returncode == 0, run.stderr
    assert indices(tmp_path / "one.safetensors") == indices(tmp_path / "fsdp.safetensors")


def test_fsdp_train_matches_one_process(tiny, data, tmp_path, cli):
    """A magnitude mask (it holds norm gains: values injected into sharded modules too)."""
    model = tiny("llama")
    mask = tmp_path / "magnitude.safetensors"
    assert cli("score", model, "-o", mask, "--method", "magnitude", "--density", "0.05", "-q")[0] == 0
    assert any("norm" in k for k in indices(mask))
    assert (
        cli(
            *train_args(
                model,
                data,
                mask,
                tmp_path / "one",
                "--batch-size",
                "1",
                "--grad-accum",
                "2",
                "--max-steps",
                "4",
            )
        )[0]
        == 0
    )
    run = torchrun(
        *train_args(model, data, mask, tmp_path / "fsdp", "--batch-size", "1", "--max-steps", "4", "--fsdp")
    )
    assert run.returncode == 0, run.stderr
    assert_deltas_close(tmp_path / "one", tmp_path / "fsdp")


def test_fsdp_without_a_launcher_is_one_line(tiny, data, tmp_path, cli):
    out = tmp_path / "m.safetensors"
    assert_clean_failure(
        cli("score", tiny("llama"), "--data", data, "-o", out, "--fsdp"), "launch with torchrun", output=out
    )


@pytest.mark.parametrize("fsdp", [[], ["--fsdp"]])
def test_a_vision_language_model_scores_on_image_chats_as_in_one_process(tmp_path, cli, fsdp):
    """LLaVA on image chats over two ranks (DDP, FSDP2): the mask is the one-process mask. With
    text retain data the projector gets no gradient at all (None under FSDP, skipped, not a crash)."""
    from piece_surgery.models.tiny import make_tiny_vision_language_model, write_png

    model = make_tiny_vision_language_model(tmp_path / "llava", "llava")
    write_png(tmp_path / "a.png", 30, 20, seed=1)
    chat = [
        {"role": "user", "content": [{"type": "image", "path": "a.png"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Noise."}]},
    ]
    data = tmp_path / "images.jsonl"
    data.write_text("".join(json.dumps({"messages": chat}) + "\n" for _ in range(5)))
    args = ["score", model, "--data", data, "--density", "0.02", "-q"]
    assert cli(*args, "-o", tmp_path / "one.safetensors")[0] == 0
    run = torchrun(*args, "-o", tmp_path / "two.safetensors", *fsdp)
    assert run.returncode == 0, run.stderr
    assert indices(tmp_path / "one.safetensors") == indices(tmp_path / "two.safetensors")
