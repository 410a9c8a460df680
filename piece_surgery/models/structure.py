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


def router_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the parameters of a mixture-of-experts model's routers: beside a child module named
    `experts` (its tensors fused, expert first, or a list of expert modules), the leaf modules
    whose 2-D weight has one row per expert (Mixtral's, Qwen-MoE's, OLMoE's and DeepSeek's `gate`,
    gpt-oss's `router`), with their biases. A shared expert's gate (Qwen2-MoE's one-row
    `shared_expert_gate`) is not one: it scales a dense MLP, it picks no expert."""
    found: set[int] = set()
    for module in model.modules():
        experts = getattr(module, "experts", None)
        count = _experts_in(experts) if isinstance(experts, torch.nn.Module) else None
        if not count:
            continue
        for name, child in module.named_children():
            weight = getattr(child, "weight", None)
            leaf = name != "experts" and not list(child.children())
            if (
                leaf
                and isinstance(weight, torch.nn.Parameter)
                and weight.dim() == 2
                and weight.shape[0] == count
            ):
                found.update(id(p) for p in child.parameters(recurse=False))
    return found


def _experts_in(experts: torch.nn.Module) -> int | None:
    """How many experts a layer's `experts` module holds: a list's length, or the first dimension
    its fused tensors share."""
    if isinstance(experts, torch.nn.ModuleList):
        return len(experts)
    firsts = {p.shape[0] for p in experts.parameters(recurse=False) if p.dim() >= 2}
    return firsts.pop() if len(firsts) == 1 else None
