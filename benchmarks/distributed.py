"""What travels between ranks per training step, sparse (piece-surgery) against dense DDP, and the
step time of 1 against 2 CPU processes, on SmolLM2-135M at 0.1% density.

Both counts come from a DDP communication hook that records every gradient bucket all-reduced.
The dense baseline is plain DistributedDataParallel over the whole model (every weight trainable),
as full fine-tuning would use it. Step times on this 2-core CPU machine are noisy: two processes
share the two cores, and gloo copies through the loopback.

Run: python benchmarks/distributed.py [--steps 4 --batch-size 2 --max-length 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import require_extras, smollm2_folder, stdlib_code_lines, table, write_jsonl

from piece_surgery.models.tiny import local_torchrun
from piece_surgery.runtime.options import RunOptions


def _launch(ranks: int, *args: str) -> dict:
    """Run this script's worker under torchrun; returns rank 0's JSON report."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        report = Path(f.name)
    command = [*local_torchrun(ranks), __file__, "--worker", "--report", str(report), *args]
    threads = str(max(1, (os.cpu_count() or 2) // ranks))  # the cores split between the ranks
    run = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": threads}
    )
    if run.returncode:
        sys.exit(f"worker failed:\n{run.stderr[-3000:]}")
    result = json.loads(report.read_text())
    report.unlink()
    return result


def worker(args) -> None:
    """One rank: train a few steps (sparse through piece-surgery's trainer, or dense DDP), count
    the bytes of every all-reduced bucket, time the steps after the first."""
    import torch
    import torch.distributed as dist

    from piece_surgery.data.batches import collate
    from piece_surgery.evaluation.forward import batch_logits
    from piece_surgery.evaluation.loss import mean_token_loss
    from piece_surgery.formats.mask import load_mask
    from piece_surgery.models.checkpoint import open_checkpoint
    from piece_surgery.runtime import distributed
    from piece_surgery.training import loop as trainer_module
    from piece_surgery.training.config import TrainConfig
    from piece_surgery.training.loop import train_sparse

    world = distributed.start("cpu")
    checkpoint = open_checkpoint(str(args.model))
    dataset = checkpoint.load_data(args.data, max_length=args.max_length)
    loaded = checkpoint.load_model(device="cpu", dtype="float32")
    model = loaded.module
    sent: list[int] = []

    def counting(state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        sent.append(bucket.buffer().numel() * bucket.buffer().element_size())
        return allreduce_hook(state, bucket)

    times: list[float] = []
    if args.mode == "sparse":
        mask = load_mask(args.mask)
        real = trainer_module._MicroBatchLoss.__init__

        def with_hook(self, *a, **kw):
            real(self, *a, **kw)
            if self.ddp is not None:
                self.ddp.register_comm_hook(None, counting)

        trainer_module._MicroBatchLoss.__init__ = with_hook
        last = [time.perf_counter()]

        def tick(n, record):
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        config = TrainConfig(lr=1e-4, max_steps=args.steps, batch_size=args.batch_size)
        last[0] = time.perf_counter()
        train_sparse(
            model,
            loaded.parameters(mask.indices),
            mask.indices,
            dataset,
            config,
            progress=tick,
            world=world,
        )
        trainable = mask.k
    else:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model)
        ddp.register_comm_hook(None, counting)
        optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-5)
        for step in range(args.steps):
            start = time.perf_counter()
            rows = [
                (step * args.batch_size * world.size + world.rank * args.batch_size + i)
                % len(dataset.examples)
                for i in range(args.batch_size)
            ]
            batch = collate([dataset.examples[i] for i in rows], 0)
            loss, _ = mean_token_loss(batch_logits(ddp, batch), batch["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        trainable = sum(p.numel() for p in model.parameters())
    if world.is_main:
        result = {
            "bytes_per_step": sum(sent) / args.steps,
            "buckets_per_step": len(sent) / args.steps,
            "trainable": trainable,
            "step_seconds": sum(times[1:]) / max(len(times) - 1, 1),
        }
        Path(args.report).write_text(json.dumps(result))
    dist.barrier()
    distributed.stop()


def single_process(folder: Path, data: Path, mask: Path, args) -> dict:
    """The same sparse steps in one process (both cores), for the step-time comparison."""
    import torch

    from piece_surgery.formats.mask import load_mask
    from piece_surgery.models.checkpoint import open_checkpoint
    from piece_surgery.training.config import TrainConfig
    from piece_surgery.training.loop import train_sparse

    torch.set_num_threads(os.cpu_count() or 2)
    checkpoint = open_checkpoint(str(folder))
    dataset = checkpoint.load_data(data, max_length=args.max_length)
    model = checkpoint.load_model(device="cpu", dtype="float32")
    loaded = load_mask(mask)
    times, last = [], [time.perf_counter()]

    def tick(n, record):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    # one process with twice the accumulation: the same global batch as two ranks
    config = TrainConfig(lr=1e-4, max_steps=args.steps, batch_size=args.batch_size, grad_accum=2)
    last[0] = time.perf_counter()
    train_sparse(
        model.module, model.parameters(loaded.indices), loaded.indices, dataset, config, progress=tick
    )
    return {"step_seconds": sum(times[1:]) / max(len(times) - 1, 1), "trainable": loaded.k}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="at least 2 (the first is not timed)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="sparse", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mask", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    require_extras()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is warm-up and is not timed")
    if args.worker:
        worker(args)
        return
    folder = smollm2_folder("float32")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_jsonl(stdlib_code_lines(32, min_chars=600), Path(tmp) / "code.jsonl")
        mask = Path(tmp) / "mask.safetensors"
        from piece_surgery.recipes.score import score_checkpoint
        from piece_surgery.scoring.options import ScoreOptions

        score_checkpoint(
            str(folder),
            data,
            ScoreOptions(method="piece-s", density=0.001),  # any 0.1% mask: bytes depend on k only
            output=mask,
            run=RunOptions(max_length=args.max_length, device="cpu"),
        )
        common = [
            "--model",
            str(folder),
            "--data",
            str(data),
            "--mask",
            str(mask),
            "--steps",
            str(args.steps),
        ]
        common += ["--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
        sparse = _launch(2, *common, "--mode", "sparse")
        dense = _launch(2, *common, "--mode", "dense")
        one = single_process(folder, data, mask, args)
    rows = [
        {"run": "piece-surgery sparse, 2 processes (DDP over the k values)", **sparse},
        {"run": "dense DDP, 2 processes (every weight trainable)", **dense},
        {"run": "piece-surgery sparse, 1 process, same global batch", **one},
    ]
    print(
        f"SmolLM2-135M fp32, density 0.001, {args.steps} steps, "
        f"batch {args.batch_size} x {args.max_length} per rank"
    )
    print(table(rows, ["run", "trainable", "bytes_per_step", "buckets_per_step", "step_seconds"]))
    print(f"bytes per step, dense / sparse: {dense['bytes_per_step'] / sparse['bytes_per_step']:,.0f}x")
    print(f"step time, 2 processes / 1 process: {sparse['step_seconds'] / one['step_seconds']:.2f}x")


if __name__ == "__main__":
    main()
