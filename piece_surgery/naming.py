"""Names of tensors: which layer and which kind of module a tensor belongs to (for summaries)."""

from __future__ import annotations

import re

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
