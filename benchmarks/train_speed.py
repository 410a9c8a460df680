"""Sparse training vs full fine-tuning (AdamW) vs LoRA (peft), side by side on SmolLM2-135M.

Same data, batch, sequence length and steps. Step time: the median over the steps after the first
(warm-up) one.
Targets (issues 4 and 25): peak memory at or below LoRA's; step time at or below full fine-tuning's,
and at or below LoRA r=2 on q,v's (about the same trainable count) over 20+ steps. Issue 34 adds the
Hugging Face Trainer path: a sparsified model (piece_surgery.sparsify, PieceCallback) against the
CLI's loop and against PEFT LoRA in the same Trainer, at equal trainable count.
Run: python benchmarks/train_speed.py [--steps 21 --batch-size 4 --max-length 128] [--fixed-mmap-threshold]

Peak RSS on CPU depends on glibc's allocator as well as on live tensors: by default glibc raises its
mmap threshold as large blocks are freed, and later blocks below it stay in the heap after free.
--fixed-mmap-threshold runs every child with MALLOC_MMAP_THRESHOLD_=65536, so freed tensors go back
to the OS and the peak tracks the live tensors (slower: more page faults).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import measure, require_extras, reset_peak, smollm2_folder, stdlib_code_lines, table, write_jsonl

from piece_surgery.runtime.options import RunOptions


def _setup(folder: Path, data: Path, max_length: int):
    import torch

    from piece_surgery.models.checkpoint import open_checkpoint

    torch.manual_seed(0)
    checkpoint = open_checkpoint(str(folder))
    dataset = checkpoint.load_data(data, max_length=max_length)
    loaded = checkpoint.load_model(device="cpu", dtype="float32")
    return dataset, loaded.module, loaded


def _batches(dataset, batch_size: int, steps: int):
    from piece_surgery.data.batches import collate

    n = len(dataset.examples)
    for step in range(steps):
        yield collate([dataset.examples[(step * batch_size + i) % n] for i in range(batch_size)], 0)


def _timed_steps(step_fn, batches) -> dict:
    reset_peak()  # the peak of the training steps, after loading (same for every method)
    times = []
    for batch in batches:
        start = time.perf_counter()
        step_fn(batch)
        times.append(time.perf_counter() - start)
    return {"step_seconds": statistics.median(times[1:] or times)}


def _loss(model, batch):
    from piece_surgery.evaluation.forward import batch_logits
    from piece_surgery.evaluation.loss import mean_token_loss

    logits = batch_logits(model, batch)
    return mean_token_loss(logits, batch["labels"])[0]


def full_finetune(folder, data, steps, batch_size, max_length) -> dict:
    import torch

    dataset, model, _ = _setup(folder, data, max_length)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)

    def step(batch):
        _loss(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    result = _timed_steps(step, _batches(dataset, batch_size, steps))
    return {**result, "trainable": sum(p.numel() for p in model.parameters())}


def lora(folder, data, steps, batch_size, max_length, rank, modules) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    dataset, model, _ = _setup(folder, data, max_length)
    model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=modules, lora_dropout=0.0)
    )
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)

    def step(batch):
        _loss(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    result = _timed_steps(step, _batches(dataset, batch_size, steps))
    return {**result, "trainable": sum(p.numel() for p in trainable)}


def sparse(folder, data, steps, batch_size, max_length, mask_path) -> dict:
    """piece-surgery's trainer on a 0.1% mask scored beforehand (as `score` then `train --mask`)."""
    from piece_surgery.formats.mask import load_mask
    from piece_surgery.training.config import TrainConfig
    from piece_surgery.training.loop import train_sparse

    dataset, model, loaded = _setup(folder, data, max_length)
    mask = load_mask(mask_path)
    params = loaded.parameters(mask.indices)
    times = []
    last = [time.perf_counter()]

    def tick(n, record):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    config = TrainConfig(lr=1e-4, max_steps=steps, batch_size=batch_size)
    reset_peak()
    last[0] = time.perf_counter()
    train_sparse(model, params, mask.indices, dataset, config, progress=tick)
    return {
        "step_seconds": statistics.median(times[1:] or times),
        "trainable": mask.k,
        "tensors": len(mask.indices),
    }


class _StepTimes:
    """A TrainerCallback's timings: seconds from each step's begin to its end."""

    def __init__(self):
        self.times, self.start = [], None

    def callback(self):
        from transformers import TrainerCallback

        timings = self

        class Timed(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timings.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timings.times.append(time.perf_counter() - timings.start)
                if state.global_step == 1:
                    reset_peak()  # the peak of the training steps, after loading and set-up

        return Timed()


def _trainer_run(model, dataset, steps, batch_size, callbacks) -> float:
    from transformers import Trainer, TrainingArguments

    from piece_surgery.data.batches import collate

    timings = _StepTimes()
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        adam_beta2=0.95,
        weight_decay=0.0,
        optim="adamw_torch",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
        logging_strategy="no",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset.examples,
        data_collator=lambda batch: collate(batch, 0),
        callbacks=[*callbacks, timings.callback()],
    )
    trainer.train()
    return statistics.median(timings.times[1:] or timings.times)


def trainer_sparse(folder, data, steps, batch_size, max_length, mask_path) -> dict:
    """The same 0.1% mask trained by Hugging Face Trainer on a sparsified model."""
    import piece_surgery
    from piece_surgery.formats.mask import load_mask

    dataset, model, _ = _setup(folder, data, max_length)
    mask = load_mask(mask_path)
    sparse_model = piece_surgery.sparsify(model, mask)
    callback = piece_surgery.PieceCallback(sparse_model, output_dir=tempfile.mkdtemp() + "/delta")
    seconds = _trainer_run(model, dataset, steps, batch_size, [callback])
    return {"step_seconds": seconds, "trainable": mask.k}


def trainer_lora(folder, data, steps, batch_size, max_length, rank, modules) -> dict:
    from peft import LoraConfig, get_peft_model

    dataset, model, _ = _setup(folder, data, max_length)
    model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=modules, lora_dropout=0.0)
    )
    seconds = _trainer_run(model, dataset, steps, batch_size, [])
    return {
        "step_seconds": seconds,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def score_mask(folder: Path, data: Path, method: str, out: Path) -> dict:
    from piece_surgery.recipes.score import score_checkpoint
    from piece_surgery.scoring.methods import METHODS
    from piece_surgery.scoring.options import ScoreOptions

    options = ScoreOptions(method=method, density=0.001)
    data = data if METHODS[method].needs_data else None  # random and magnitude read none
    score_checkpoint(str(folder), data, options, output=out, overwrite=True, run=RunOptions(device="cpu"))
    return {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--fixed-mmap-threshold", action="store_true")
    args = parser.parse_args()
    require_extras()
    if args.fixed_mmap_threshold:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc when each child starts
    folder = smollm2_folder("float32")
    common = (args.steps, args.batch_size, args.max_length)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_jsonl(stdlib_code_lines(64, min_chars=600), Path(tmp) / "code.jsonl")
        masks = {}
        for method in ("random", "magnitude", "piece-s"):
            masks[method] = Path(tmp) / f"{method}.safetensors"
            measure(score_mask, folder, data, method, masks[method])
        rows = [
            {"run": "full fine-tuning (AdamW)", **measure(full_finetune, folder, data, *common)},
            # q,v at rank 2 gives ~115K trainable values, close to the 0.1% mask's ~106K
            {
                "run": "LoRA r=2 on q_proj,v_proj (peft)",
                **measure(lora, folder, data, *common, 2, ["q_proj", "v_proj"]),
            },
            {
                "run": "LoRA r=1 on all linear (peft)",
                **measure(
                    lora,
                    folder,
                    data,
                    *common,
                    1,
                    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                ),
            },
            {
                "run": "piece-surgery sparse, random 0.1% mask",
                **measure(sparse, folder, data, *common, masks["random"]),
            },
            {
                "run": "piece-surgery sparse, magnitude 0.1% mask",
                **measure(sparse, folder, data, *common, masks["magnitude"]),
            },
            {
                "run": "piece-surgery sparse, piece-s 0.1% mask",
                **measure(sparse, folder, data, *common, masks["piece-s"]),
            },
            {
                "run": "HF Trainer: sparsified model, piece-s 0.1% mask",
                **measure(trainer_sparse, folder, data, *common, masks["piece-s"]),
            },
            {
                "run": "HF Trainer: LoRA r=2 on q_proj,v_proj (peft)",
                **measure(trainer_lora, folder, data, *common, 2, ["q_proj", "v_proj"]),
            },
        ]
    full, lora_row = rows[0], rows[1]
    for row in rows:
        row["time_vs_full"] = row["step_seconds"] / full["step_seconds"]
        row["time_vs_lora"] = row["step_seconds"] / lora_row["step_seconds"]
        row["rss_vs_lora"] = row["peak_rss_mb"] / lora_row["peak_rss_mb"]
    allocator = "fixed mmap threshold" if args.fixed_mmap_threshold else "glibc default allocator"
    print(
        f"SmolLM2-135M fp32, batch {args.batch_size} x {args.max_length} tokens, {args.steps} steps, "
        f"CPU, {allocator}"
    )
    print(
        table(
            rows,
            [
                "run",
                "trainable",
                "step_seconds",
                "time_vs_full",
                "time_vs_lora",
                "peak_rss_mb",
                "rss_vs_lora",
            ],
        )
    )


if __name__ == "__main__":
    main()
