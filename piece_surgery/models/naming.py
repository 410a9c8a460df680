"""Names of tensors: which layer and which kind of module a tensor belongs to, and counts of
selected entries broken down by them, and by part of a vision-language model (for summaries)."""

from __future__ import annotations

import re
from collections import defaultdict

from piece_surgery.models.parts import LANGUAGE, PARTS, names_vision_language, part_of

_LAYER = re.compile(r"\.(\d+)\.")


def layer_of(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def module_kind(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `self_attn.q_proj.weight`; no layer -> the name."""
    match = _LAYER.search(name)
    return name[match.end() :] if match else name


def is_norm(name: str) -> bool:
    """RMSNorm / LayerNorm gains and biases, by the names the common families use."""
    last = name.rsplit(".", 2)
    module = last[-2] if len(last) >= 2 else name
    return bool(re.search(r"(norm|^ln_|^ln$|layernorm)", module, re.IGNORECASE))


def breakdown(counts: dict[str, int], sizes: dict[str, int]) -> dict:
    """Per-layer and per-module-kind totals of selected entries, plus the norm-weight share; for a
    vision-language model also per part (`by_part`, else None; its vision tower's and projector's layers are
    named with the part, `vision tower 0`, apart from the language model's `0`)."""
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
    return summary


def _layer_label(key: tuple) -> str:
    _, no_layer, layer, part = key
    label = "-" if no_layer else str(layer)
    return label if part == LANGUAGE else f"{part} {label}"
