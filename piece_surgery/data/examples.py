"""What training data becomes: examples (token ids, and labels where the loss is taken) and the
dataset they form, with the record that names it (never a local path)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from piece_surgery.runtime.records import DataRecord

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the token carries no loss
    # an image record's other model inputs, as its processor made them (pixel_values, ...)
    model_inputs: dict[str, torch.Tensor] | None = field(default=None, compare=False)

    @property
    def loss_tokens(self) -> int:
        # Causal LMs predict token t from tokens < t, so the first position never carries loss.
        return sum(1 for t in self.labels[1:] if t != IGNORE)


@dataclass(frozen=True)
class Dataset:
    examples: list[Example]
    name: str  # the file's name (a record never carries a local path)
    sha256: str
    read: int  # records read from the file (after --max-samples)
    skipped: int  # records with no loss-bearing token (after truncation)
    max_length: int

    def record(self) -> DataRecord:
        return DataRecord(self.name, self.sha256, len(self.examples), self.skipped, self.max_length)
