"""A model's forward over a batch: its logits, the model's own forward (no key/value cache), with
its floating dtype for what comes after."""

from __future__ import annotations

import torch


def batch_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits on a collated batch (with image records' pixel inputs). No key/value
    cache: nothing here generates, and a cache would hold every layer's keys and values (and
    conflict with activation checkpointing)."""
    kwargs = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) else {}
    for key, value in batch.items():  # an image record's pixel inputs, in the model's float dtype
        if key not in ("input_ids", "attention_mask", "labels"):
            kwargs[key] = value.to(_float_dtype(model)) if value.is_floating_point() else value
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
