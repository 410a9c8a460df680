"""Hugging Face Trainer and TRL's SFTTrainer train a sparsified model: the values `piece-surgery
train` trains for the same data and hyperparameters, a delta in every checkpoint that applies
exactly, Trainer's own resume, and under two processes only the k values cross the wire."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import bitwise_equal, read_all
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
    run = subprocess.run(
        [*local_torchrun(2), str(driver), str(base), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    bucket_bytes = [json.loads(line)["bytes"] for line in (tmp_path / "comm.jsonl").read_text().splitlines()]
    assert bucket_bytes and all(b <= 4 * summary["k"] for b in bucket_bytes)
    assert sum(bucket_bytes) == 4 * summary["k"] * summary["steps"]
    assert summary["ranks_agree"] and load_delta(tmp_path / "out" / "piece-delta").count > 0
