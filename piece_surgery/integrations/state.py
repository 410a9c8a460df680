"""A sparsified model's state dict is the model's own: `state_dict()` (so `save_pretrained` and
Trainer's checkpoints) holds the model's keys alone, its weights holding the trained values (the
values are written into them first: training/sparse_grad.py); loading such a state dict (Trainer's
resume, load_best_model_at_end) reads the values back from its weights, once it is checked to have
been trained with this model's mask: its weights differ from the model's at the mask's entries alone.

A Trainer checkpoint also keeps the fp32 values themselves beside the weights (VALUES_FILE, with the
mask's digest), which a resume reads back: the weights hold the values rounded to their dtype.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from piece_surgery.models.fused import holder
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.sharding import full, is_sharded
from piece_surgery.training.sparse_grad import SparseParameters


class StateDictHooks:
    """The hooks on `model` (the one `sparse` is attached to) that keep the values (a submodule named
    `holder_name`) out of its state dict and bring them back in from a loaded one; `remove()` takes
    them off."""

    def __init__(self, model: torch.nn.Module, sparse: SparseParameters, holder_name: str):
        self.model, self.sparse, self.holder_name = model, sparse, holder_name
        self._from_weights = False  # whether the state dict being loaded lacks the values
        self.handles = [  # torch marks a state dict post-hook, which a bound method cannot take
            model.register_state_dict_post_hook(lambda *args: self._drop_values(*args)),
            model.register_load_state_dict_pre_hook(self._check_loaded),
            model.register_load_state_dict_post_hook(self._after_load),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _is_value(self, key: str, prefix: str = "") -> bool:
        return key.startswith(f"{prefix}{self.holder_name}.")

    def _drop_values(self, module, state_dict, prefix, local_metadata) -> None:
        for key in [k for k in state_dict if self._is_value(k, prefix)]:
            del state_dict[key]
        metadata = getattr(state_dict, "_metadata", None) or {}
        for key in [k for k in metadata if k == f"{prefix}{self.holder_name}" or self._is_value(k, prefix)]:
            del metadata[key]

    def _check_loaded(self, module, state_dict, prefix, *_) -> None:
        """Before any weight is copied: a state dict that holds values (saved by an older version)
        holds as many per tensor as this mask has; one that holds weights alone differs from the
        model's only at the mask's entries. PieceError in one line otherwise."""
        saved = {k: tuple(v.shape) for k, v in state_dict.items() if self._is_value(k, prefix)}
        self._from_weights = not saved
        if saved:
            values = module.get_submodule(self.holder_name).values.items()
            ours = {f"{prefix}{self.holder_name}.values.{k}": tuple(v.shape) for k, v in values}
            if saved != ours:
                raise _another_mask()
            return
        trained = _mask_positions(self.sparse)
        for name, param in module.named_parameters(remove_duplicate=False):
            incoming = state_dict.get(prefix + name)
            if self._is_value(name) or not isinstance(incoming, torch.Tensor) or is_sharded(param):
                continue
            if incoming.shape != param.shape:
                continue  # load_state_dict names the shape mismatch itself
            held = param.detach().reshape(-1)
            new = incoming.detach().reshape(-1).to(device=held.device, dtype=held.dtype)
            differ = (
                (held != new) & ~(held.isnan() & new.isnan()) if held.is_floating_point() else held != new
            )
            if id(param) in trained:
                differ[trained[id(param)].to(held.device)] = False
            if bool(differ.any()):
                raise _another_mask(f" ('{name}' differs outside the mask's entries)")

    def _after_load(self, module, incompatible) -> None:
        """The values are not in a state dict this model saved: not missing, and read from the weights."""
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if self.holder_name not in k]
        if not self._from_weights:
            return
        with torch.no_grad():
            for name, value in self.sparse.values.items():
                weight = full(self.sparse.params[name]).detach().reshape(-1)
                value.copy_(weight[self.sparse.indices[name]].float())


def _mask_positions(sparse: SparseParameters) -> dict[int, torch.Tensor]:
    """id(model parameter) -> the flat positions of the mask's entries in it (experts stored one
    tensor each are parts of one fused parameter: their entries sit at the part's offset)."""
    positions: dict[int, list[torch.Tensor]] = {}
    for name, tensor in sparse.params.items():
        param, offset = holder(tensor)
        positions.setdefault(id(param), []).append(sparse.indices[name].cpu() + offset)
    return {key: torch.cat(parts) for key, parts in positions.items()}


VALUES_FILE = "piece-values.safetensors"  # in a Trainer checkpoint folder


def save_values(sparse: SparseParameters, mask_digest: str, folder: Path) -> None:
    """Write the values (fp32, by tensor name) and the mask's digest into `folder`, atomically."""
    values = {n: v.detach().cpu().contiguous() for n, v in sparse.values.items()}
    tmp = folder / f".{VALUES_FILE}.tmp"
    save_file(values, tmp, metadata={"mask": mask_digest})
    os.replace(tmp, folder / VALUES_FILE)


def load_values(sparse: SparseParameters, mask_digest: str, file: Path) -> None:
    """Put the values save_values wrote into `sparse`'s values. PieceError for values saved with
    another mask, or a file that is not one save_values wrote."""
    try:
        with safe_open(file, "pt") as opened:
            digest = (opened.metadata() or {}).get("mask")
            saved = {n: opened.get_tensor(n) for n in opened.keys()}  # noqa: SIM118 (not a dict)
    except (OSError, SafetensorError) as exc:
        raise PieceError(f"cannot read the sparse values at {file}: {exc}") from None
    shapes = {n: tuple(v.shape) for n, v in saved.items()}
    if digest != mask_digest or shapes != {n: tuple(v.shape) for n, v in sparse.values.items()}:
        raise _another_mask()
    with torch.no_grad():
        for name, value in sparse.values.items():
            value.copy_(saved[name].to(value.device))


def _another_mask(detail: str = "") -> PieceError:
    return PieceError(
        f"the checkpoint was trained with another mask than this model's{detail}: sparsify with the "
        "mask the run was started with (or start a new run)"
    )
