"""Which parameters of a model score and train may select: every weight but the embedding tables
(and a vision-language model's vision tower), unless the user's --include/--exclude say otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from piece_surgery.models.fused import ParameterSlice, StoredSlice, fused_parameters
from piece_surgery.models.parts import VISION, is_vision_language, part_of
from piece_surgery.models.structure import router_parameters
from piece_surgery.runtime.errors import PieceError

DEFAULT_EXCLUDE = ("embed",)


def eligible_parameters(
    model: torch.nn.Module,
    keys: dict[str, str],
    *,
    include: Iterable[str] = (),
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    slices: dict[str, StoredSlice] | None = None,
    exclude_routers: bool = True,
) -> dict[str, torch.nn.Parameter | ParameterSlice]:
    """Parameters that may be selected, keyed by checkpoint tensor name.

    Embedding tables are never eligible unless an --include pattern names them: besides names with
    "embed", that covers families whose tables are called otherwise (GPT-2's `wte`/`wpe`). Nor is
    a vision-language model's vision tower (parts.part_of), as in PIECE's own multimodal runs,
    which adapt the language side: its image features stay what the projector was trained on,
    and the accumulators stay those of the language model and projector.
    """
    include = [re.compile(p) for p in include]
    exclude = [re.compile(p) for p in exclude]
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    routers = router_parameters(model) if exclude_routers else set()
    vision_language = is_vision_language(getattr(model, "config", None))
    # stored name -> what it is in the model, in the model's order: a parameter, or the part of one
    # it holds (an expert stored apart)
    parts = fused_parameters(slices or {})
    stored: dict = {}
    for name, param in model.named_parameters():
        if name in keys:
            stored[keys[name]] = param
        stored.update({s.name: ParameterSlice(param, s) for s in parts.get(name, [])})
    chosen: dict = {}
    for key, tensor in stored.items():
        param = tensor.parameter if isinstance(tensor, ParameterSlice) else tensor
        if not param.dtype.is_floating_point:
            continue
        included = any(p.search(key) for p in include)
        if include and not included:
            continue
        if any(p.search(key) for p in exclude) and not included:
            continue
        if (id(param) in embedding_ids or id(param) in routers) and not included:
            continue
        if vision_language and part_of(key) == VISION and not included:
            continue
        chosen[key] = tensor
    if not chosen:
        raise PieceError("no parameter is eligible: the --include/--exclude patterns leave nothing to score")
    return chosen
