"""Where a run reports its steps while it trains: TensorBoard and Weights & Biases, through their own
libraries (the `tensorboard` and `wandb` extras). Nothing is written unless asked (`--report-to`).

Each step's record (train_sparse's: loss, lr, grad_norm, and the drifts and held-out loss where a
step measured them) is logged at its step as `train/loss`, `train/lr`, `train/grad_norm`,
`train/predicted_drift`, `eval/measured_drift` and `eval/loss`. TensorBoard's event files go into
the logging folder, W&B's run into its `wandb/` subfolder (W&B honours WANDB_MODE, WANDB_PROJECT and
its login as usual; WANDB_MODE=offline keeps the run on disk).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from piece_surgery.runtime.errors import PieceError, first_line

REPORTERS = ("tensorboard", "wandb")
TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "predicted_drift": "train/predicted_drift",
    "measured_drift": "eval/measured_drift",
    "eval_loss": "eval/loss",
}


def parse_report_to(text: str | None) -> tuple[str, ...]:
    """--report-to: `none`, or tensorboard and/or wandb, comma-separated; each checked installed.
    PieceError, one line, for an unknown name or a library that is not installed."""
    names = [n.strip().lower() for n in (text or "none").split(",") if n.strip()]
    if names in ([], ["none"]):
        return ()
    for name in names:
        if name not in REPORTERS:
            raise PieceError(f"unknown --report-to '{name}'; use tensorboard, wandb or none")
        _library(name)
    return tuple(dict.fromkeys(names))


def _library(name: str):
    try:
        if name == "tensorboard":
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter
        import wandb

        return wandb
    except ImportError as exc:
        raise PieceError(f"--report-to {name} needs {name}: pip install 'piece-surgery[{name}]'") from exc


class Reporters:
    """The reporters a run writes to (none: every call does nothing)."""

    def __init__(
        self, names: Sequence[str], folder: Path | None, run_name: str, config: dict, *, quiet: bool = False
    ):
        self.names = tuple(names)
        self.writer = None
        self.wandb = None
        self.logged: dict[int, set[str]] = {}
        if not self.names:
            return
        folder.mkdir(parents=True, exist_ok=True)
        if "tensorboard" in self.names:
            self.writer = _library("tensorboard")(log_dir=str(folder))
            self.writer.add_text("config", "\n".join(f"{k}: {v}" for k, v in sorted(config.items())))
        if "wandb" in self.names:
            self.wandb = self._start_wandb(folder, run_name, config, quiet)

    @staticmethod
    def _start_wandb(folder: Path, run_name: str, config: dict, quiet: bool):
        wandb = _library("wandb")
        try:
            return wandb.init(
                project=os.environ.get("WANDB_PROJECT", "piece-surgery"),
                name=run_name,
                dir=str(folder),
                config=config,
                settings=wandb.Settings(silent=quiet),  # -q: not W&B's banner either
            )
        except Exception as exc:  # no login, no network in online mode, a bad setting: W&B's own words
            raise PieceError(
                f"--report-to wandb could not start a run: {first_line(exc)} (log in with `wandb login`, "
                "or set WANDB_MODE=offline)"
            ) from None

    def log(self, record: dict) -> None:
        """A step's figures (those not logged at that step yet)."""
        step = int(record["step"])
        done = self.logged.setdefault(step, set())
        figures = {
            TAGS[k]: float(v) for k, v in record.items() if k in TAGS and v is not None and k not in done
        }
        done.update(k for k in record if k in TAGS)
        if not figures:
            return
        if self.writer is not None:
            for tag, value in figures.items():
                self.writer.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(figures, step=step)

    def close(self, history: Sequence[dict] = (), *, failed: bool = False) -> None:
        """Log what the last step measured after the loop (the final drift), then close."""
        if history and not failed:
            self.log(history[-1])
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
            self.wandb = None
