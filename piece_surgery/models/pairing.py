"""How a checkpoint's stored tensor names pair with a model's parameter names: as transformers'
loading pairs them (its renaming rules, the base-model prefix), and which names are one tied weight.
Names only (a layout's keys; a meta-device skeleton will do).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def parameter_keys(model: torch.nn.Module, layout: Iterable[str]) -> dict[str, str]:
    """Map each (deduplicated) model parameter name to its tensor name in the checkpoint files.

    A tied parameter (one tensor under several names, e.g. the input embedding and the LM head)
    appears once in named_parameters(): it maps to the first of its names the files store. Names
    pair as loading pairs them (stored_names): older files without the base-model prefix, and
    vision-language layouts that transformers renames on loading.
    """
    return {names[0]: stored[0] for names, stored in _tied_groups(model, layout) if stored}


def stored_aliases(model: torch.nn.Module, layout: Iterable[str]) -> dict[str, list[str]]:
    """For a tied parameter whose files store several of its names (common after fine-tuning):
    the stored name parameter_keys maps it to -> the other stored names. transformers ties them
    again on loading only while their stored values agree, so a change to one is a change to all."""
    return {stored[0]: stored[1:] for _, stored in _tied_groups(model, layout) if len(stored) > 1}


def unstored_twins(model: torch.nn.Module, layout: Iterable[str]) -> dict[str, list[str]]:
    """For a tied parameter whose files store some of its names but not all: each stored name ->
    the parameter names the files do not store, which load as it (a head tied to an embedding the
    files store once). A delta records them (`loads_as`): changing the stored tensor changes them."""
    names_stored = stored_names(model, layout)
    return {
        key: [n for n in names if n not in names_stored]
        for names, stored in _tied_groups(model, layout, names_stored)
        for key in stored
        if len(stored) < len(names)
    }


def tied_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """Parameter name -> the other names of the same tensor, for tied parameters."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return {n: [o for o in names if o != n] for names in groups.values() if len(names) > 1 for n in names}


def _tied_groups(
    model: torch.nn.Module, layout: Iterable[str], names_stored: dict[str, str] | None = None
) -> list[tuple[list[str], list[str]]]:
    """(every name of a parameter, in named_parameters order; those of them the files store)."""
    names_stored = stored_names(model, layout) if names_stored is None else names_stored
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    out = []
    for names in groups.values():
        stored = [names_stored[n] for n in names if n in names_stored]
        out.append((names, list(dict.fromkeys(stored))))
    return out


def stored_names(model: torch.nn.Module, stored: Iterable[str]) -> dict[str, str]:
    """The model's state_dict names (parameters under every tied name, and buffers) -> the stored
    tensor each loads from, for the names among `stored` that loading uses as they are.

    The pairing is transformers' own: from_pretrained renames each stored name with the model's
    conversion mapping (transformers.conversion_mapping; vision-language models' layouts, legacy
    names) and adds or drops the base-model prefix; this runs the same renaming over the stored
    names and inverts it, so it is exact and needs names only (a meta-device skeleton will do).
    A stored tensor loading converts (experts fused into one tensor: not one-to-one) is left out.
    With transformers 4, which has no conversion mapping, only the prefix rule applies.
    """
    expected = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "") or ""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4
        return _stored_names_by_prefix(expected, prefix, stored)
    transforms = get_model_conversion_mapping(model)  # fresh objects: some carry matching state
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    found: dict[str, str] = {}
    for key in sorted(stored, key=_dot_natural):  # the order loading visits them in
        name, converted = rename_source_key(key, renamings, converters, prefix, expected)
        if name not in expected and key in expected:  # loading's own fallback: the name as stored
            name, converted = rename_source_key(key, [], [], prefix, expected)
        if converted is not None or name not in expected:
            continue
        if name not in found or key == name:  # two stored names for one: the exact one wins
            found[name] = key
    return found


def _dot_natural(name: str) -> list:
    """Sort key: dotted parts, numbers as numbers (`layers.10` after `layers.9`), as loading sorts."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def _stored_names_by_prefix(expected: dict, prefix: str, stored: Iterable[str]) -> dict[str, str]:
    stored = set(stored)
    found = {}
    for name in expected:
        candidates = [name]
        if prefix and name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1 :])
        elif prefix:
            candidates.append(f"{prefix}.{name}")
        key = next((c for c in candidates if c in stored), None)
        if key is not None:
            found[name] = key
    return found
