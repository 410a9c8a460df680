"""What training a mixture-of-experts model's experts costs (issue 33).

A fused expert weight (transformers 5's `mlp.experts.gate_up_proj`, `down_proj`: 3-D, every expert of
a layer) is not a linear layer, so the sparse trainer gives its selected entries their gradient by
injecting them into the weight for the forward (sparse_grad's `inject` path): backward then forms the
weight's dense gradient, as full fine-tuning does, and keeps the selected entries of it. This
measures a training step's time and the process's peak memory for masks of the same size in the
attention layers only (linear layers: the selected entries' gradient alone) and in the experts only
(inject), beside a plain forward and backward that forms every weight's gradient (full
fine-tuning's step without its optimizer), on a Qwen3-MoE-style model of 4 layers x 8 experts (hidden
256, expert width 512; 15M parameters, 13M of them in experts) stored one tensor per expert.

Run: python benchmarks/moe_train_speed.py   (a minute or two on 2 cores; results/moe_train_speed.json)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from common import measure, stdlib_code_lines, table, write_jsonl

RESULTS = Path(__file__).parent / "results" / "moe_train_speed.json"
SIZES = dict(
    hidden_size=256,
    moe_intermediate_size=512,
    num_experts=8,
    num_experts_per_tok=2,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
)
STEPS, ENTRIES, REPEATS = 8, 20_000, 3


def step_time(folder: str, data: str, group: str) -> dict:
    """Seconds per training step (the first two are warm-up) for a random mask of ENTRIES entries
    spread over `group`'s tensors, or for a dense forward and backward (`dense`)."""
    import torch

    from piece_surgery.evaluation.loss import micro_batch_losses
    from piece_surgery.models.checkpoint import open_checkpoint
    from piece_surgery.training.config import TrainConfig
    from piece_surgery.training.loop import train_sparse

    torch.manual_seed(0)
    checkpoint = open_checkpoint(folder)
    loaded = checkpoint.load_model(device="cpu")
    dataset = checkpoint.load_data(Path(data), max_length=128)
    if group == "dense":
        model = loaded.module
        times = []
        batches = micro_batch_losses(model, dataset, 4, 0)
        while len(times) < STEPS:
            start = time.perf_counter()
            loss, _, _ = next(batches)
            loss.backward()
            model.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        return {"step_seconds": sum(times[2:]) / len(times[2:]), "entries": "every weight's gradient"}
    names = [n for n in loaded.parameters() if (".experts." in n) == (group == "experts") and "proj" in n]
    names = [n for n in names if group == "experts" or "self_attn" in n]
    sizes = {n: loaded.parameters([n])[n].numel() for n in names}
    total = sum(sizes.values())
    gen = torch.Generator().manual_seed(0)
    indices = {}
    for n in names:
        k = max(1, round(ENTRIES * sizes[n] / total))
        indices[n] = torch.randperm(sizes[n], generator=gen)[:k].sort().values
    config = TrainConfig(lr=1e-4, max_steps=STEPS, batch_size=4)
    start = time.perf_counter()
    marks = []
    train_sparse(
        loaded.module,
        loaded.parameters(indices),
        indices,
        dataset,
        config,
        progress=lambda n, record: marks.append(time.perf_counter()),
    )
    steps = [b - a for a, b in zip([start, *marks], marks, strict=False)]
    return {
        "step_seconds": sum(steps[2:]) / len(steps[2:]),
        "entries": sum(i.numel() for i in indices.values()),
    }


def main() -> None:
    from piece_surgery.models.tiny import make_tiny_checkpoint

    work = Path(tempfile.mkdtemp(prefix="moe-train-speed-"))
    folder = make_tiny_checkpoint(work / "model", "qwen3_moe", **SIZES)
    data = write_jsonl(stdlib_code_lines(64), work / "code.jsonl")
    runs: dict[str, list[dict]] = {"attention": [], "experts": [], "dense": []}
    for _ in range(REPEATS):  # interleaved: a busy machine slows every kind alike
        for group, found in runs.items():
            found.append(measure(step_time, str(folder), str(data), group))
            print(json.dumps({"mask in": group, **found[-1]}), file=sys.stderr)
    rows = []
    for group, found in runs.items():
        times = sorted(r["step_seconds"] for r in found)
        rows.append(
            {
                "mask in": group,
                "entries": found[0]["entries"],
                "median step_seconds": times[len(times) // 2],
                "step_seconds": times,
                "peak_rss_mb": max(r["peak_rss_mb"] for r in found),
            }
        )
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
