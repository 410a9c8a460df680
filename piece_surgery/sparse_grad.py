"""Gradients for the selected entries of a model's weights, and never a dense weight gradient.

`SparseParameters` holds the k trainable values of each masked tensor and feeds them gradients.
For a linear layer's weight, y = x W^T + b, dL/dW[o, i] = sum over tokens of dy[:, o] * x[:, i]: with
k selected entries that is O(tokens x k) work instead of the O(tokens x out x in) matrix product,
and backward needs only the input columns that selected entries use (saved alone when they are
few). Other weights (norm gains, biases, weights shared by two modules) run with the values
injected, and their small or unavoidable dense gradient is reduced to the k entries at once.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from piece_surgery.distributed import World
from piece_surgery.errors import PieceError
from piece_surgery.sharding import full, local_part

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
    """F.linear whose weight gradient is delivered only at the planned entries, to `values`.

    forward(x: (..., in), weight: (out, in), bias: (out,) or None, values: (k,) fp32, plan) returns
    x W^T + b, (..., out) in x's dtype; the weight itself gets no gradient. backward returns
    dL/dx = dy W (..., in) and, for `values`, dL/dW at the plan's k entries: sum over tokens of
    dy[:, row] x x[:, col], fp32 (k,), formed from gathers of at most _CHUNK_ELEMENTS at once
    (or one small matrix product over the block of rows x columns the entries span).
    """

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


class InjectEntries(torch.autograd.Function):
    """The weight with `values` at its flat `indices`; backward delivers the gradient at those
    entries to `values` (the weight itself is frozen)."""

    @staticmethod
    def forward(ctx, weight, values, indices):
        out = weight.detach().clone()
        out.view(-1)[indices] = values.to(weight.dtype)
        ctx.save_for_backward(indices)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (indices,) = ctx.saved_tensors
        return None, grad_out.reshape(-1)[indices].float(), None


def inject_values(module: torch.nn.Module, attr: str, values: torch.Tensor, indices: torch.Tensor) -> None:
    """Make `module` run with its parameter `attr` carrying `values` at `indices` (an autograd path
    to the values; undo with restore). For small tensors (norm gains) and weights that several
    modules share, whose dense gradient cannot be avoided anyway."""
    original = module.forward  # bound: keeps any wrapper already on the instance

    def forward(self, *args, **kwargs):
        frozen = self._parameters[attr]
        # the module reads self.<attr> from _parameters: a tensor there for one call is how
        # torch.func.functional_call substitutes parameters too
        self._parameters[attr] = InjectEntries.apply(frozen, values, indices)
        try:
            return original(*args, **kwargs)
        finally:
            self._parameters[attr] = frozen

    _replace_forward(module, types.MethodType(forward, module))


_SAVED = "_piece_surgery_saved_forwards"


def _replace_forward(module: torch.nn.Module, forward) -> None:
    # a stack of what was on the instance before each of ours (a hook library's forward, or None)
    module.__dict__.setdefault(_SAVED, []).append(module.__dict__.get("forward"))
    module.forward = forward


def restore(module: torch.nn.Module) -> None:
    """Undo the last route_linear, inject_values or recompute_in_backward on `module`."""
    stack = module.__dict__.get(_SAVED)
    previous = stack.pop() if stack else None
    module.__dict__.pop("forward", None)
    if previous is not None:
        module.forward = previous
    if stack is not None and not stack:
        del module.__dict__[_SAVED]


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


class SparseParameters:
    """The k trainable values of each masked tensor (fp32 nn.Parameters: what the optimizer, and
    DistributedDataParallel, see), and what feeds them gradients.

    Linear layers compute only the selected entries of their weight gradient (SelectedEntryLinear);
    other tensors (norm gains, biases, weights two modules share) run with the values injected, and
    autograd reduces their gradient to the k entries at once. Norms with a trained gain are
    recomputed in backward rather than keeping their normalised output. Every model weight stays
    frozen: no dense weight gradient is ever kept.
    """

    def __init__(
        self,
        params: dict[str, torch.nn.Parameter],
        indices: dict[str, torch.Tensor],
        world: World | None = None,
    ):
        self.params = params
        self.world = world
        self.indices = {n: indices[n].to(params[n].device) for n in params}
        # a weight FSDP shards is read whole once (a collective, in the same order on every rank)
        self.values = {
            n: torch.nn.Parameter(full(params[n]).detach().reshape(-1)[self.indices[n]].float().clone())
            for n in params
        }
        # the base's values (fp32 holds bf16 and fp16 exactly): what as_base puts back
        self.base_values = {n: v.detach().clone() for n, v in self.values.items()}
        self._wrapped: list[torch.nn.Module] = []
        self._flags: list[tuple[torch.nn.Parameter, bool]] = []

    def attach(self, model: torch.nn.Module, *, sparse_linear: bool = True) -> None:
        """Route every masked tensor's gradient to its values; `sparse_linear=False` injects into
        linear layers too (their dense gradient is formed: the slower reference path)."""
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in self._flags:  # nothing is trained but the values
            p.requires_grad_(False)
        holders = owners(model)
        for name, p in self.params.items():
            if not holders.get(id(p)):
                raise PieceError(f"masked tensor '{name}' is not a parameter of this model")
        routed = {
            name
            for name, p in self.params.items()
            if sparse_linear and len(holders[id(p)]) == 1 and is_linear_weight(holders[id(p)][0][0], p)
        }
        # routed linear forwards first: they compute F.linear themselves, so injections (a bias
        # of the same layer, say) must wrap them, not be wrapped by them
        for name in routed:
            self._wrap(
                route_linear, holders[id(self.params[name])][0][0], self.values[name], self.indices[name]
            )
        gains = {}
        for name, p in self.params.items():
            if name in routed:
                continue
            for module, attr in holders[id(p)]:
                self._wrap(inject_values, module, attr, self.values[name], self.indices[name])
                if is_gain_module(module):
                    gains[id(module)] = module
        for module in gains.values():  # in parameter order, each module once
            self._wrap(recompute_in_backward, module)

    def _wrap(self, how, module: torch.nn.Module, *args) -> None:
        how(module, *args)
        self._wrapped.append(module)

    def check_gradients(self) -> None:
        """After a backward: every value got a gradient (a tensor used outside its own module's
        forward would not)."""
        missing = [n for n, v in self.values.items() if v.grad is None]
        if missing:
            raise PieceError(
                f"masked tensor '{missing[0]}' gets no gradient through its module (the model uses it "
                "elsewhere); leave it out with --exclude"
            )

    def write(self, values: dict[str, torch.Tensor] | None = None) -> None:
        """Put the current values (or `values`) into the model's weights (into this rank's shard of
        a weight FSDP shards: the next all-gather brings them to the others)."""
        values = values if values is not None else self.values
        with torch.no_grad():
            for name, p in self.params.items():
                part = local_part(p, self.world)
                positions, offsets = part.select(self.indices[name])
                part.values[offsets] = values[name].detach()[positions].to(p.dtype)

    @contextmanager
    def as_base(self):
        """Inside, the model is the base, bit for bit: the values themselves hold the base's (the
        modules that take them inside their forward read them there) and the weights too; on leaving,
        the trained values are back in both."""
        trained = {n: v.detach().clone() for n, v in self.values.items()}
        with torch.no_grad():
            for name, value in self.values.items():
                value.copy_(self.base_values[name])
        self.write()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in self.values.items():
                    value.copy_(trained[name])
            self.write()

    def detach(self) -> None:
        """Undo attach: the modules' forwards and the parameters' requires_grad as they were."""
        for module in reversed(self._wrapped):
            restore(module)
        self._wrapped.clear()
        for p, flag in self._flags:
            p.requires_grad_(flag)
        self._flags.clear()
