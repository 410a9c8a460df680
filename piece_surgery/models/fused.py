"""Stored tensors that loading fuses into part of one parameter: a mixture-of-experts checkpoint
stored one tensor per expert (the Hub layout of Mixtral, Qwen3-MoE, OLMoE and DeepSeek-V3, and what
transformers 5 still writes), which transformers 5 loads into one 3-D tensor per layer and kind
(`mlp.experts.gate_up_proj`: every expert's gate and up projections; `mlp.experts.down_proj`).

Where each stored tensor lies in its parameter is read from transformers' own conversion mapping,
the WeightConverter that merges them: MergeModulelist stacks the experts' tensors along a dimension
in the experts' order, Concatenate joins the stacks of its source patterns (gate, then up) along
another, in equal parts (what saving cuts them back into). In every family transformers ships this
way a stored tensor is then one contiguous range of its parameter's flat entries, so a mask or a
delta in the stored tensor's coordinates is the parameter's entries `offset + i`, exactly. A
conversion through any other operation (a transpose, an interleave) is refused, naming the tensor.

`ParameterSlice` is a loaded parameter's part that one stored tensor holds, as scoring and training
handle it: shape, dtype, device, and its values as a view of the parameter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from piece_surgery.models.pairing import stored_names
from piece_surgery.runtime.errors import PieceError

# the operations whose placement of each stored tensor is read here (transformers' class names)
_STACK, _JOIN = "MergeModulelist", "Concatenate"


@dataclass(frozen=True)
class StoredSlice:
    """A stored tensor that loading puts into part of a parameter: flat entries
    [offset, offset + numel) of the parameter `param` (its name in the model), laid out as `shape`
    (the stored tensor's shape: row-major, so the stored tensor's flat index i is the parameter's
    flat index offset + i)."""

    name: str
    param: str
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        size = 1
        for n in self.shape:
            size *= n
        return size

    def of(self, t: torch.Tensor) -> torch.Tensor:
        """This slice of `t`, a tensor with the parameter's shape (its data, its gradient, an
        accumulator): a view, so writes go into `t`."""
        return t.view(-1)[self.offset : self.offset + self.numel].view(self.shape)


class ParameterSlice:
    """The part of a loaded parameter one stored tensor holds (StoredSlice), where scoring and
    training take a tensor: `shape`, `dtype`, `device`, `numel()`, and `detach()`, a view of the
    parameter's values (writes go into the model)."""

    def __init__(self, parameter: torch.nn.Parameter, stored: StoredSlice):
        self.parameter = parameter
        self.stored = stored

    @property
    def offset(self) -> int:
        return self.stored.offset

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.stored.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.parameter.dtype

    @property
    def device(self) -> torch.device:
        return self.parameter.device

    def numel(self) -> int:
        return self.stored.numel

    def dim(self) -> int:
        return len(self.stored.shape)

    def detach(self) -> torch.Tensor:
        return self.stored.of(self.parameter.detach())

    def __repr__(self) -> str:
        return f"ParameterSlice({self.stored.name!r} of {self.stored.param!r} at {self.offset})"


def holder(p) -> tuple[torch.nn.Parameter, int]:
    """The model parameter a tensor scoring or training takes lives in, and where its flat entries
    start there: (p, 0) for a parameter, (its parameter, offset) for a ParameterSlice."""
    if isinstance(p, ParameterSlice):
        return p.parameter, p.offset
    return p, 0


def fused_slices(model: torch.nn.Module, stored: Iterable[str]) -> dict[str, StoredSlice]:
    """Stored name -> StoredSlice, for the names among `stored` that loading converts into part of
    one of `model`'s parameters (names only: a meta-device skeleton will do). The names loading uses
    as they are, or renames (pairing.stored_names), are not here. Any subset of a checkpoint's names
    may be given (a delta's): an expert's place comes from its number in the name, which is its
    place in loading's order in a checkpoint that check_fused accepts.

    PieceError naming the tensor for a conversion whose placement is not read here (any operation
    but a stack and a concatenation, or a part that is not one contiguous range), or an expert the
    parameter has no place for. {} under transformers 4, which converts nothing."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4
        return {}
    expected = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "") or ""
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not converters:
        return {}
    found = {}
    for key in stored:
        name, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if pattern is None or name not in expected:
            continue  # used as it is, renamed, or unused: not a part of a parameter
        converter = next(c for c in converters if pattern in c.source_patterns)
        found[key] = _locate(key, name, converter, pattern, tuple(expected[name].shape))
    return found


def _locate(key: str, param: str, converter, pattern: str, shape: tuple[int, ...]) -> StoredSlice:
    """Where stored tensor `key` lies in `param` (of `shape`): the converter's operations undone,
    last to first, as views of an empty meta tensor of the parameter's shape."""
    ops = list(converter.operations)
    unknown = [type(op).__name__ for op in ops if type(op).__name__ not in (_STACK, _JOIN)]
    if unknown or len(converter.target_patterns) != 1:
        raise PieceError(
            f"tensor '{key}' loads into '{param}' through transformers' {', '.join(unknown) or 'split'} "
            "conversion, which piece-surgery cannot map entry by entry; store the checkpoint as the "
            "model holds it (save_pretrained of the loaded model)"
        )
    number = _expert_number(key, pattern)
    view = torch.empty(shape, device="meta")
    sources = list(converter.source_patterns)
    try:
        for op in reversed(ops):
            if type(op).__name__ == _JOIN:
                size = view.shape[op.dim] // len(sources)  # saving cuts the join in equal parts
                view = view.narrow(op.dim, sources.index(pattern) * size, size)
            else:
                if number is None:
                    raise PieceError(f"tensor '{key}' has no expert number where '{pattern}' has one")
                view = view.select(op.dim, number)
    except (IndexError, RuntimeError):
        raise PieceError(
            f"tensor '{key}' is expert {number} of '{param}', which holds {shape[0]} experts: "
            "the weights and config.json do not match"
        ) from None
    if not view.is_contiguous():
        raise PieceError(
            f"tensor '{key}' is not one contiguous part of '{param}', which piece-surgery cannot map entry "
            "by entry; store the checkpoint as the model holds it (save_pretrained of the loaded model)"
        )
    return StoredSlice(key, param, int(view.storage_offset()), tuple(view.shape))


def _expert_number(key: str, pattern: str) -> int | None:
    """The number that stands at the pattern's `*` in `key` (`mlp.experts.*.up_proj.weight` in
    `model.layers.0.mlp.experts.5.up_proj.weight`: 5); None if the pattern has no `*`."""
    if "*" not in pattern:
        return None
    regex = re.escape(pattern.lstrip("^")).replace(r"\*", r"(\d+)")
    match = re.search(regex, key)
    return int(match.group(1)) if match else None


def fused_parameters(slices: dict[str, StoredSlice]) -> dict[str, list[StoredSlice]]:
    """Parameter name -> its stored slices, in offset order."""
    by_param: dict[str, list[StoredSlice]] = {}
    for s in sorted(slices.values(), key=lambda s: (s.param, s.offset)):
        by_param.setdefault(s.param, []).append(s)
    return by_param


def check_fused(
    model: torch.nn.Module, slices: dict[str, StoredSlice], shapes: dict[str, tuple[int, ...]]
) -> None:
    """A checkpoint's slices (fused_slices of all its names; `shapes`: stored name -> shape) fill
    each parameter they load into exactly once, each with the shape of its place (then loading's
    order of the experts is their numbers' order). PieceError naming a tensor otherwise."""
    expected = model.state_dict(keep_vars=True)
    for name, s in slices.items():
        if tuple(shapes[name]) != s.shape:
            raise PieceError(
                f"tensor '{name}' is {list(shapes[name])} in the checkpoint but its place in '{s.param}' is "
                f"{list(s.shape)}: the weights and config.json do not match"
            )
    for param, parts in fused_parameters(slices).items():
        end = 0
        for s in parts:
            if s.offset != end:
                what = "overlaps another" if s.offset < end else "leaves a gap before it"
                raise PieceError(
                    f"tensor '{s.name}' {what} in '{param}': the checkpoint stores its experts twice "
                    "or lacks some; give a complete checkpoint"
                )
            end = s.offset + s.numel
        if end != expected[param].numel():
            raise PieceError(
                f"the checkpoint stores only part of '{param}' (its tensors end at entry {end} of "
                f"{expected[param].numel()}): some experts are missing; give a complete checkpoint"
            )


def stored_places(model: torch.nn.Module, stored: Iterable[str]) -> dict[str, tuple[str, int, int]]:
    """Stored name -> (the model's name of the parameter it loads into, its first flat entry there,
    its entries), for every name among `stored` that loading uses: a whole parameter (from entry 0;
    pairing.stored_names) or an expert's part of a fused one (fused_slices). Two checkpoints of one
    model stored in other layouts hold the same entries where their places are the same."""
    stored = list(stored)
    sizes = {name: t.numel() for name, t in model.state_dict(keep_vars=True).items()}
    places = {}
    for name, key in stored_names(model, stored).items():
        places.setdefault(key, (name, 0, sizes[name]))
    for key, s in fused_slices(model, stored).items():
        places[key] = (s.param, s.offset, s.numel)
    return places
