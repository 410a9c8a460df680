"""The parts of a vision-language model a tensor can belong to: the vision tower (the image
encoder), the projector (what maps image features into the language model's embedding space) and
the language model (everything else: decoder, embeddings, head).

Told from the tensor's name, stored or loaded, by the module names transformers' vision-language
classes use (LLaVA and Gemma 3: `vision_tower`, `multi_modal_projector`; Qwen2-VL, Qwen2.5-VL and
Qwen3-VL: `visual`, whose `merger`s are the projector; Idefics3 and SmolVLM: `vision_model`,
`connector`). tests/test_vision_language.py checks the rule against each architecture's module tree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

VISION = "vision tower"
PROJECTOR = "projector"
LANGUAGE = "language model"
PARTS = (VISION, PROJECTOR, LANGUAGE)

_PROJECTOR = re.compile(
    r"(^|\.)(multi_modal_projector|mm_projector|connector|merger|deepstack_merger_list)\."
)
_VISION = re.compile(r"(^|\.)(vision_tower|visual|vision_model|vision_encoder|image_encoder)\.")


def is_vision_language(config) -> bool:
    """Whether a transformers config describes a vision-language model (one with a vision tower)."""
    return getattr(config, "vision_config", None) is not None


def part_of(name: str) -> str:
    """VISION, PROJECTOR or LANGUAGE for a tensor name of a vision-language model (a projector
    inside the vision module, as Qwen2-VL's merger, counts as the projector)."""
    if _PROJECTOR.search(name):
        return PROJECTOR
    if _VISION.search(name):
        return VISION
    return LANGUAGE


def entries_by_part(counts: Iterable[tuple[str, int]]) -> dict[str, int]:
    """(tensor name, entries) pairs -> entries per part, parts with none left out; {} when every
    name is the language model's (a text-only model: nothing to split)."""
    totals: dict[str, int] = {}
    for name, n in counts:
        part = part_of(name)
        totals[part] = totals.get(part, 0) + int(n)
    if set(totals) <= {LANGUAGE}:
        return {}
    return {part: totals[part] for part in PARTS if part in totals}
