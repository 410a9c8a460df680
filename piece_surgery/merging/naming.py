"""A delta under the names a base stores its tensors by, as loading pairs them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

import torch

from piece_surgery.formats.delta import Delta
from piece_surgery.models.pairing import stored_names


def as_stored_in(delta: Delta, layout: Iterable[str], skeleton: Callable[[], torch.nn.Module]) -> Delta:
    """The delta under the names a base stores its tensors by (`layout`: the base's stored names;
    `skeleton()`: its model on the meta device, made only when names differ), as loading pairs
    them (a name with or without the base-model prefix, another layout of a vision-language
    model), and, for a tied weight the delta's base stored once (the head loaded as the
    embedding), every copy the base stores of it, so that they load tied again. A new Delta; the
    one given is not changed."""
    layout = set(layout)
    needs_prefix = any(name not in layout for name in delta.tensors)
    needs_twins = any(t.loads_as for t in delta.tensors.values())
    if not (needs_prefix or needs_twins):
        return delta
    model = skeleton()
    base_names = stored_names(model, layout)
    loads_into = {stored: name for name, stored in stored_names(model, delta.tensors).items()}
    tensors = {}
    for name, t in delta.tensors.items():
        stored = name if name in layout else base_names.get(loads_into.get(name, name), name)
        tensors[stored] = t
        for twin in t.loads_as or ():
            copy = base_names.get(twin)
            if copy is not None and copy not in delta.tensors and copy not in tensors:
                tensors[copy] = replace(t, loads_as=())  # this base stores the twin: change it too
    return replace(delta, tensors=tensors)
