"""Names of tensors: which layer, which kind of module and which expert of a mixture-of-experts
layer a tensor belongs to, and counts of selected entries broken down by them, and by part of a
vision-language model (for summaries)."""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from piece_surgery.models.parts import LANGUAGE, PARTS, names_vision_language, part_of
from piece_surgery.runtime.dtypes import numel

_LAYER = re.compile(r"\.(\d+)\.")
# an expert stored apart (`mlp.experts.5.up_proj.weight`; Mixtral's `block_sparse_moe.experts.5.w3`)
_ONE_EXPERT = re.compile(r"(^|\.)experts\.(\d+)\.")
# every expert of a layer in one tensor, expert first (`mlp.experts.gate_up_proj`, `..._bias`)
_ALL_EXPERTS = re.compile(r"(^|\.)experts\.[A-Za-z_]\w*$")


def layer_of(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def module_kind(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `self_attn.q_proj.weight`; no layer -> the name.
    An expert stored apart is its kind for every expert: `mlp.experts.*.up_proj.weight`."""
    match = _LAYER.search(name)
    kind = name[match.end() :] if match else name
    return _ONE_EXPERT.sub(lambda m: f"{m.group(1)}experts.*.", kind, count=1)


def expert_entries(name: str, indices, shape: tuple[int, ...]) -> dict[int, tuple[int, int]] | None:
    """Per expert of a mixture-of-experts layer that tensor `name` holds: (entries among the flat
    `indices` given, entries the expert has in the tensor). One expert for a tensor stored apart
    (its number in the name), every expert for a fused one (its first dimension); None for a
    tensor that holds no expert. `indices`: a 1-D integer tensor."""
    one = _ONE_EXPERT.search(name)
    if one:
        return {int(one.group(2)): (int(indices.numel()), numel(shape))}
    if not _ALL_EXPERTS.search(name) or len(shape) < 2:
        return None
    per_expert = numel(shape[1:])
    counts = (indices // per_expert).bincount(minlength=shape[0]).tolist()
    return {e: (counts[e], per_expert) for e in range(shape[0])}


def is_norm(name: str) -> bool:
    """RMSNorm / LayerNorm gains and biases, by the names the common families use."""
    last = name.rsplit(".", 2)
    module = last[-2] if len(last) >= 2 else name
    return bool(re.search(r"(norm|^ln_|^ln$|layernorm)", module, re.IGNORECASE))


def breakdown(
    counts: dict[str, int],
    sizes: dict[str, int],
    experts: dict[str, dict[int, tuple[int, int]]] | None = None,
) -> dict:
    """Per-layer and per-module-kind totals of selected entries, plus the norm-weight share; for a
    vision-language model also per part (`by_part`, else None; its vision tower's and projector's layers are
    named with the part, `vision tower 0`, apart from the language model's `0`); for a
    mixture-of-experts model per expert number over its layers (`by_expert`, from `experts`:
    tensor name -> expert_entries; else None)."""
    by_layer: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_part: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    vision_language = names_vision_language(sizes)
    for name, size in sizes.items():
        selected = counts.get(name, 0)
        layer = layer_of(name)
        part = part_of(name) if vision_language else LANGUAGE
        layer_key = (PARTS.index(part), layer is None, layer or 0, part)
        for table, key in ((by_layer, layer_key), (by_kind, module_kind(name)), (by_part, part)):
            table[key][0] += selected
            table[key][1] += size
    total = sum(counts.values())
    norms = sum(c for n, c in counts.items() if is_norm(n))
    summary = {
        "entries": total,
        "tensors": sum(1 for c in counts.values() if c),
        "norm_share": norms / total if total else 0.0,
        "by_layer": {_layer_label(k): {"entries": v[0], "size": v[1]} for k, v in sorted(by_layer.items())},
        "by_kind": {k: {"entries": v[0], "size": v[1]} for k, v in sorted(by_kind.items())},
    }
    summary["by_part"] = (
        {p: {"entries": by_part[p][0], "size": by_part[p][1]} for p in PARTS if p in by_part}
        if vision_language
        else None
    )
    summary["by_expert"] = _by_expert(experts or {})
    return summary


def _by_expert(experts: dict[str, dict[int, tuple[int, int]]]) -> dict | None:
    totals: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for per_expert in experts.values():
        for expert, (selected, size) in (per_expert or {}).items():
            totals[expert][0] += selected
            totals[expert][1] += size
    return {str(e): {"entries": v[0], "size": v[1]} for e, v in sorted(totals.items())} or None


def selection_breakdown(indices: dict, shapes: dict[str, tuple[int, ...]]) -> dict:
    """breakdown of a mask's or a delta's entries: `indices`, tensor name -> its 1-D flat indices
    (a tensor of `shapes` without any counts as none selected)."""
    empty = torch.empty(0, dtype=torch.int64)
    counts = {n: int(i.numel()) for n, i in indices.items()}
    sizes = {n: numel(shape) for n, shape in shapes.items()}
    experts = {n: expert_entries(n, indices.get(n, empty), tuple(shape)) for n, shape in shapes.items()}
    return breakdown(counts, sizes, {n: e for n, e in experts.items() if e is not None})


def _layer_label(key: tuple) -> str:
    _, no_layer, layer, part = key
    label = "-" if no_layer else str(layer)
    return label if part == LANGUAGE else f"{part} {label}"
