"""How `eval` measures (EvalOptions): batches, and the text the base writes for `--general self`.
No torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.options import check_seed
from piece_surgery.runtime.records import JsonRecord


@dataclass(frozen=True)
class EvalOptions(JsonRecord):
    """How `eval` measures: batches, and the text the base writes itself for `--general self`."""

    batch_size: int = field(default=4, metadata={"help": "Examples per forward pass."})
    seed: int = field(default=0, metadata={"help": "Seed of the text the base writes (--general self)."})
    self_samples: int = field(default=64, metadata={"help": "--general self: texts the base writes."})
    self_length: int = field(
        default=128, metadata={"help": "--general self: tokens per text.", "metavar": "TOKENS"}
    )

    def __post_init__(self) -> None:
        check_seed(self.seed)
        if self.batch_size < 1:
            raise PieceError("--batch-size must be at least 1")
        if self.self_samples < 1 or self.self_length < 2:
            raise PieceError("--self-samples must be at least 1 and --self-length at least 2")
