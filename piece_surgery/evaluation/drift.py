"""What a candidate model changed against its base on a dataset: the mean token loss of both, the
mean token KL(base || candidate) (the drift), and the share of tokens whose most likely next token
changed. The same measure `eval`, `train --eval-general` and the benchmarks report.

Every figure is over the loss-bearing positions of the data (those that predict a loss-bearing
token: a prompt's tokens and padding excluded), in nats per token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from piece_surgery.data.batches import micro_batches
from piece_surgery.data.examples import IGNORE, Dataset
from piece_surgery.evaluation.forward import batch_logits

Forward = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # a collated batch -> logits


@dataclass
class Comparison:
    """Running sums over a dataset's loss-bearing tokens (all in float64)."""

    tokens: int = 0
    base_loss_sum: float = 0.0
    loss_sum: float = 0.0
    kl_sum: float = 0.0
    top1_changed: int = 0
    differs: bool = False  # whether any logit differed from the base's, bit for bit

    def add(self, base_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One batch: logits (batch, length, vocab) of the base and the candidate, labels (batch,
        length) with IGNORE where a token bears no loss."""
        self.differs = self.differs or not torch.equal(base_logits, logits)
        keep = labels[:, 1:] != IGNORE
        targets = labels[:, 1:][keep]
        base = torch.log_softmax(base_logits[:, :-1][keep].float(), dim=-1)
        tuned = torch.log_softmax(logits[:, :-1][keep].float(), dim=-1)
        self.tokens += int(targets.numel())
        self.base_loss_sum -= float(base.gather(1, targets[:, None]).sum(dtype=torch.float64))
        self.loss_sum -= float(tuned.gather(1, targets[:, None]).sum(dtype=torch.float64))
        self.kl_sum += float((base.exp() * (base - tuned)).sum(dtype=torch.float64))
        self.top1_changed += int((base.argmax(-1) != tuned.argmax(-1)).sum())

    @property
    def base_loss(self) -> float:
        return self.base_loss_sum / max(self.tokens, 1)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1)

    @property
    def kl(self) -> float:
        """Mean token KL(base || candidate), nats; >= 0 (to rounding), 0 for the base itself."""
        return self.kl_sum / max(self.tokens, 1)

    @property
    def top1_share(self) -> float:
        return self.top1_changed / max(self.tokens, 1)

    def to_json(self) -> dict:
        return {
            "tokens": self.tokens,
            "base_loss": self.base_loss,
            "loss": self.loss,
            "kl": self.kl,
            "top1_changed": self.top1_share,
            "changes_outputs": self.differs,
        }


def batches(dataset: Dataset, batch_size: int, pad_id: int, device: torch.device) -> Iterator[dict]:
    for batch in micro_batches(dataset.examples, batch_size, pad_id):
        yield {k: v.to(device) for k, v in batch.items()}


def model_forward(model: torch.nn.Module) -> Forward:
    """A model's logits on a batch, without gradients."""

    @torch.no_grad()
    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch_logits(model, batch)

    return forward


def compare(
    dataset: Dataset,
    base: Forward,
    candidates: dict[str, Forward],
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Comparison]:
    """Each candidate against the base on `dataset`: the base's logits are computed once per
    batch, then each candidate's (a forward may switch a delta in first: see DeltaSwitcher)."""
    results = {name: Comparison() for name in candidates}
    for batch in batches(dataset, batch_size, pad_id, device):
        base_logits = base(batch)
        for name, forward in candidates.items():
            results[name].add(base_logits, forward(batch), batch["labels"])
        if progress:
            progress(batch["input_ids"].shape[0])
    return results
