"""How to score (ScoreOptions): the method, the density, what is eligible, and how piece-r takes
its retain Fisher; checked when made, with the help text the CLI shows on each field. No torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from piece_surgery.models.eligible import DEFAULT_EXCLUDE
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.options import check_density, check_seed
from piece_surgery.runtime.records import JsonRecord
from piece_surgery.scoring.methods import DEFAULT_METHOD, METHODS, method_named

LABELS = ("empirical", "sampled")


NORMALIZATIONS = ("none", "tensor")


def check_labels(labels: str) -> None:
    if labels not in LABELS:
        raise PieceError(f"unknown --retain-labels '{labels}'; use empirical or sampled")


def check_normalization(how: str) -> None:
    if how not in NORMALIZATIONS:
        raise PieceError(f"unknown --normalize '{how}'; use none or tensor")


# piece-r drifted far less than PIECE-S for the same domain gain, and delta = the 1st percentile of
# F_retain less than the 10th (docs/evidence.md)
DEFAULT_RETAIN_DAMPING = 0.01


@dataclass
class ScoreOptions(JsonRecord):
    """How to score; checked when made, so mistakes fail in milliseconds, before any loading."""

    method: str = field(default=DEFAULT_METHOD, metadata={"help": ", ".join(METHODS) + "."})
    density: float = field(default=0.001, metadata={"help": "Fraction of eligible entries to select."})
    batch_size: int = field(
        default=1, metadata={"help": "Micro-batch size: one gradient g_b per micro-batch."}
    )
    include: list[str] = field(default_factory=list, metadata={"help": "Regex on tensor names; repeatable."})
    exclude: list[str] = field(
        default_factory=lambda: list(DEFAULT_EXCLUDE),
        metadata={"help": "Regex: matching tensors are not eligible; repeatable. [default: embed]"},
    )
    seed: int = field(default=0, metadata={"help": "Seed (random method, self text, sampled labels)."})
    offload_accumulators: bool = field(
        default=False, metadata={"help": "Keep the fp32 sums in host memory (large models on GPU)."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Trade compute for activation memory."}
    )
    normalize: str = field(
        default="none",
        metadata={"help": "none, or tensor: scores divided by each tensor's mean before the top-k."},
    )
    # piece-r: how the retain Fisher is taken and damped, and what `--retain self` samples
    retain_labels: str = field(
        default="empirical",
        metadata={"help": "piece-r: empirical (the text's tokens) or sampled (drawn from the model)."},
    )
    retain_damping: float = field(
        default=DEFAULT_RETAIN_DAMPING, metadata={"help": "piece-r: delta = this quantile of F_retain."}
    )
    self_samples: int = field(default=64, metadata={"help": "--retain self: texts to write."})
    self_length: int = field(default=128, metadata={"help": "--retain self: tokens per text."})

    def __post_init__(self) -> None:
        method_named(self.method)
        check_seed(self.seed)
        check_normalization(self.normalize)
        check_density(self.density)
        check_labels(self.retain_labels)
        if self.batch_size < 1:
            raise PieceError("--batch-size must be at least 1")
        if not (0.0 <= self.retain_damping <= 1.0):  # also refuses nan
            raise PieceError(f"--retain-damping {self.retain_damping} is a quantile: give a number in [0, 1]")
        if self.self_samples < 1 or self.self_length < 2:
            raise PieceError("--self-samples must be at least 1 and --self-length at least 2")
        for pattern in [*self.include, *self.exclude]:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise PieceError(f"pattern '{pattern}' is not a valid regex: {exc}") from exc
