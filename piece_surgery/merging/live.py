"""Deltas applied to a loaded model in place, exactly as `apply` writes a folder (combine.merge_one),
and put back; every write checked to have taken effect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from piece_surgery.formats.artifacts import open_delta
from piece_surgery.formats.delta import Delta
from piece_surgery.merging.combine import TensorPart, merge_one
from piece_surgery.models.fused import fused_slices
from piece_surgery.models.pairing import stored_names
from piece_surgery.runtime.dtypes import same_bits
from piece_surgery.runtime.errors import PieceError


@dataclass
class AppliedDelta:
    """What apply_to_model changed, to restore it bit for bit with revert()."""

    model: torch.nn.Module
    # delta tensor name -> (parameter name, flat indices in the parameter, original values)
    saved: dict[str, tuple[str, torch.Tensor, torch.Tensor]]

    def revert(self) -> None:
        params = dict(self.model.named_parameters())
        write_entries(
            self.model, [(pname, params[pname], idx, values) for pname, idx, values in self.saved.values()]
        )


@dataclass(frozen=True)
class ModelTensor:
    """Where one of a delta's tensors lives in a loaded model: the parameter `param` (`pname` in the
    model), whose flat entries from `offset` on it is, laid out as `shape` (an expert stored apart is
    part of a fused parameter: models.fused; any other tensor is its whole parameter, offset 0)."""

    pname: str
    param: torch.nn.Parameter
    offset: int
    shape: tuple[int, ...]

    def positions(self, indices: torch.Tensor) -> torch.Tensor:
        """The tensor's flat `indices` as flat indices of the parameter, on its device."""
        return indices.to(self.param.device) + self.offset


def write_entries(
    model: torch.nn.Module, writes: list[tuple[str, torch.nn.Parameter, torch.Tensor, torch.Tensor]]
):
    """Write each (parameter name, parameter, flat indices, values) into the live model, then check
    that it took effect: the parameter is still the one the model holds under that name, and its
    entries read back bit for bit. PieceError otherwise (a library replaced the model's weights)."""
    with torch.no_grad():
        for _, param, idx, values in writes:
            param.view(-1)[idx.to(param.device)] = values.to(param.device, param.dtype)
    for pname, param, idx, values in writes:
        try:
            held = model.get_parameter(pname)
        except AttributeError:
            held = None
        written = param.detach().view(-1)[idx.to(param.device)]
        if held is not param or not bits_equal(written, values.to(param.device, param.dtype)):
            raise PieceError(
                f"writing the delta's entries into '{pname}' did not take effect: the model no longer "
                "holds that weight (something replaced it after loading); load the model again"
            )


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b hold the same bits (NaNs included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(as_int), b.view(as_int))


def model_tensors(model: torch.nn.Module, delta: Delta) -> dict[str, ModelTensor]:
    """Where in the model each of the delta's tensors is (stored names paired with the model's as
    loading pairs them: checkpoint.stored_names, and experts stored one tensor per expert as parts
    of the fused parameter loading makes of them: models.fused): delta tensor name -> ModelTensor.

    Tied weights are one parameter under several names: a delta that changes several of them (a
    checkpoint that stores both copies) lists each, and here the parameter appears once, under the
    first; the copies must change alike. PieceError for a tensor the model lacks, or tied copies
    changed differently."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loads_into = {stored: name for name, stored in stored_names(model, delta.tensors).items()}
    parts = fused_slices(model, [n for n in delta.tensors if n not in loads_into])
    found: dict[str, ModelTensor] = {}
    first_of: dict[int, str] = {}  # id(parameter) -> the delta tensor that stands for it
    for name in sorted(delta.tensors):
        if name in parts:
            s = parts[name]
            found[name] = ModelTensor(s.param, params[s.param], s.offset, s.shape)
            continue
        pname = loads_into.get(name)
        if pname not in params:
            raise PieceError(f"the delta changes '{name}', which the model does not have")
        param = params[pname]
        if id(param) in first_of:
            _check_same_change(delta, first_of[id(param)], name)
            continue
        first_of[id(param)] = name
        found[name] = ModelTensor(pname, param, 0, tuple(param.shape))
    changed = set(loads_into.values())
    for name, where in found.items():
        twins = [n for n, p in params.items() if p is where.param and n != where.pname]
        if where.offset == 0 and name not in parts:
            _refuse_untying(delta, name, twins, changed)
    return found


def _refuse_untying(delta: Delta, name: str, twins: list[str], changed: set[str]) -> None:
    """This model holds `name` and `twins` as one weight. If the delta's base stored a twin apart
    and the delta leaves it (it changes a head the files stored beside the embedding, say), files
    with the delta applied load the two untied, which one weight cannot be: refused. `changed`:
    the model's names for every tensor the delta changes."""
    loads_as = delta.tensors[name].loads_as
    if loads_as is None:  # a delta written before this was recorded: applied as one weight
        return
    for twin in twins:
        if twin not in changed and twin not in loads_as:
            raise PieceError(
                f"the delta changes '{name}' but not '{twin}', which its base stored apart and this model "
                "ties to it (one weight): files with the delta applied load the two untied; apply it to "
                "files (piece-surgery apply), or load this model untied"
            )


def _check_same_change(delta: Delta, kept: str, other: str) -> None:
    a, b = delta.tensors[kept], delta.tensors[other]
    same = torch.equal(a.indices, b.indices) and bool(same_bits(a.tuned, b.tuned).all())
    if not same:
        raise PieceError(
            f"the delta changes '{kept}' and '{other}' differently, but this model ties them (one "
            "weight): load the model with them untied (both stored, as the merged folder holds them)"
        )


def live_delta(model: object, delta: object, scale: object = 1.0) -> Delta:
    """The arguments of a change to a live model, checked: a torch module, a Delta (or a delta's
    folder or Hub repo id: opened) and a finite scale. PieceError in one line otherwise."""
    if not isinstance(model, torch.nn.Module):
        raise PieceError(f"the model must be a loaded model (a torch.nn.Module), got {type(model).__name__}")
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise PieceError(f"scale must be a finite number, got {scale!r}")
    if isinstance(delta, str | Path):
        return open_delta(delta)
    if not isinstance(delta, Delta):
        raise PieceError(
            f"the delta must be a Delta (open_delta, load_delta) or a delta folder's path, got "
            f"{type(delta).__name__}"
        )
    return delta


def apply_to_model(
    model: torch.nn.Module, delta: Delta | str | Path, *, scale: float = 1.0, force: bool = False
) -> AppliedDelta:
    """Apply a delta (a Delta, or a delta folder's path or Hub repo id) to a loaded model in place,
    exactly as `apply` writes a folder (merge_one: the same per-entry base check and exactness
    rule); returns a handle whose revert() restores the weights bit for bit. PieceError for a delta
    of another model (names, shapes, base values or dtype, unless `force`)."""
    delta = live_delta(model, delta, scale)
    planned = []
    with torch.no_grad():
        for name, where in model_tensors(model, delta).items():
            t = delta.tensors[name]
            check_shape(name, where, t.shape)
            idx = where.positions(t.indices)
            original = where.param.view(-1)[idx].detach().clone()
            part = TensorPart(t, scale, "the delta", "this model", "pass force=True to apply it anyway")
            _, new, _ = merge_one(name, original.cpu(), part, force=force)
            planned.append((name, where, idx, original, new))
    # every tensor checked before any is written: a refused delta leaves the model as it was
    write_entries(model, [(where.pname, where.param, idx, new) for _, where, idx, _, new in planned])
    saved = {name: (where.pname, idx.cpu(), original) for name, where, idx, original, _ in planned}
    return AppliedDelta(model, saved)


def check_shape(name: str, where: ModelTensor, shape) -> None:
    """The delta's tensor has the shape of its place in the model; PieceError otherwise."""
    if tuple(where.shape) != tuple(shape):
        raise PieceError(
            f"tensor '{name}' has shape {list(where.shape)} in the model, {list(shape)} in the delta"
        )


def revert_delta(model: torch.nn.Module, delta: Delta | str | Path) -> None:
    """Put back the delta's recorded base values (for a model that holds the delta at scale 1)."""
    delta = live_delta(model, delta)
    if any(t.base is None for t in delta.tensors.values()):
        raise PieceError(
            "a compact delta does not hold its base values: revert with the handle apply_to_model gave"
        )
    writes = [
        (where.pname, where.param, where.positions(delta.tensors[name].indices), delta.tensors[name].base)
        for name, where in model_tensors(model, delta).items()
    ]
    write_entries(model, writes)
