"""Serve two domains from one base model: both deltas stay resident, and each request switches the
model to its domain's delta (only those entries are written; the base's bits come back exactly).

    python examples/swap.py                                   # a tiny model, two deltas in seconds
    python examples/swap.py BASE CODE_DELTA PROSE_DELTA       # your own
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from piece_surgery import DeltaSwitcher, open_delta
from piece_surgery.evaluation.loss import evaluate
from piece_surgery.models.checkpoint import open_checkpoint

HERE = Path(__file__).parent / "data"


def make_demo(work: Path) -> tuple[str, str, str]:
    """A tiny random model and one delta per domain, trained for a few steps."""
    from piece_surgery.models.tiny import write_tiny_model
    from piece_surgery.recipes.train import train_checkpoint
    from piece_surgery.training.config import TrainConfig

    base = write_tiny_model(work / "base")
    config = TrainConfig(lr=1e-2, epochs=5, batch_size=2)
    for name, data in (("code", HERE / "code.jsonl"), ("prose", HERE / "prose.txt")):
        train_checkpoint(str(base), data, work / name, config)
    return str(base), str(work / "code"), str(work / "prose")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base, code, prose = sys.argv[1:4] if len(sys.argv) == 4 else make_demo(Path(tmp))
        checkpoint = open_checkpoint(base)
        model = checkpoint.load_model(device="auto").module.eval()
        texts = {
            "code": checkpoint.load_data(HERE / "code.jsonl"),
            "prose": checkpoint.load_data(HERE / "prose.txt"),
        }
        switcher = DeltaSwitcher(model)
        switcher.add("code", open_delta(code))
        switcher.add("prose", open_delta(prose))
        before = {n: p.detach().clone() for n, p in model.state_dict().items()}
        print("mean token loss     on code text   on prose text")
        for active in (None, "code", "prose"):
            with switcher.using(active):  # what a server does per request
                losses = [evaluate(model, texts[d], 4, checkpoint.pad_id) for d in ("code", "prose")]
            print(f"{active or 'base':<18}  {losses[0]:>12.4f}   {losses[1]:>12.4f}")
        exact = all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
        print(f"base restored bit for bit after the switches: {exact}")


if __name__ == "__main__":
    main()
