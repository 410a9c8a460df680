"""A model already loaded in memory, named as its checkpoint's files name its tensors: the link
between a user's `transformers` model and the masks and deltas, which name stored tensors."""

from __future__ import annotations

from pathlib import Path

import torch

from piece_surgery.io.sniff import CHECKPOINT, sniff
from piece_surgery.models.checkpoint import Checkpoint, LoadedModel, open_checkpoint
from piece_surgery.models.pairing import parameter_keys, stored_aliases, unstored_twins
from piece_surgery.runtime.errors import PieceError


def checkpoint_of(model: torch.nn.Module, checkpoint: str | Path | None = None) -> Checkpoint | None:
    """The checkpoint `model` was loaded from: `checkpoint` (a folder or Hub repo id), else the
    local folder its config names (`name_or_path`), else None (a model made in memory)."""
    if checkpoint is not None:
        return open_checkpoint(str(checkpoint), what="base checkpoint")
    folder = getattr(getattr(model, "config", None), "name_or_path", None) or ""
    if folder and CHECKPOINT in sniff(Path(folder).expanduser()):
        return open_checkpoint(folder, what="base checkpoint")
    return None


def loaded(model: torch.nn.Module, checkpoint: Checkpoint | None) -> LoadedModel:
    """`model` with its parameters named as the checkpoint's files name them (as loading pairs
    them: models/pairing.py); without a checkpoint, as `model.state_dict()` names them (what
    save_pretrained writes for a text model). PieceError for a model whose parameters are not its
    checkpoint's (another architecture, another config)."""
    if checkpoint is None:
        names = [n for n, _ in model.named_parameters()]
        return LoadedModel(model, {n: n for n in names})
    layout = checkpoint.layout
    keys = parameter_keys(model, layout)
    shapes = dict(model.named_parameters())
    for name, key in keys.items():
        if tuple(layout[key].shape) != tuple(shapes[name].shape):
            raise PieceError(
                f"the model's '{name}' is {list(shapes[name].shape)} but checkpoint "
                f"'{checkpoint.identity.name}' stores '{key}' as {list(layout[key].shape)}: give the "
                "checkpoint the model was loaded from"
            )
    return LoadedModel(model, keys, stored_aliases(model, layout), unstored_twins(model, layout))
