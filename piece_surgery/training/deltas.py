"""The delta of trained values: each masked tensor's values against its base's, under every name
the base's files store it by."""

from __future__ import annotations

import torch

from piece_surgery.formats.delta import Delta, DeltaInfo, delta_from_values
from piece_surgery.models.checkpoint import Checkpoint, LoadedModel


def trained_delta(
    checkpoint: Checkpoint,
    model: LoadedModel,
    indices: dict[str, torch.Tensor],
    values: dict[str, torch.Tensor],
    info: DeltaInfo,
) -> Delta:
    """The delta of trained `values` (tensor name -> fp32 values at `indices`, int64 flat) against
    the base values read from `checkpoint`'s files, each value rounded once to its tensor's stored
    dtype; entries that did not change are left out. A tensor the files also store under another
    name (a tied pair stored twice) changes under every name: transformers ties the copies on
    loading only while they agree."""
    entries = {}
    with checkpoint.reader() as reader:
        for name, idx in indices.items():
            for stored in (name, *model.aliases.get(name, [])):
                base_values = reader.get(stored).reshape(-1)[idx].clone()
                entries[stored] = (idx, base_values, values[name].to(base_values.dtype))
    shapes = {n: checkpoint.layout[n].shape for n in entries}
    return delta_from_values(entries, shapes, info, model.twins)
