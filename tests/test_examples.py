"""The examples the README points to run as written (offline, on tiny models), and say what they
promise: the quickstart's merged model diffs back to the delta byte for byte, the swap example
restores the base exactly, and the PEFT round trip loads in stock PEFT."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def run(*command, cwd: Path) -> subprocess.CompletedProcess:
    # the installed console script, as a user runs it (next to this interpreter in a venv)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, env={**os.environ, "PATH": path}
    )


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_quickstart(tmp_path):
    result = run("bash", EXAMPLES / "quickstart.sh", tmp_path / "work", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "quickstart done" in result.stdout
    assert (tmp_path / "work" / "merged" / "model.safetensors").is_file()


def test_swap_example_restores_the_base(tmp_path):
    result = run(sys.executable, EXAMPLES / "swap.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "base restored bit for bit after the switches: True" in result.stdout
    losses = {
        line.split()[0]: [float(x) for x in line.split()[1:]] for line in result.stdout.splitlines()[1:4]
    }
    assert losses["code"][0] < losses["base"][0] and losses["prose"][1] < losses["base"][1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_peft_example_round_trip(tmp_path):
    pytest.importorskip("peft")
    result = run("bash", EXAMPLES / "peft.sh", tmp_path / "work", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "PEFT loaded" in result.stdout and "SHIRA" in result.stdout
    assert (tmp_path / "work" / "delta-again" / "delta.json").is_file()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_vision_language_example(tmp_path):
    result = run("bash", EXAMPLES / "vision_language.sh", tmp_path / "work", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "vision-language example done" in result.stdout
    assert "projector" in result.stdout and "language model" in result.stdout  # inspect's parts
    assert (tmp_path / "work" / "merged" / "model.safetensors").is_file()


def test_trl_example_trains_a_delta_that_applies_exactly(tmp_path):
    pytest.importorskip("trl")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "trl_sft.py"), str(tmp_path / "work")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "base + delta is the model TRL trained, bit for bit: True" in result.stdout
    assert (tmp_path / "work" / "sft" / "checkpoint-3" / "piece-delta" / "delta.json").is_file()
