"""score vs a plain forward+backward loop over the same data, on SmolLM2-135M (CPU-friendly).

Target (issue 2): score costs at most 1.25x the plain loop in time; its memory is at most
weights + activations + accumulators.  Run: python benchmarks/score_speed.py [--examples 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import measure, require_extras, smollm2_folder, stdlib_code_lines, table, write_jsonl


def _load(folder: Path, data: Path, max_length: int):
    import torch

    from piece_surgery.models.checkpoint import open_checkpoint

    torch.manual_seed(0)
    checkpoint = open_checkpoint(str(folder))
    dataset = checkpoint.load_data(data, max_length=max_length)
    return checkpoint, dataset, checkpoint.load_model(device="cpu", dtype="float32")


def plain_loop(folder: Path, data: Path, max_length: int) -> dict:
    """What any training script does: forward, backward into .grad, drop the gradients."""
    from piece_surgery.evaluation.loss import micro_batch_losses

    checkpoint, dataset, loaded = _load(folder, data, max_length)
    model = loaded.module
    model.eval()
    start = time.perf_counter()
    for loss, _, _ in micro_batch_losses(model, dataset, 1, checkpoint.pad_id):
        loss.backward()
        model.zero_grad(set_to_none=True)
    return {"loop_seconds": time.perf_counter() - start}


def piece_score(folder: Path, data: Path, max_length: int, method: str) -> dict:
    from piece_surgery.recipes.score import ScoreOptions
    from piece_surgery.scoring.selection import score_model

    checkpoint, dataset, loaded = _load(folder, data, max_length)
    start = time.perf_counter()
    retain = [dataset] if method == "piece-r" else []  # the retain pass costs what the data pass does
    mask, _ = score_model(
        loaded, dataset, ScoreOptions(method=method), retain=retain, pad_id=checkpoint.pad_id
    )
    return {"loop_seconds": time.perf_counter() - start, "k": mask.k, "eligible": mask.eligible}


def weights_only(folder: Path) -> dict:
    from piece_surgery.models.checkpoint import open_checkpoint

    model = open_checkpoint(str(folder)).load_model(device="cpu", dtype="float32").module
    return {"params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    require_extras()
    folder = smollm2_folder("float32")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_jsonl(stdlib_code_lines(args.examples), Path(tmp) / "code.jsonl")
        rows = [{"run": "load weights only", **measure(weights_only, folder)}]
        rows.append(
            {"run": "plain forward+backward loop", **measure(plain_loop, folder, data, args.max_length)}
        )
        for method in ("piece-s", "piece-f"):
            rows.append(
                {
                    "run": f"score --method {method}",
                    **measure(piece_score, folder, data, args.max_length, method),
                }
            )
    base = rows[1]
    for row in rows[1:]:
        row["time_ratio"] = row["loop_seconds"] / base["loop_seconds"]
        row["extra_rss_mb_vs_loop"] = row["peak_rss_mb"] - base["peak_rss_mb"]
    print(f"SmolLM2-135M fp32, {args.examples} examples x <= {args.max_length} tokens, micro-batch 1, CPU")
    print(table(rows, ["run", "loop_seconds", "time_ratio", "peak_rss_mb", "extra_rss_mb_vs_loop"]))
    eligible = rows[2].get("eligible", 0)
    print(
        f"accumulators: piece-s {8 * eligible / 2**20:.0f} MiB, piece-f {4 * eligible / 2**20:.0f} MiB "
        f"({eligible:,} eligible entries)"
    )


if __name__ == "__main__":
    main()
