"""Names of tensors: which layer and which kind of module a tensor belongs to, and counts of
selected entries broken down by them (for summaries)."""

from __future__ import annotations

import re
from collections import defaultdict

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
    """Per-layer and per-module-kind totals of selected entries, plus the norm-weight share."""
    by_layer: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, size in sizes.items():
        selected = counts.get(name, 0)
        layer = layer_of(name)
        for table, key in ((by_layer, "-" if layer is None else str(layer)), (by_kind, module_kind(name))):
            table[key][0] += selected
            table[key][1] += size
    total = sum(counts.values())
    norms = sum(c for n, c in counts.items() if is_norm(n))
    layer_order = sorted(by_layer, key=lambda s: (s == "-", int(s) if s.isdigit() else 0))
    return {
        "entries": total,
        "tensors": sum(1 for c in counts.values() if c),
        "norm_share": norms / total if total else 0.0,
        "by_layer": {k: {"entries": by_layer[k][0], "size": by_layer[k][1]} for k in layer_order},
        "by_kind": {k: {"entries": v[0], "size": v[1]} for k, v in sorted(by_kind.items())},
    }
