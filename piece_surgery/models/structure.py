"""What holds a parameter in a model, and what kind of module it is: questions the sparse trainer,
the SHiRA layout and eligibility ask of a model's structure."""

from __future__ import annotations

import torch


def owners(model: torch.nn.Module) -> dict[int, list[tuple[torch.nn.Module, str]]]:
    """id(parameter) -> every (module, attribute name) that holds it (two for tied weights)."""
    found: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                found.setdefault(id(p), []).append((module, attr))
    return found


def is_linear_weight(module: torch.nn.Module, param: torch.nn.Parameter) -> bool:
    return type(module) is torch.nn.Linear and module.weight is param


def is_gain_module(module: torch.nn.Module) -> bool:
    """A leaf module whose parameters are all vectors: a norm (gain, maybe bias), cheap to recompute."""
    params = list(module.parameters(recurse=False))
    return not list(module.children()) and bool(params) and all(p.dim() == 1 for p in params)
