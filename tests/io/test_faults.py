"""Faults: SIGKILL and SIGTERM at random points of apply, diff and train, and a full disk.

After any of them the inputs are unchanged, nothing half-written is at the final path, and a re-run
writes the same bytes as an uninterrupted run (and removes what a killed run left behind).
Each run is killed at a chosen call of a function inside the work (tests/io/fault_driver.py),
so every interesting point is reachable deterministically. PIECE_FAULT_TRIALS=6 tries every point of
each command with each signal (default: 2 points each, chosen by a seeded draw).
"""

import os
import random
import resource
import signal
import subprocess
import sys

import pytest
import torch
from helpers import assert_clean_failure, perturb, snapshot

TRIALS = int(os.environ.get("PIECE_FAULT_TRIALS", "2"))


@pytest.fixture
def inputs(tiny, tmp_path, cli):
    base = tiny("llama", dtype=torch.bfloat16)
    tuned = perturb(base, tmp_path / "tuned", fraction=0.05, hard=False)
    assert cli("diff", base, tuned, "-o", tmp_path / "delta", "-q")[0] == 0
    data = tmp_path / "data.txt"
    data.write_text(
        "\n".join(f"def f{i}(x):\n    return x * {i}".replace("\n", " ") for i in range(24)) + "\n"
    )
    return base, tuned, tmp_path / "delta", data


def command_for(kind, inputs, out):
    base, tuned, delta, data = inputs
    if kind == "apply":
        return ["apply", base, delta, "-o", out, "-q"], [base, delta]
    if kind == "diff":
        return ["diff", base, tuned, "-o", out, "-q"], [base, tuned]
    args = ["train", base, "--data", data, "-o", out, "--density", "0.05", "--batch-size", "1"]
    return [*args, "--max-steps", "12", "--save-every", "3", "--lr", "1e-3", "-q"], [base, data]


def temporaries(out):
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def folder_bytes(folder):
    """Every file, but those that name the output itself (a merge records its recipe, output
    included, beside the weights and in its card)."""
    named = (
        ("piece-surgery-recipe.yaml", "README.md") if (folder / "piece-surgery-recipe.yaml").exists() else ()
    )
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name not in named}


# Where a signal can land: the count-th call of module:function, before to after the work.
FAULT_POINTS = {
    "apply": [
        ("piece_surgery.recipes.apply", "open_checkpoint", 1),
        ("piece_surgery.merging.plan", "_patch_shard", 1),
        ("piece_surgery.io.filepatch", "_copy_range", 1),
        ("piece_surgery.io.filepatch", "_patch_mapped", 1),
        ("piece_surgery.io.outputs", "_default_permissions", 1),
    ],
    "diff": [
        ("piece_surgery.merging.diff", "_changed_entries", 1),
        ("piece_surgery.formats.delta_folder", "save_shard", 1),
        ("piece_surgery.formats.delta_folder", "file_sha256", 1),
        ("piece_surgery.io.outputs", "_default_permissions", 1),
    ],
    "train": [
        ("piece_surgery.training.steps", "step_gradients", 2),
        ("piece_surgery.training.steps", "step_gradients", 8),
        ("piece_surgery.training.loop", "save_state", 2),
        ("piece_surgery.training.state", "save_shard", 3),
        ("piece_surgery.recipes.train", "save_delta", 1),
        ("piece_surgery.io.outputs", "_default_permissions", 5),
    ],
}
DRIVER = os.path.join(os.path.dirname(__file__), "fault_driver.py")


@pytest.mark.parametrize("kind", ["apply", "diff", "train"])
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_killed_runs_leave_no_half_output_and_rerun_exactly(inputs, tmp_path, cli, kind, signum):
    reference = tmp_path / "reference"
    args, sources = command_for(kind, inputs, reference)
    assert cli(*args)[0] == 0
    expected = folder_bytes(reference)
    before = snapshot(*sources)
    rng = random.Random(f"{kind}-{int(signum)}")
    points = rng.sample(FAULT_POINTS[kind], min(TRIALS, len(FAULT_POINTS[kind])))
    for trial, (module, function, count) in enumerate(points):
        out = tmp_path / f"out{trial}"
        args, _ = command_for(kind, inputs, out)
        child = subprocess.run(
            [
                sys.executable,
                DRIVER,
                f"{module}:{function}",
                str(count),
                str(int(signum)),
                "--",
                *map(str, args),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=120,
        )
        where = f"{kind}, {signum.name} at call {count} of {module}.{function}"
        assert child.returncode in (-signal.SIGKILL, 143), f"{where}: {child.returncode} {child.stderr}"
        assert snapshot(*sources) == before, f"{where}: an input changed"
        assert not out.exists() or folder_bytes(out) == expected, f"{where}: a partial output"
        state = out.with_name(out.name + ".state")
        if signum == signal.SIGTERM:
            line = child.stderr.decode().strip().splitlines()[-1]
            if state.exists():  # a state --save-every saved is named, not "nothing was written"
                assert line.startswith("error: terminated; a resumable state") and str(state) in line, line
            else:
                assert line == "error: terminated; nothing was written", f"{where}: {line}"
            assert not temporaries(out), f"{where}: SIGTERM left temporaries"
        rerun = [*args, "--resume"] if kind == "train" and state.exists() and not out.exists() else args
        code, _, err = cli(*rerun, *(["--overwrite"] if out.exists() else []))
        assert code == 0, f"{where}: {err}"
        assert folder_bytes(out) == expected, f"{where}: the re-run differs from an uninterrupted run"
        assert not temporaries(out) and not state.exists(), f"{where}: leftovers after the re-run"


@pytest.mark.parametrize("kind", ["apply", "diff", "train"])
def test_a_full_disk_is_one_line_and_leaves_nothing(inputs, tmp_path, cli, kind):
    out = tmp_path / "out"
    args, sources = command_for(kind, inputs, out)
    args = [a for a in args if a not in ("--save-every", "3")]
    before = snapshot(*sources)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a killed process
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, hard))  # no file may grow past 2000 bytes
    try:
        result = cli(*args)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert_clean_failure(result, "file too large", output=out, unchanged=(before, sources))
    assert not temporaries(out)
