"""Every piece-surgery command the README and docs show runs as written, on a tiny model: the
placeholders (MODEL, BASE, TUNED, domain.jsonl, ...) are real files in the folder the commands run
in, Hub repo ids are repos of the local test Hub, and every launch line runs on 2 CPU processes
(8 GPUs become 2 ranks). Lines that need what CI does not have (accelerate, Slurm, pip, the
benchmarks) are skipped, and counted, so the test fails if it stops finding commands."""

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import perturb

from piece_surgery.models.tiny import local_torchrun, make_tiny_checkpoint

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIPPED = ("pip", "python", "python3", "accelerate", "srun", "bash", "HEAD_NODE=", "cmp", "ruff", "pytest")


def shown_commands() -> list[tuple[str, str]]:
    """(document, command line) for each line of a ```bash block, continuations joined."""
    found = []
    for doc in DOCS:
        block = False
        pending = ""
        for line in doc.read_text().splitlines():
            if line.startswith("```"):
                block = line.strip() == "```bash"
                continue
            if not block:
                continue
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            if pending.strip() and not pending.lstrip().startswith("#"):
                found.append((doc.name, pending.strip()))
            pending = ""
    return found


def workspace(folder: Path, hub) -> None:
    """The files and Hub repos the commands name."""
    from huggingface_hub import HfApi

    model = make_tiny_checkpoint(folder / "MODEL", "llama")
    shutil.copytree(model, folder / "BASE")
    perturb(model, folder / "TUNED", fraction=0.01, seed=1)
    perturb(model, folder / "FULL_FINETUNE", fraction=1.0, seed=2, hard=False)
    code = [
        "def add(a, b):\n    return a + b",
        "import os\nclass Model:\n    pass",
        "x = [i * i for i in range(9)]",
    ]
    lines = "".join('{"text": ' + repr(c).replace("'", '"') + "}\n" for c in code * 3)
    for name in ("domain.jsonl", "d.jsonl"):
        (folder / name).write_text(lines)
    data_formats(folder, code)
    (folder / "prompts.txt").write_text("Write a function that adds two numbers.\nName three rivers.\n")
    (folder / "general.txt").write_text(
        "The quick brown fox jumps over the lazy dog.\nRivers flow to the sea.\n"
    )
    from piece_surgery.recipes.diff import write_diff

    for name, seed in (("delta-legal", 3), ("delta-code", 4)):
        write_diff(
            str(model), str(perturb(model, folder / f"t-{name}", fraction=0.01, seed=seed)), folder / name
        )
    (folder / "stack.yaml").write_text(
        "base: MODEL\ndeltas:\n  - path: delta-legal\n  - path: delta-code\n    scale: 0.5\noutput: merged\n"
    )
    api = HfApi()
    for repo, source, branch in (
        ("HuggingFaceTB/SmolLM2-135M-Instruct", model, None),
        ("user/delta-legal", folder / "delta-legal", None),
        ("user/delta-code", folder / "delta-code", "v2"),
    ):
        api.create_repo(repo, exist_ok=True)
        if branch:
            api.create_branch(repo, branch=branch, exist_ok=True)
        api.upload_folder(folder_path=str(source), repo_id=repo, revision=branch)
    lora_adapter(model, folder / "lora")
    api.create_repo("user/some-lora-adapter", exist_ok=True)
    api.upload_folder(folder_path=str(folder / "lora"), repo_id="user/some-lora-adapter")


def data_formats(folder: Path, code: list[str]) -> None:
    """The same code as Alpaca records (a .json array), a Parquet table of TRL prompt/completion
    rows, and a `datasets` folder (where the data extra is installed)."""
    import json

    alpaca = [{"instruction": "Write Python.", "input": "", "output": c} for c in code * 2]
    (folder / "alpaca.json").write_text(json.dumps(alpaca))
    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow
        import pyarrow.parquet

        rows = [{"prompt": "# Python\n", "completion": c} for c in code * 2]
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), folder / "train.parquet")
    if importlib.util.find_spec("datasets") is not None:
        import datasets

        datasets.Dataset.from_list([{"text": c} for c in code * 2]).save_to_disk(str(folder / "saved"))


def lora_adapter(base: Path, out: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"])
        )
        with torch.no_grad():
            for _, p in adapted.named_parameters():
                if p.requires_grad:
                    p.add_(0.01)
        adapted.save_pretrained(out)
    config = (out / "adapter_config.json").read_text()
    (out / "adapter_config.json").write_text(
        re.sub(
            r'"base_model_name_or_path": "[^"]*"',
            '"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"',
            config,
        )
    )


# what a line needs of the optional extras, by what it names
EXTRAS = {
    "--plot": "matplotlib",
    "train.parquet": "pyarrow",
    "saved/": "datasets",
    "tensorboard": "tensorboard",
}


def extras_installed(argv: list[str]) -> bool:
    """A line that needs an optional extra (--plot: matplotlib; a Parquet file: pyarrow) runs where
    the extra is installed; without it the command says what to install (tested beside each)."""
    return all(
        importlib.util.find_spec(module) is not None for word, module in EXTRAS.items() if word in argv
    )


def output_of(argv: list[str]) -> str | None:
    for flag in ("-o", "--output"):
        if flag in argv:
            return argv[argv.index(flag) + 1]
    return "merged" if "--recipe" in argv else None


def test_every_command_in_the_docs_runs_as_written(tmp_path, monkeypatch, cli, hub):
    pytest.importorskip("peft")
    workspace(tmp_path, hub)
    monkeypatch.chdir(tmp_path)
    script = str(Path(sys.executable).parent / "piece-surgery")
    ran, skipped = [], []
    for doc, line in shown_commands():
        argv = shlex.split(line.replace("$(which piece-surgery)", script), comments=True)
        if argv[0] in SKIPPED or argv[0].startswith(SKIPPED) or not extras_installed(argv):
            skipped.append(line)
            continue
        out = output_of(argv)
        if out and Path(out).exists():  # each example stands alone
            shutil.rmtree(out) if Path(out).is_dir() else Path(out).unlink()
        if argv[0] == "piece-surgery":
            code, _, err = cli(*argv[1:], "-q")
            assert code == 0, f"{doc}: {line}\n{err}"
        else:
            assert argv[0] == "torchrun", f"{doc}: {line}: not a command this test knows"
            ranks = argv.index("--nproc-per-node")
            command = [*local_torchrun(2), *argv[ranks + 2 :], "-q"]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PIECE_DIST_TIMEOUT": "120"}
            result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
            assert result.returncode == 0, f"{doc}: {line}\n{result.stderr[-3000:]}"
        ran.append(line)
    assert len(ran) >= 25 and any(line.startswith("torchrun") for line in ran), (ran, skipped)


def runnable_blocks() -> list[str]:
    """The ```python blocks the README marks as runnable (the line before says so)."""
    blocks, text = [], (ROOT / "README.md").read_text()
    for match in re.finditer(r"<!-- runnable[^>]*-->\n```python\n(.*?)```", text, flags=re.S):
        blocks.append(match.group(1))
    return blocks


@pytest.mark.parametrize("block", runnable_blocks() or [None])
def test_the_readme_python_examples_run_as_written(block, tmp_path):
    assert block is not None, "the README marks no python block as runnable"
    pytest.importorskip("trl")
    script = tmp_path / "example.py"
    script.write_text(block)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "entries changed" in run.stdout and (tmp_path / "sft-out" / "piece-delta" / "delta.json").is_file()
