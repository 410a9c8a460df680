"""Examples as micro-batches: right-padded, padding carrying no loss and no attention; an image
record's pixel inputs batched as its processor batches them."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from piece_surgery.data.examples import IGNORE, Example


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padding carries no loss and no attention. Image records' pixel
    inputs join the batch as their processor batches them (images.collate_model_inputs)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(e.model_inputs for e in examples):
        batch.update(collate_model_inputs(examples, width))
    return batch


def micro_batches(examples: list[Example], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start : start + batch_size], pad_id)


def pad_id(tokenizer, rows: int | None = None) -> int:
    """The token id batches are padded with: the tokenizer's pad token, else EOS, else 0; with
    `rows` (the model's embedding rows), the first of them that is a row. A padded position is
    masked out and outside the loss, so any id the embedding holds pads alike, but one past it
    (a pad token added to the tokenizer, the model not resized) would crash the lookup."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None and candidate >= 0 and (rows is None or candidate < rows):
            return candidate
    return 0


def collate_model_inputs(examples: list, width: int) -> dict[str, torch.Tensor]:
    """The examples' pixel inputs as one micro-batch's, the way the processors batch them: per-token
    inputs (shape (1, length)) right-padded with 0 to `width` and stacked; per-sample image stacks
    (Idefics3 and SmolVLM: pixel_values (1, images, C, H, W), pixel_attention_mask (1, images,
    H, W)) padded with blank images and stacked; everything else (pixel values per image, grids)
    concatenated in order. An example without images adds zeros where a row per example is needed."""
    keys = list(dict.fromkeys(k for e in examples for k in (e.model_inputs or {})))
    batch = {}
    for key in keys:
        present = [(e, e.model_inputs[key]) for e in examples if e.model_inputs and key in e.model_inputs]
        first_example, sample = present[0]
        if sample.dim() >= 2 and sample.shape[0] == 1 and sample.shape[1] == len(first_example.input_ids):
            batch[key] = _rows(examples, key, width, sample)
        elif sample.dim() == {"pixel_values": 5, "pixel_attention_mask": 4}.get(key):
            batch[key] = _rows(examples, key, max(v.shape[1] for _, v in present), sample)
        else:
            batch[key] = torch.cat([v for _, v in present])
    return batch


def _rows(examples: list, key: str, length: int, sample: torch.Tensor) -> torch.Tensor:
    """One row per example of input `key`, zero-padded along dim 1 to `length` (zeros for an
    example without it), stacked."""
    rows = torch.zeros((len(examples), length, *sample.shape[2:]), dtype=sample.dtype)
    for row, e in enumerate(examples):
        value = (e.model_inputs or {}).get(key)
        if value is not None:
            rows[row, : value.shape[1]] = value[0]
    return rows
