"""A delta laid out as a PEFT SHiRA adapter on its base model.

SHiRA holds, per adapted linear layer, r x (in + out) entries (one r for every layer), padded with
entries that change nothing. The layout picks the r, and the few busiest layers to save whole in
`modules_to_save` instead, that make the smallest file. Norm gains (vectors) go into
`modules_to_save` too (the whole vector, a few KB). Anything else (embedding tables, GPT-2's
Conv1D, weights two modules share, biases) has no place in SHiRA: refused, naming it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from piece_surgery.formats.delta import Delta, TensorDelta
from piece_surgery.merging.combine import TensorPart, merge_one
from piece_surgery.merging.live import model_tensors
from piece_surgery.models.eligible import DEFAULT_EXCLUDE
from piece_surgery.models.structure import is_gain_module, owners
from piece_surgery.runtime.errors import PieceError


@dataclass
class ShiraPlan:
    r: int
    linear: dict[str, tuple[str, torch.nn.Linear]]  # module name -> (tensor name, layer)
    saved: dict[str, list[tuple[str, str]]]  # modules saved whole: name -> [(attribute, tensor name)]
    tensors: dict[str, TensorDelta]  # the delta's tensors, checked against the base (base values known)


def shira_plan(model: torch.nn.Module, delta: Delta) -> ShiraPlan:
    """Which tensors go where; checks each against the model's weights (the delta's base). PieceError
    for a delta with tensors SHiRA cannot hold: all of them named at once, by the --exclude
    patterns that leave them out."""
    module_names = {id(m): name for name, m in model.named_modules()}
    holders = owners(model)
    linear, saved, tensors, refused = {}, {}, {}, {}
    for tensor_name, where in model_tensors(model, delta).items():
        t, param = delta.tensors[tensor_name], where.param
        if where.offset or tuple(where.shape) != tuple(param.shape) or param.dim() > 2:
            refused.setdefault("experts", (tensor_name, f"an expert (part of '{where.pname}')"))
            continue
        current = param.detach().view(-1)[t.indices].cpu()
        # the identity rule of apply: dtype and every entry's base value, or a one-line refusal
        part = TensorPart(t, 1.0, "the delta", force_hint="", refused_as="the base is not the delta's base")
        tensors[tensor_name], _, _ = merge_one(tensor_name, current, part, force=False)
        held = holders.get(id(param), [])
        module, attr = held[0] if len(held) == 1 else (None, None)
        # a torch.nn.Linear or a subclass that computes as one (Falcon's), as PEFT's SHiRA takes it
        if module is not None and isinstance(module, torch.nn.Linear) and attr == "weight":
            linear[module_names[id(module)]] = (tensor_name, module)
        elif module is not None and is_gain_module(module):
            saved.setdefault(module_names[id(module)], []).append((attr, tensor_name))
        else:
            refused.setdefault(
                _pattern(tensor_name), (tensor_name, "not a linear layer's weight or a norm's gain")
            )
    if refused:
        # a user's --exclude replaces the default one, so the advice restates it
        new = [p for p in refused if not any(re.search(d, p) for d in DEFAULT_EXCLUDE)]
        patterns = [*DEFAULT_EXCLUDE, *new]
        (first, why), excludes = next(iter(refused.values())), " ".join(f"--exclude {p}" for p in patterns)
        raise PieceError(
            f"the delta changes tensors a SHiRA adapter cannot hold (first: '{first}', {why}): score "
            f"without them ({excludes}, and no --include naming them) to export, or apply the delta with "
            "`piece-surgery apply`"
        )
    counts = {name: delta.tensors[t].indices.numel() for name, (t, _) in linear.items()}
    r, whole = cheapest_layout({name: m for name, (_, m) in linear.items()}, counts)
    for name in whole:
        tensor_name, _ = linear.pop(name)
        saved.setdefault(name, []).append(("weight", tensor_name))
    if not linear:  # PEFT refuses an adapter without a layer of its own type
        if not whole:
            raise PieceError(
                "the delta changes no linear layer (only norm gains): a SHiRA adapter needs at least one "
                "sparse linear layer; apply the delta with `piece-surgery apply` instead"
            )
        raise PieceError(
            f"every linear layer the delta changes is too dense for SHiRA ({len(whole)} saved whole would "
            "be the whole adapter; a LoRA's change touches every entry): keep the original adapter, or "
            "apply the delta with `piece-surgery apply`"
        )
    return ShiraPlan(r, linear, saved, tensors)


def _pattern(tensor_name: str) -> str:
    """The --exclude pattern for a tensor of its kind: its last name part, or its module's for a
    weight ('bias', 'sinks', 'embed_tokens')."""
    parts = tensor_name.split(".")
    return parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]


# bytes per SHiRA slot as PEFT saves it: a (row, column) pair of int32 and an fp32 change
_SLOT_BYTES = 12


def cheapest_layout(layers: dict[str, torch.nn.Linear], counts: dict[str, int]) -> tuple[int, set[str]]:
    """SHiRA gives every adapted layer r x (in + out) slots, one r for all, so a few busy layers
    would pad every other one. Choose the r, and the layers saved whole instead (modules_to_save:
    every weight, in its dtype), that make the smallest adapter."""

    def slots(m: torch.nn.Linear, r: int) -> int:
        return r * (m.in_features + m.out_features)

    def whole_bytes(m: torch.nn.Linear) -> int:
        return sum(p.numel() * p.element_size() for p in m.parameters())

    def cost(r: int) -> tuple[int, set[str]]:
        fits = {n for n, m in layers.items() if counts[n] <= slots(m, r) <= m.in_features * m.out_features}
        size = sum(slots(layers[n], r) * _SLOT_BYTES for n in fits)
        return size + sum(whole_bytes(m) for n, m in layers.items() if n not in fits), set(layers) - fits

    needed = {math.ceil(counts[n] / (m.in_features + m.out_features)) for n, m in layers.items()} or {1}
    best = min(sorted(needed), key=lambda r: cost(r)[0])
    return best, cost(best)[1]


def fill_shira(layer, t, r: int) -> int:
    """Set a SHiRA layer's entries to the delta's changes, padded with unchanged entries up to
    r x (in + out); returns the padding count."""
    rows_total, cols = layer.out_features, layer.in_features
    capacity = r * (rows_total + cols)
    padding = capacity - int(t.indices.numel())
    used = torch.zeros(rows_total * cols, dtype=torch.bool)
    used[t.indices] = True
    extra = torch.nonzero(~used).flatten()[:padding]  # the first free entries, deterministically
    flat = torch.cat([t.indices, extra])
    change = torch.cat([t.change().float(), torch.zeros(padding)])
    layer.shira_indices["default"] = torch.stack([flat // cols, flat % cols]).to(torch.int)
    layer.shira_weight["default"].data = change
    return padding
