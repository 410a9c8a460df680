"""Hugging Face Trainer and TRL's SFTTrainer train a sparsified model: the values `piece-surgery
train` trains for the same data and hyperparameters, a delta in every checkpoint that applies
exactly, Trainer's own resume, and under two processes only the k values cross the wire."""

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import bitwise_equal, read_all, run_launcher
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import piece_surgery as ps
from piece_surgery.data.batches import collate
from piece_surgery.data.dataset import dataset_from_records
from piece_surgery.formats.delta_folder import load_delta
from piece_surgery.integrations.trainer import PieceCallback
from piece_surgery.models.tiny import local_torchrun

RECORDS = [
    {"text": "def add(a, b):\n    return a + b"},
    {"prompt": "Square a number.", "response": "def square(x):\n    return x * x"},
    {"text": "import os\nclass Model:\n    pass"},
    {"text": "for i in range(10):\n    print(i)"},
]


def _args(tmp_path, **more):
    settings = dict(
        output_dir=str(tmp_path / "run"),
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**settings, **more})


def test_trainer_trains_the_values_the_cli_trains(tiny, tmp_path, cli):
    """Same data, micro-batches (the whole set each step), AdamW, clipping and constant schedule."""
    base = tiny("llama")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    mask_file = tmp_path / "m.safetensors"
    assert (
        cli("score", base, "--data", data, "-o", mask_file, "--method", "piece-s", "--density", "0.02", "-q")[
            0
        ]
        == 0
    )
    steps = ["--epochs", "3", "--batch-size", "4", "--lr", "1e-2"]
    assert (
        cli("train", base, "--data", data, "--mask", mask_file, "-o", tmp_path / "cli", *steps, "-q")[0] == 0
    )

    model = AutoModelForCausalLM.from_pretrained(base)
    sparse = ps.sparsify(model, ps.load_mask(mask_file))
    tokenizer = sparse.checkpoint.load_tokenizer()
    examples = dataset_from_records(RECORDS, tokenizer, max_length=128).examples
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, per_device_train_batch_size=4, num_train_epochs=3),
        train_dataset=examples,
        data_collator=lambda batch: collate(batch, tokenizer.pad_token_id),
        callbacks=[PieceCallback(sparse)],
    )
    trainer.train()
    from_cli = load_delta(tmp_path / "cli")
    from_trainer = load_delta(tmp_path / "run" / "piece-delta")
    assert from_cli.tensors.keys() == from_trainer.tensors.keys()
    for name, t in from_cli.tensors.items():
        assert torch.equal(t.indices, from_trainer.tensors[name].indices)
        torch.testing.assert_close(from_trainer.tensors[name].tuned, t.tuned, rtol=1e-4, atol=1e-6)
    assert from_trainer.info.provenance.steps == 3
    assert from_trainer.info.provenance.hyperparameters["lr"] == 1e-2


def test_sft_trainer_saves_a_delta_per_checkpoint_that_applies_exactly_and_resumes(tiny, tmp_path, cli):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    base = tiny("llama", dtype=torch.bfloat16)
    rows = [
        {"prompt": "Square a number.", "completion": "def square(x): return x * x"},
        {"prompt": "Add two numbers.", "completion": "def add(a, b): return a + b"},
    ] * 4
    train_set = datasets.Dataset.from_list(rows)

    def run(output: Path, resume: bool = False):
        model = AutoModelForCausalLM.from_pretrained(base)
        mask = ps.score(
            model, [{"prompt": r["prompt"], "response": r["completion"]} for r in rows], method="piece-s"
        )
        sparse = ps.sparsify(model, mask)
        config = trl.SFTConfig(
            **{
                k: v
                for k, v in _args(output).to_dict().items()
                if k in ("learning_rate", "adam_beta2", "optim")
            },
            output_dir=str(output),
            max_steps=4,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,  # TRL normalizes over the step's tokens, as train does
            lr_scheduler_type="constant",
            save_steps=2,
            report_to=[],
            use_cpu=True,
            completion_only_loss=True,
            max_length=64,
            disable_tqdm=True,
            seed=0,
        )
        trainer = trl.SFTTrainer(
            model=model, args=config, train_dataset=train_set, callbacks=[PieceCallback(sparse)]
        )
        trainer.train(resume_from_checkpoint=str(output / "checkpoint-2") if resume else None)
        return model, sparse

    model, sparse = run(tmp_path / "a")
    assert (tmp_path / "a" / "checkpoint-2" / "piece-delta").is_dir()
    optimizer_state = torch.load(tmp_path / "a" / "checkpoint-4" / "optimizer.pt", weights_only=True)
    moments = sum(s["exp_avg"].numel() for s in optimizer_state["state"].values())
    assert moments == sparse.mask.k  # AdamW's state is O(k)
    assert cli("apply", base, tmp_path / "a" / "piece-delta", "-o", tmp_path / "merged", "-q")[0] == 0
    merged, now = read_all(tmp_path / "merged"), dict(model.named_parameters())
    assert all(bitwise_equal(w, now[n].detach()) for n, w in merged.items())

    # stop after checkpoint-2, resume it with Trainer's own checkpoint: the same delta at the end
    (tmp_path / "b").mkdir()
    import shutil

    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    run(tmp_path / "b", resume=True)
    a, b = (
        load_file(tmp_path / "a" / "piece-delta" / "delta.safetensors"),
        load_file(tmp_path / "b" / "piece-delta" / "delta.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_trainable_parameter_besides_the_values_is_refused(tiny, tmp_path):
    from piece_surgery.runtime.errors import PieceError

    model = AutoModelForCausalLM.from_pretrained(tiny("llama"))
    sparse = ps.sparsify(model, ps.score(model, RECORDS, method="piece-s", density=0.02))
    model.lm_head.weight.requires_grad_(True)
    tokenizer = sparse.checkpoint.load_tokenizer()
    examples = dataset_from_records(RECORDS, tokenizer, max_length=128).examples
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=1),
        train_dataset=examples,
        data_collator=lambda batch: collate(batch, tokenizer.pad_token_id),
        callbacks=[PieceCallback(sparse)],
    )
    with pytest.raises(PieceError, match="lm_head.weight' is trainable besides"):
        trainer.train()


def test_two_processes_synchronise_only_the_k_values(tiny, tmp_path):
    """torchrun --nproc-per-node 2 (gloo) runs Trainer with DDP over the sparsified model: every
    all-reduce carries the k fp32 values' gradients and nothing else, and both ranks end with the
    values rank 0 saves."""
    base = tiny("llama")
    driver = Path(__file__).parent / "trainer_driver.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIECE_TEST_COMM_LOG": str(tmp_path / "comm.jsonl")}
    run = run_launcher(
        [*local_torchrun(2), str(driver), str(base), str(tmp_path / "out")], env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    bucket_bytes = [json.loads(line)["bytes"] for line in (tmp_path / "comm.jsonl").read_text().splitlines()]
    assert bucket_bytes and all(b <= 4 * summary["k"] for b in bucket_bytes)
    assert sum(bucket_bytes) == 4 * summary["k"] * summary["steps"]
    assert summary["ranks_agree"] and load_delta(tmp_path / "out" / "piece-delta").count > 0


def _trainer(model, sparse, tmp_path, callback=None, **args):
    tokenizer = sparse.checkpoint.load_tokenizer()
    examples = dataset_from_records(RECORDS, tokenizer, max_length=128).examples
    return Trainer(
        model=model,
        args=_args(tmp_path, **args),
        train_dataset=examples,
        data_collator=lambda batch: collate(batch, tokenizer.pad_token_id),
        callbacks=[callback or PieceCallback(sparse)],
    )


def test_piece_callback_mistakes_and_outputs_are_refused_before_training(tiny, tmp_path, monkeypatch):
    """The output folder is checked as the CLI's outputs are, when the callback is made (and the
    Trainer's own output folder when training begins, before any step): never home, the working
    folder, the base, a folder holding other things or the Trainer's checkpoints."""
    from piece_surgery.runtime.errors import PieceError

    base = tiny("llama")
    model = AutoModelForCausalLM.from_pretrained(base)
    sparse = ps.sparsify(model, ps.score(model, RECORDS, method="piece-s", density=0.02))
    home, work, busy = tmp_path / "home", tmp_path / "work", tmp_path / "busy"
    for folder in (home, work, busy):
        folder.mkdir()
    (busy / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    refusals = [
        ({"output_dir": home}, "home folder"),
        ({"output_dir": "."}, "."),
        ({"output_dir": tmp_path}, "above the current one"),  # holds the working folder (and home)
        ({"output_dir": busy}, "busy"),
        ({"output_dir": base}, ""),
        ({"retain_weight": -1.0}, "finite number >= 0"),
        ({"format_version": 9}, "unknown delta format"),
        ({"output_dir": 5}, "output_dir must be a path (str or Path), got int"),  # was pathlib's TypeError
    ]
    for options, fragment in refusals:
        with pytest.raises(PieceError, match=None) as caught:
            PieceCallback(sparse, **options)
        assert "\n" not in str(caught.value) and fragment in str(caught.value), (options, caught.value)
    assert (busy / "notes.txt").read_text() == "mine" and (base / "config.json").is_file()
    with pytest.raises(PieceError, match="takes the SparseModel"):
        PieceCallback(model)

    callback = PieceCallback(sparse, output_dir=tmp_path / "run")  # the Trainer's own output_dir
    trainer = _trainer(model, sparse, tmp_path, callback, max_steps=1)
    with pytest.raises(PieceError, match="Trainer's output_dir"):
        trainer.train()
    assert trainer.state.global_step == 0 and not callback.saved


@pytest.mark.parametrize("other", ["random", "denser"])
def test_a_resume_with_another_mask_is_one_line(tiny, tmp_path, other):
    """Trainer resumes a checkpoint of a run with another mask: one line says so, not torch's
    errors (a random mask trains entries the first did not; a denser one holds the first's entries
    but more values per tensor: the optimizer state is not its)."""
    from piece_surgery.runtime.errors import PieceError

    base = tiny("llama")
    model = AutoModelForCausalLM.from_pretrained(base)
    sparse = ps.sparsify(model, ps.score(model, RECORDS, method="piece-s", density=0.02))
    _trainer(model, sparse, tmp_path, max_steps=1, save_strategy="steps", save_steps=1).train()
    assert (tmp_path / "run" / "checkpoint-1" / "piece-values.safetensors").is_file()

    again = AutoModelForCausalLM.from_pretrained(base)
    options = dict(method="random", seed=3) if other == "random" else dict(method="piece-s", data=RECORDS)
    mask = ps.score(again, density=0.02 if other == "random" else 0.05, **options)
    resumed = ps.sparsify(again, mask)
    trainer = _trainer(again, resumed, tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    with pytest.raises(PieceError, match="trained with another mask") as caught:
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert "\n" not in str(caught.value)
    # the random mask is told apart when the weights load, the denser one by the optimizer's state
    assert ("differs outside the mask's entries" in str(caught.value)) == (other == "random")
