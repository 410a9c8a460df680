"""The delta of trained values: each masked tensor's values against its base's, under every name
the base's files store it by."""

from __future__ import annotations

import torch

from piece_surgery.formats.delta import Delta, DeltaInfo, delta_from_values
from piece_surgery.models.checkpoint import Checkpoint, LoadedModel
from piece_surgery.runtime.dtypes import same_bits


def moved_values(base: torch.Tensor, trained: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The tuned values a delta records for `trained` (fp32, shape (k,)) against `base` (the k
    stored values, in the files' dtype), for a model that trained in `dtype`: the trained value,
    rounded once to the stored dtype, where training moved the entry (the trained value in `dtype`
    differs from the base as loaded into `dtype`), else the base's stored value bit for bit. So a
    run in another dtype than the files' (--dtype bfloat16 on an fp32 checkpoint) records no change
    where only the rounding into that dtype differs, and applying its delta leaves those entries
    as the files hold them. Returns a tensor of `base`'s dtype and shape."""
    moved = ~same_bits(trained.to(dtype), base.to(dtype))
    return torch.where(moved, trained.to(base.dtype), base)


def trained_delta(
    checkpoint: Checkpoint,
    model: LoadedModel,
    indices: dict[str, torch.Tensor],
    values: dict[str, torch.Tensor],
    info: DeltaInfo,
) -> Delta:
    """The delta of trained `values` (tensor name -> fp32 values at `indices`, int64 flat) against
    the base values read from `checkpoint`'s files: an entry changes where training moved it in the
    dtype `model` holds it in (moved_values), to its value rounded once to the stored dtype; the
    others are left out. A tensor the files also store under another name (a tied pair stored
    twice) changes under every name: transformers ties the copies on loading only while they
    agree."""
    dtypes = {name: p.dtype for name, p in model.parameters(indices).items()}
    entries = {}
    with checkpoint.reader() as reader:
        for name, idx in indices.items():
            for stored in (name, *model.aliases.get(name, [])):
                base_values = reader.get(stored).reshape(-1)[idx].clone()
                entries[stored] = (idx, base_values, moved_values(base_values, values[name], dtypes[name]))
    shapes = {n: checkpoint.layout[n].shape for n in entries}
    return delta_from_values(entries, shapes, info, model.twins)
