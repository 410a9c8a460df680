"""The training loss: mean token cross-entropy of a micro-batch, and passes over a dataset with it."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from piece_surgery.data.batches import micro_batches
from piece_surgery.data.examples import IGNORE, Dataset
from piece_surgery.evaluation.forward import batch_logits
from piece_surgery.runtime.errors import PieceError


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The summed cross-entropy (nats, fp32 scalar) over a micro-batch's loss-bearing tokens, and
    their count. `logits` (batch, length, vocab) predict the next token; `labels` (batch, length)
    carry IGNORE where a token bears no loss (prompt, padding)."""
    # Shift the labels, not the logits: slicing the logits would copy a (tokens x vocab) tensor.
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)
    count = int((shifted != IGNORE).sum())
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), shifted, ignore_index=IGNORE, reduction="sum"
    )
    return loss, count


def mean_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the loss-bearing tokens of a micro-batch, and their count."""
    loss, count = token_loss_sum(logits, labels)
    return loss / max(count, 1), count


def sampled_labels(logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Labels drawn from the model's own next-token distribution at the loss-bearing positions.

    The gradient of the loss on them is a sample of the model's Fisher (the Hessian of the KL from
    the model), where the data's own labels give the empirical Fisher.
    """
    probs = torch.softmax(logits[:, :-1].detach().float(), dim=-1)
    if not bool(torch.isfinite(probs).all()):
        raise PieceError(
            "the model's next-token probabilities are nan or inf, so labels cannot be drawn from it "
            "(--retain-labels sampled): check the checkpoint's weights, or try --dtype float32"
        )
    drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    out = labels.clone()
    out[:, 1:] = torch.where(labels[:, 1:] != IGNORE, drawn.view(labels.shape[0], -1), IGNORE)
    return out


def micro_batch_losses(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int,
    pad_id: int,
    *,
    sample_labels: torch.Generator | None = None,
    shard: tuple[int, int] | None = None,
) -> Iterator[tuple[torch.Tensor, int, int]]:
    """For each micro-batch in order: its mean token loss (with its graph, unless under no_grad),
    its loss-bearing tokens and its examples. With a generator in `sample_labels`, the loss is on
    labels drawn from the model's own distribution (sampled_labels). With `shard=(rank, ranks)`,
    only micro-batches rank, rank + ranks, ... (each rank its share; micro-batches as in one process)."""
    device = next(model.parameters()).device
    for b, batch in enumerate(micro_batches(dataset.examples, batch_size, pad_id)):
        if shard is not None and b % shard[1] != shard[0]:
            continue
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = batch_logits(model, batch)
        labels = batch["labels"]
        if sample_labels is not None:
            labels = sampled_labels(logits, labels, sample_labels)
        loss, count = mean_token_loss(logits, labels)
        del logits  # backward needs the log-probabilities only: free (tokens x vocab) first
        yield loss, count, batch["input_ids"].shape[0]


def evaluate(model: torch.nn.Module, dataset: Dataset, batch_size: int, pad_id: int) -> float:
    """Token-weighted mean loss over a dataset (the model's train/eval mode is kept)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for loss, count, _ in micro_batch_losses(model, dataset, batch_size, pad_id):
            total += float(loss) * count
            tokens += count
    model.train(was_training)
    return total / max(tokens, 1)
