"""A loaded model whose masked entries, alone, are trainable parameters: what `sparsify` returns.

The k values of each masked tensor (fp32) are registered as parameters of the model, under one
submodule (`model.piece_surgery`), and every weight is frozen; gradients reach the values through
module hooks (training/sparse_grad.py), whatever else replaces the model's forwards. So any loop
that optimizes `p for p in model.parameters() if p.requires_grad` trains exactly the masked
entries: a plain PyTorch loop, Hugging Face Trainer, TRL, accelerate (DDP then synchronises the k
values alone). Optimizer state is O(k); no dense gradient of a frozen weight is ever kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from piece_surgery.formats.delta import Delta, DeltaInfo, TrainProvenance, delta_from_values
from piece_surgery.formats.delta_folder import DEFAULT_FORMAT, save_delta
from piece_surgery.formats.mask import Mask, check_scored_on
from piece_surgery.integrations.models import HOLDER, check_model, check_weights, checkpoint_of, loaded
from piece_surgery.integrations.state import StateDictHooks
from piece_surgery.io.outputs import check_output
from piece_surgery.io.sniff import DELTA
from piece_surgery.models.checkpoint import Checkpoint, LoadedModel
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.options import check_weight
from piece_surgery.training.budget import DriftEstimate
from piece_surgery.training.deltas import moved_values, trained_delta
from piece_surgery.training.sparse_grad import SparseParameters


class _Values(torch.nn.Module):
    """The trainable values as parameters of one module (ParameterDict keys cannot hold dots)."""

    def __init__(self, values: dict[str, torch.nn.Parameter]):
        super().__init__()
        self.values = torch.nn.ParameterDict({_key(n): v for n, v in values.items()})


def _key(name: str) -> str:
    return name.replace(".", "__")


class SparseModel:
    """The handle `sparsify` returns: `model` (the user's, changed in place), `values` (tensor name ->
    the fp32 Parameter of its k selected values, in the mask's index order), `to_delta` and
    `save_delta` (the delta of the values now against the base), and `unsparsify`.

    While sparsified, the model's weights hold the values before every forward pass and before
    every `state_dict()`, and the state dict holds the model's own keys alone (so `save_pretrained`
    right after `optimizer.step()` writes a plain checkpoint of the trained model); loading a state
    dict reads the values back from its weights, and refuses, in one line, one trained with another
    mask (integrations/state.py)."""

    def __init__(self, model: torch.nn.Module, mask: Mask, checkpoint: Checkpoint | None):
        check_model(model)
        if not isinstance(mask, Mask):
            raise PieceError(f"mask must be a Mask (from score or load_mask), got {type(mask).__name__}")
        if hasattr(model, HOLDER):
            raise PieceError("this model is sparsified already: unsparsify() it first")
        self.model, self.mask, self.checkpoint = model, mask, checkpoint
        self._loaded = loaded(model, checkpoint)
        self._check_mask()
        if checkpoint is not None:
            check_weights(self._loaded, checkpoint)
        params = self._loaded.parameters()
        self.sparse = SparseParameters({n: params[n] for n in mask.indices}, mask.indices)
        self.sparse.attach(model)
        model.add_module(HOLDER, _Values(self.sparse.values))
        self._state_hooks = StateDictHooks(model, self.sparse, HOLDER)
        self.drift = DriftEstimate(self.sparse, mask.fisher) if mask.fisher is not None else None
        self.attached = True

    def _check_mask(self) -> None:
        """The mask names this model's tensors, with their shapes, and was scored on its checkpoint."""
        mask, params = self.mask, self._loaded.parameters()
        for name in mask.indices:
            if name not in params:
                raise PieceError(f"the mask selects tensor '{name}', which this model does not have")
            if tuple(params[name].shape) != tuple(mask.shapes[name]):
                shapes = f"{list(mask.shapes[name])} in the mask, {list(params[name].shape)} in the model"
                raise PieceError(f"tensor '{name}' is {shapes}: a mask of another model")
        scored_on = mask.info.model
        if self.checkpoint is None and scored_on is not None and scored_on.fingerprint:
            raise PieceError(
                f"the mask was scored on '{scored_on.name}', and this model's checkpoint is not known: "
                "give checkpoint= the folder or repo id the model was loaded from"
            )
        if self.checkpoint is not None:
            check_scored_on(mask, self.checkpoint.identity, "the mask")

    def _check_attached(self, doing: str) -> None:
        if not self.attached:
            raise PieceError(
                f"cannot {doing}: unsparsify() ran and the values are gone; sparsify the model again "
                "(or save the delta before unsparsify)"
            )

    @property
    def values(self) -> dict[str, torch.nn.Parameter]:
        return self.sparse.values

    def write(self) -> None:
        """Put the values into the model's weights now (a forward pass and state_dict() do it by
        themselves)."""
        self._check_attached("write the values")
        self.sparse.write()

    def predicted_drift(self) -> float | None:
        """1/2 sum F d^2 (nats per token) for a piece-r mask, which carries the retain Fisher."""
        return self.drift.value() if self.drift is not None else None

    def add_retain_penalty(self, weight: float) -> None:
        """Add the gradient of weight/2 sum F d^2 to the values' gradients (a piece-r mask).
        PieceError for a weight that is not a finite number >= 0, or a mask without the Fisher."""
        weight = check_weight(weight, "the retain penalty's weight")
        self._check_attached("add the retain penalty")
        if self.drift is None:
            raise PieceError("the retain penalty needs a mask that carries the retain Fisher (piece-r)")
        self.drift.add_penalty_gradient(weight)

    def to_delta(
        self, *, base: str | Path | Checkpoint | None = None, provenance: dict[str, Any] | None = None
    ) -> Delta:
        """The delta of the values now against the base: the base's values read from `base`'s files
        (a folder, a Hub repo id or an opened Checkpoint; default: the checkpoint the model was
        loaded from), else those the weights held when sparsified. An entry changes only where
        training moved it in the dtype the model holds it in (training.deltas.moved_values), to its
        value rounded once to the base's stored dtype: the base with the delta applied, loaded in the
        model's dtype, is this model's weights bit for bit, and no entry changes by the rounding into
        the model's dtype alone. `provenance`: what trained it (fields of TrainProvenance:
        hyperparameters, data, steps, final_train_loss, ...). PieceError after unsparsify(), or for
        a base of another model."""
        self._check_attached("make the delta")
        base = self.checkpoint if base is None else checkpoint_of(self.model, base)
        values = {n: v.detach().cpu() for n, v in self.values.items()}
        info = DeltaInfo(base.identity if base is not None else None, self._provenance(provenance or {}))
        if base is not None:
            model = self._loaded if base is self.checkpoint else self._loaded_as(base)
            return trained_delta(base, model, self.mask.indices, values, info)
        entries = {}
        for name, idx in self.mask.indices.items():
            dtype = self.sparse.params[name].dtype
            base_values = self.sparse.base_values[name].cpu().to(dtype)
            entries[name] = (idx.cpu(), base_values, moved_values(base_values, values[name], dtype))
        return delta_from_values(entries, dict(self.mask.shapes), info)

    def _loaded_as(self, base: Checkpoint) -> LoadedModel:
        """The model named as `base` names its tensors, checked to be `base` where it is not trained
        (its weights, the values put back to the base's for the check: check_weights)."""
        model = loaded(self.model, base)
        with self.sparse.as_base():
            check_weights(model, base)
        return model

    def save_delta(
        self,
        folder: str | Path,
        *,
        base: str | Path | Checkpoint | None = None,
        provenance: dict[str, Any] | None = None,
        format_version: int = DEFAULT_FORMAT,
        overwrite: bool = False,
    ) -> Delta:
        """Write to_delta() as a delta folder (the artifact `train` writes), atomically. PieceError
        for an existing folder without `overwrite` (with it, for one that is not a delta), one that
        overlaps the base, or after unsparsify()."""
        self._check_attached("save the delta")
        if not isinstance(folder, str | Path):
            raise PieceError(f"folder must be a path (str or Path), got {type(folder).__name__}")
        ref = self.checkpoint if base is None else checkpoint_of(self.model, base)
        inputs = [ref.folder] if ref is not None else []
        output = check_output(folder, overwrite=overwrite, inputs=inputs, kind=DELTA, flag="overwrite=True")
        delta = self.to_delta(base=ref, provenance=provenance)
        save_delta(delta, output, format_version=format_version)
        return delta

    def unsparsify(self, *, merge: bool = False) -> torch.nn.Module:
        """Undo sparsify: the hooks off, the values' module gone, every parameter's requires_grad as
        it was; the weights back at the base's values, or holding the trained ones with `merge`
        (then `model.save_pretrained` writes a plain checkpoint of the trained model). Returns the
        model. PieceError when it ran already."""
        if not self.attached:
            raise PieceError("this model is not sparsified (unsparsify() ran already)")
        if merge:
            self.sparse.write()
        else:
            self.sparse.write(self.sparse.base_values)
        self.sparse.detach()
        self._state_hooks.remove()
        delattr(self.model, HOLDER)
        self.attached = False
        return self.model

    def _provenance(self, given: dict[str, Any]) -> TrainProvenance:
        info = self.mask.info
        fields = {
            "method": info.method,
            "density": info.density,
            "mask": {
                "method": info.method,
                "density": info.density,
                "data": info.data.to_json() if info.data else None,
                "seed": info.seed,
                "k": self.mask.k,
            },
            "hyperparameters": {},
            "data": None,
            "eval_data": None,
            "steps": 0,
            "final_train_loss": None,
            "final_eval_loss": None,
            "predicted_drift": self.predicted_drift(),
        }
        return TrainProvenance(**{**fields, **given, "made_by": "trainer"})
