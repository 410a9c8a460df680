"""Gradients for the selected entries of a model's weights, and never a dense weight gradient.

`SparseParameters` holds the k trainable values of each masked tensor and feeds them gradients.
For a linear layer's weight, y = x W^T + b, dL/dW[o, i] = sum over tokens of dy[:, o] * x[:, i]: with
k selected entries that is O(tokens x k) work instead of the O(tokens x out x in) matrix product,
and backward needs only the input columns that selected entries use (saved alone when they are
few). Other weights (norm gains, biases, weights shared by two modules) get their small or
unavoidable dense gradient reduced to the k entries as soon as backward produces it.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Cap on the (tokens x entries) gathers formed at once in backward, in elements (16 MiB in fp32),
# so a tensor with many selected entries does not add a large transient to the backward peak.
_CHUNK_ELEMENTS = 1 << 22


# Entries whose rows x columns span at most this many times their count are computed as one small
# matrix product: importance masks cluster in a few rows and columns (median 4x on SmolLM2), and one
# BLAS call over the block beats gathering a column pair per entry.
BLOCK_FACTOR = 8


@dataclass
class EntryPlan:
    rows: torch.Tensor  # output feature of each selected entry
    cols: torch.Tensor  # input feature of each selected entry
    used_cols: torch.Tensor  # the distinct input features, sorted
    col_pos: torch.Tensor  # position of each entry's input feature in used_cols
    used_rows: torch.Tensor  # the distinct output features, sorted
    row_pos: torch.Tensor  # position of each entry's output feature in used_rows
    gather: bool  # save only x[..., used_cols] (few distinct columns) rather than x itself
    block: bool  # gradient as dy[:, used_rows]^T x[:, used_cols], read at the entries

    @classmethod
    def for_indices(cls, flat_indices: torch.Tensor, in_features: int) -> EntryPlan:
        rows, cols = flat_indices // in_features, flat_indices % in_features
        used, pos = torch.unique(cols, return_inverse=True)
        used_rows, row_pos = torch.unique(rows, return_inverse=True)
        return cls(
            rows,
            cols,
            used,
            pos,
            used_rows,
            row_pos,
            # x itself is often saved anyway (q/k/v share it), so only a clearly smaller copy pays
            gather=used.numel() * 2 <= in_features,
            block=used_rows.numel() * used.numel() <= BLOCK_FACTOR * max(rows.numel(), 1),
        )


class SelectedEntryLinear(torch.autograd.Function):
    """F.linear whose weight gradient is delivered only at the planned entries, to `values`."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, plan: EntryPlan):
        # index_select, not x[..., cols]: the generic indexing kernel is 1.3-3x slower here
        saved = torch.index_select(x, -1, plan.used_cols) if plan.gather else x
        ctx.save_for_backward(saved, weight)
        ctx.plan = plan
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        saved, weight = ctx.saved_tensors
        plan: EntryPlan = ctx.plan
        grad_x = dy.matmul(weight.to(dy.dtype)) if ctx.needs_input_grad[0] else None
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = saved.reshape(-1, saved.shape[-1])
        cols = plan.col_pos if plan.gather else plan.cols
        k = plan.rows.numel()
        grad_bias = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if plan.block:
            a = torch.index_select(dy2, 1, plan.used_rows).float()
            b = (x2 if plan.gather else torch.index_select(x2, 1, plan.used_cols)).float()
            grad_values = (a.t() @ b)[plan.row_pos, plan.col_pos]
            return grad_x, None, grad_bias, grad_values, None
        grad_values = torch.empty(k, dtype=torch.float32, device=dy.device)
        step = max(1, _CHUNK_ELEMENTS // max(dy2.shape[0], 1))
        for start in range(0, k, step):
            end = min(start + step, k)
            a = torch.index_select(dy2, 1, plan.rows[start:end]).float()
            b = torch.index_select(x2, 1, cols[start:end]).float()
            # a is a fresh gather, so the product can overwrite it: no third (tokens x entries) tensor
            grad_values[start:end] = a.mul_(b).sum(0)
        return grad_x, None, grad_bias, grad_values, None


def route_linear(module: torch.nn.Linear, values: torch.Tensor, indices: torch.Tensor) -> None:
    """Make `module` deliver its weight gradient at `indices` to `values` (undo with restore)."""
    plan = EntryPlan.for_indices(indices, module.in_features)

    def forward(self, x):
        return SelectedEntryLinear.apply(x, self.weight, self.bias, values, plan)

    _replace_forward(module, types.MethodType(forward, module))


def recompute_in_backward(module: torch.nn.Module) -> None:
    """Run `module` under activation checkpointing: keep only its inputs, recompute it in backward.

    For a norm whose gain is trained, autograd would otherwise keep the normalised activation
    (tokens x hidden) for the gain's gradient, in every layer; recomputing a norm costs little.
    Undo with restore.
    """
    from torch.utils.checkpoint import checkpoint

    original = module.forward  # bound: keeps any wrapper already on the instance

    def forward(self, *args, **kwargs):
        return checkpoint(original, *args, use_reentrant=False, **kwargs)

    _replace_forward(module, types.MethodType(forward, module))


_SAVED = "_piece_surgery_saved_forward"


def _replace_forward(module: torch.nn.Module, forward) -> None:
    # keep a forward set on the instance before ours (a hook library's), for restore
    module.__dict__[_SAVED] = module.__dict__.get("forward")
    module.forward = forward


def restore(module: torch.nn.Module) -> None:
    """Undo route_linear or recompute_in_backward: the module's forward is what it was."""
    module.__dict__.pop("forward", None)
    previous = module.__dict__.pop(_SAVED, None)
    if previous is not None:
        module.forward = previous


def sole_owners(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """id(parameter) -> its module, for the parameters that exactly one module holds (a tied weight
    has two owners and two sources of gradient, so it is left out)."""
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(module)
    return {key: found[0] for key, found in owners.items() if len(found) == 1}


def is_linear_weight(module: torch.nn.Module, param: torch.nn.Parameter) -> bool:
    return type(module) is torch.nn.Linear and module.weight is param


def is_gain_module(module: torch.nn.Module) -> bool:
    """A leaf module whose parameters are all vectors: a norm (gain, maybe bias), cheap to recompute."""
    params = list(module.parameters(recurse=False))
    return not list(module.children()) and bool(params) and all(p.dim() == 1 for p in params)


class SparseParameters:
    """The k trainable values of each masked tensor, and what feeds them gradients.

    Linear layers compute only the selected entries of their weight gradient (sparse_grad.py);
    other tensors (norm gains, biases, shared or non-Linear weights) get their dense gradient
    reduced to the k entries by a hook as soon as backward produces it, and freed. Norms with a
    trained gain are recomputed in backward rather than keeping their normalised output.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], indices: dict[str, torch.Tensor]):
        self.params = params
        self.indices = {n: indices[n].to(params[n].device) for n in params}
        self.values = {
            n: params[n].detach().reshape(-1)[self.indices[n]].float().clone().requires_grad_(True)
            for n in params
        }
        self._handles = []
        self._routed: list[torch.nn.Module] = []

    def attach(self, model: torch.nn.Module, *, sparse_linear: bool = True) -> None:
        owners = sole_owners(model) if sparse_linear else {}
        routed = {
            name: owners[id(p)]
            for name, p in self.params.items()
            if id(p) in owners and is_linear_weight(owners[id(p)], p)
        }
        hooked = {id(p) for n, p in self.params.items() if n not in routed}
        for p in model.parameters():  # nothing else is trained, nor even gets a gradient
            p.requires_grad_(id(p) in hooked)
        for name, module in routed.items():
            route_linear(module, self.values[name], self.indices[name])
            self._routed.append(module)
        for name, p in self.params.items():
            if name not in routed:
                self._handles.append(p.register_post_accumulate_grad_hook(self._gather(name)))
        gains = dict.fromkeys(
            owners[id(p)] for n, p in self.params.items() if n not in routed and id(p) in owners
        )
        for module in gains:  # in parameter order, each module once
            if is_gain_module(module):
                recompute_in_backward(module)
                self._routed.append(module)

    def _gather(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            g = param.grad.reshape(-1)[self.indices[name]].float()
            value = self.values[name]
            value.grad = g if value.grad is None else value.grad.add_(g)
            param.grad = None

        return hook

    def write(self) -> None:
        """Put the current values into the model's weights."""
        with torch.no_grad():
            for name, p in self.params.items():
                p.view(-1)[self.indices[name]] = self.values[name].detach().to(p.dtype)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module in self._routed:
            restore(module)
        self._routed.clear()
