"""The parts of a vision-language model a tensor can belong to: the vision tower (the image
encoder), the projector (what maps image features into the language model's embedding space) and
the language model (everything else: decoder, embeddings, head).

Told from the tensor's name, stored or loaded, by the module names transformers' vision-language
classes use (LLaVA and Gemma 3: `vision_tower`, `multi_modal_projector`; Qwen2-VL, Qwen2.5-VL and
Qwen3-VL: `visual`, whose `merger`s are the projector; Idefics3 and SmolVLM: `vision_model`,
`connector`). tests/models/test_vision_language.py checks the rule against each architecture's module tree.
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
_LANGUAGE_MODULE = re.compile(r"(^|\.)(language_model|text_model)\.")
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


def names_vision_language(names: Iterable[str]) -> bool:
    """Whether tensor names are a vision-language model's: a vision tower's or projector's name, or
    a language model stored under its own module (`language_model.`, `text_model.`). Qwen2-VL's
    older layout stores its language model as a text model does (`model.layers.`): a delta of
    those names alone reads as a text model's."""
    return any(part_of(name) != LANGUAGE or _LANGUAGE_MODULE.search(name) for name in names)


def entries_by_part(counts: Iterable[tuple[str, int]]) -> dict[str, int]:
    """(tensor name, entries) pairs -> entries per part, parts with none left out; {} when the
    names are a text-only model's (names_vision_language)."""
    counts = list(counts)
    if not names_vision_language(name for name, _ in counts):
        return {}
    totals: dict[str, int] = {}
    for name, n in counts:
        part = part_of(name)
        totals[part] = totals.get(part, 0) + int(n)
    return {part: totals[part] for part in PARTS if part in totals}


def image_side(names: Iterable[str]) -> str | None:
    """What of a vision-language model's image side tensor names all belong to ("the projector",
    "the vision tower", "the vision tower and the projector"), or None when any of them is the
    language model's (or there are none). Only image records reach these parts: a text record
    gives them no gradient."""
    parts = {part_of(name) for name in names}
    if not parts or LANGUAGE in parts:
        return None
    return " and ".join(f"the {part}" for part in (VISION, PROJECTOR) if part in parts)
