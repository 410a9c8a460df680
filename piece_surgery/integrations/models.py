"""A model already loaded in memory, named as its checkpoint's files name its tensors: the link
between a user's `transformers` model and the masks and deltas, which name stored tensors. A model
that claims a checkpoint is checked to be it (names, shapes and some values) before a mask or a
delta records that checkpoint's identity."""

from __future__ import annotations

from pathlib import Path

import torch

from piece_surgery.io.sniff import CHECKPOINT, sniff
from piece_surgery.models.checkpoint import Checkpoint, LoadedModel, open_checkpoint
from piece_surgery.models.fused import fused_slices
from piece_surgery.models.pairing import parameter_keys, stored_aliases, stored_names, unstored_twins
from piece_surgery.runtime.errors import PieceError, quote

HOLDER = "piece_surgery"  # the submodule of a sparsified model that holds its trainable values


def check_model(model: object, what: str = "the model") -> torch.nn.Module:
    """`model` if it is a torch module; PieceError naming what it is otherwise."""
    if not isinstance(model, torch.nn.Module):
        raise PieceError(
            f"{what} must be a loaded model (a torch.nn.Module, e.g. from "
            f"AutoModelForCausalLM.from_pretrained), got {type(model).__name__}"
        )
    return model


def checkpoint_of(
    model: torch.nn.Module, checkpoint: str | Path | Checkpoint | None = None
) -> Checkpoint | None:
    """The checkpoint `model` was loaded from: `checkpoint` (a folder, a Hub repo id or an opened
    Checkpoint), else the local folder its config names (`name_or_path`), else None (a model made
    in memory). PieceError for another kind of `checkpoint` or one that cannot be opened."""
    check_model(model)
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    if checkpoint is not None:
        if not isinstance(checkpoint, str | Path):
            raise PieceError(
                f"checkpoint must be a folder or Hub repo id (str or Path), got {type(checkpoint).__name__}"
            )
        return open_checkpoint(str(checkpoint), what="base checkpoint")
    folder = getattr(getattr(model, "config", None), "name_or_path", None) or ""
    if isinstance(folder, str | Path) and folder and CHECKPOINT in sniff(Path(folder).expanduser()):
        return open_checkpoint(str(folder), what="base checkpoint")
    return None


def loaded(model: torch.nn.Module, checkpoint: Checkpoint | None) -> LoadedModel:
    """`model` with its parameters named as the checkpoint's files name them (as loading pairs
    them: models/pairing.py, experts stored one tensor each as parts of their fused parameter);
    without a checkpoint, as `model.state_dict()` names them (what save_pretrained writes for a
    text model). PieceError for a model whose parameters are not its checkpoint's: one the files
    do not store (another architecture, another config), or one of another shape. Names only: see
    check_weights for the values."""
    params = {n: p for n, p in model.named_parameters() if not n.startswith(f"{HOLDER}.")}
    if checkpoint is None:
        return LoadedModel(model, {n: n for n in params})
    layout = checkpoint.layout
    keys = parameter_keys(model, layout)
    slices = fused_slices(model, layout)
    source = checkpoint.identity.name
    for name, key in keys.items():
        if tuple(layout[key].shape) != tuple(params[name].shape):
            raise PieceError(
                f"the model's '{name}' is {list(params[name].shape)} but checkpoint '{source}' stores "
                f"'{key}' as {list(layout[key].shape)}: give the checkpoint the model was loaded from"
            )
    fused = {s.param for s in slices.values()}
    # a stored tensor the model lacks is not refused here: loading ignores some (GPT-2's
    # attn.masked_bias, old rotary buffers), and a model that is not the checkpoint's fails
    # check_weights; a weight the files lack would have been filled with random values
    unstored = [n for n in params if n not in keys and n not in fused]
    if unstored:
        raise PieceError(
            f"checkpoint '{source}' lacks {len(unstored)} of the model's weights (first: '{unstored[0]}'): "
            "give the checkpoint the model was loaded from"
        )
    return LoadedModel(model, keys, stored_aliases(model, layout), unstored_twins(model, layout), slices)


def check_weights(model: LoadedModel, checkpoint: Checkpoint) -> None:
    """The loaded model holds the checkpoint's weights, as a mask or delta that records the
    checkpoint's identity assumes: every entry of each stored vector (norm gains, biases) and of
    the first and last row of every other stored tensor equals the files' (cast to the model's
    dtype: a model loaded in another dtype is the checkpoint's). Reads those rows only, about what
    the checkpoint's fingerprint reads plus the vectors. Weights on the meta device or sharded
    (DTensor) are not read, nor a sparsified model's values. PieceError naming the first tensor
    that differs."""
    module = model.module
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(dict(module.named_buffers(remove_duplicate=False)))
    pairs = [(name, key, tensors[name]) for name, key in stored_names(module, checkpoint.layout).items()]
    pairs = [p for p in pairs if p[0] in tensors]
    params = dict(module.named_parameters())
    pairs += [(s.param, key, s.of(params[s.param])) for key, s in model.slices.items() if s.param in params]
    with checkpoint.reader() as reader:
        for name, key, tensor in pairs:
            held = tensor.detach()
            if type(held) is not torch.Tensor or held.device.type == "meta" or not held.numel():
                continue
            if held.dim() <= 1:
                parts = [(held, reader.get(key))]
            else:
                parts = list(zip((held[0], held[-1]), reader.edge_rows(key), strict=True))
            if not all(_same(h.cpu(), s) for h, s in parts):
                raise PieceError(
                    f"the model's weights are not those of checkpoint '{quote(checkpoint.identity.name)}' "
                    f"('{name}' differs from the stored '{key}'): give checkpoint= the folder the model "
                    "was loaded from, or save the model (save_pretrained) and use that folder"
                )


def _same(held: torch.Tensor, stored: torch.Tensor) -> bool:
    """Whether the stored values, cast to the held dtype, are the held ones (nan equal to nan)."""
    stored = stored.to(held.dtype)
    if held.shape != stored.shape:
        return False
    if held.is_floating_point() or held.is_complex():
        return bool(((held == stored) | (held.isnan() & stored.isnan())).all())
    return torch.equal(held, stored)
