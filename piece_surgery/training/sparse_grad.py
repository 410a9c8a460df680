"""Gradients for the selected entries of a model's weights, and never a dense weight gradient.

`SparseParameters` holds the k trainable values of each masked tensor and feeds them gradients
through module hooks, never by replacing a module's forward: hub kernels (transformers' `kernels`
integration re-kernelizes on every `train()`/`eval()`), accelerate, PEFT and `torch.compile` replace
or wrap forwards, but they all call a module through `__call__`, which runs its hooks.

- A linear layer's weight (y = x W^T + b): a forward hook passes the output through an identity
  whose backward computes dL/dW at the k selected entries only, sum over tokens of dy[:, o] x[:, i]:
  O(tokens x k) work instead of the O(tokens x out x in) product, keeping only the input columns
  the entries use (when they are few). The weight itself holds the values (written before a forward).
- A norm's gain (a leaf module whose parameters are vectors): the same identity on its output; its
  backward recomputes the module from its input with the gain's values as a leaf, so the normalised
  activation is never kept.
- Anything else (a bias, a weight two modules share, an embedding, GPT-2's Conv1D, a
  mixture-of-experts layer's fused expert weight): a forward pre-hook puts a tensor carrying the
  values into the module's parameter slot for the call (as torch.func.functional_call does) and a
  forward hook puts the frozen weight back; autograd reduces its dense gradient to the k entries at
  once. Experts a checkpoint stores one tensor each are parts of one fused weight: their values
  join in one injection, each at its offset (models.fused), and keep their own gradients.
- The output embedding (a language model's head): the same, but for the whole model's call and in
  every slot that holds it (tied to the input embedding, say), because fused losses (TRL's fused LM
  head, Liger's fused linear cross-entropy) read its weight directly, never calling its module.
  Its dense gradient is formed (vocab x hidden) when the mask selects entries of it.

`probe` proves, before training, that every value is on the autograd path, and names the real
cause when one is not.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from piece_surgery.models.fused import holder
from piece_surgery.models.parts import image_side
from piece_surgery.models.structure import is_gain_module, is_linear_weight, owners
from piece_surgery.runtime.distributed import World
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.sharding import full, local_part

# Cap on the (tokens x entries) gathers formed at once in backward, in elements (16 MiB in fp32),
# so a tensor with many selected entries does not add a large transient to the backward peak.
_CHUNK_ELEMENTS = 1 << 22


# torch.compile leaves modules' hooks out of its guards by default (skip_nnmodule_hook_guards): a
# frame compiled for a layer whose modules carry no hook is then reused for a layer whose modules carry
# ours, and their values silently stop getting gradients (a llama with its norm gains and layer 0's
# MLP masked: the MLP trained on the first step only). While any model has sparse parameters attached
# (detached, or collected without a detach), compiled frames guard on the hooks too; the setting the
# process had comes back after the last. A torch without the setting is left as it is.
_HOOK_GUARDS = {"held": 0, "skip_before": None}


def _hold_hook_guards(model: torch.nn.Module) -> weakref.finalize:
    """Turn hook guards on while `model` carries our hooks; the returned finalizer (called by
    detach, or when the model is collected) releases the hold, once."""
    import torch._dynamo

    config = torch._dynamo.config
    if hasattr(config, "skip_nnmodule_hook_guards"):
        if _HOOK_GUARDS["held"] == 0:
            _HOOK_GUARDS["skip_before"] = config.skip_nnmodule_hook_guards
            config.skip_nnmodule_hook_guards = False
        _HOOK_GUARDS["held"] += 1
        return weakref.finalize(model, _release_hook_guards)
    return weakref.finalize(model, lambda: None)


def _release_hook_guards() -> None:
    import torch._dynamo

    _HOOK_GUARDS["held"] -= 1
    if _HOOK_GUARDS["held"] == 0:
        torch._dynamo.config.skip_nnmodule_hook_guards = _HOOK_GUARDS["skip_before"]


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

    def saved_input(self, x: torch.Tensor) -> torch.Tensor:
        """What backward needs of the layer's input x (..., in): x, or its used columns."""
        # index_select, not x[..., cols]: the generic indexing kernel is 1.3-3x slower here
        return torch.index_select(x, -1, self.used_cols) if self.gather else x


def selected_entry_gradient(dy: torch.Tensor, saved: torch.Tensor, plan: EntryPlan) -> torch.Tensor:
    """dL/dW of y = x W^T + b at the plan's k entries: sum over tokens of dy[:, row] x[:, col].

    dy: (..., out), the output's gradient; saved: plan.saved_input(x), (..., in) or (..., used).
    Returns fp32 (k,), formed from gathers of at most _CHUNK_ELEMENTS at once, or one small matrix
    product over the block of rows x columns the entries span.
    """
    dy2 = dy.reshape(-1, dy.shape[-1])
    x2 = saved.reshape(-1, saved.shape[-1])
    if plan.block:
        a = torch.index_select(dy2, 1, plan.used_rows).float()
        b = (x2 if plan.gather else torch.index_select(x2, 1, plan.used_cols)).float()
        return (a.t() @ b)[plan.row_pos, plan.col_pos]
    cols = plan.col_pos if plan.gather else plan.cols
    k = plan.rows.numel()
    grad = torch.empty(k, dtype=torch.float32, device=dy.device)
    step = max(1, _CHUNK_ELEMENTS // max(dy2.shape[0], 1))
    for start in range(0, k, step):
        end = min(start + step, k)
        a = torch.index_select(dy2, 1, plan.rows[start:end]).float()
        b = torch.index_select(x2, 1, cols[start:end]).float()
        # a is a fresh gather, so the product can overwrite it: no third (tokens x entries) tensor
        grad[start:end] = a.mul_(b).sum(0)
    return grad


class LinearEntryTap(torch.autograd.Function):
    """Identity on a linear layer's output y (..., out); backward passes dy on unchanged and gives
    `values` (k,) fp32 the gradient of the layer's weight at the plan's entries
    (selected_entry_gradient). The layer computed y with its frozen weight, which holds the values."""

    @staticmethod
    def forward(ctx, output, x, values, plan: EntryPlan):
        ctx.save_for_backward(plan.saved_input(x))
        ctx.plan = plan
        # a new tensor, not a view of the input: later in-place ops on the output stay legal
        return output.clone()

    @staticmethod
    def backward(ctx, dy):
        (saved,) = ctx.saved_tensors
        grad_values = selected_entry_gradient(dy, saved, ctx.plan) if ctx.needs_input_grad[2] else None
        return dy, None, grad_values, None


class InjectEntries(torch.autograd.Function):
    """The weight, on the autograd path to `values` (its entries at the flat `indices`); backward
    delivers the gradient at those entries to `values` (the weight itself is frozen).

    The weight already holds the values (SparseParameters writes them before every forward), so
    the forward returns a view of it, not a copy with the values written in: a module's ops keep
    the weight itself for backward, as they would without training, and a large weight (every
    expert of a layer fused in one tensor, an embedding table) is not copied once per forward."""

    @staticmethod
    def forward(ctx, weight, values, indices):
        ctx.save_for_backward(indices)
        return weight.detach().view_as(weight)

    @staticmethod
    def backward(ctx, grad_out):
        (indices,) = ctx.saved_tensors
        return None, grad_out.reshape(-1)[indices].float(), None


@dataclass
class Entries:
    """The selected entries of one parameter slot of one module: `module._parameters[attr]`."""

    name: str  # the tensor's name in the model
    attr: str
    values: torch.Tensor  # (k,) fp32, the trainable values
    indices: torch.Tensor  # (k,) int64, sorted flat indices in the parameter (an expert's: past its offset)


@contextmanager
def injected(module: torch.nn.Module, entries: list[Entries], values: list[torch.Tensor]) -> Iterator[None]:
    """Inside, each entry's parameter slot of `module` holds its weight with `values` at its
    indices (on the autograd path to them); the frozen weights are put back on leaving."""
    frozen = inject_into(module, entries, values)
    try:
        yield
    finally:
        module._parameters.update(frozen)


def inject_into(
    module: torch.nn.Module, entries: list[Entries], values: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Put into each parameter slot the entries name its weight with their `values` at their
    indices, in one InjectEntries per slot (several stored experts are parts of one fused weight:
    their values join, each keeping its own gradient); returns the frozen weights taken out."""
    by_attr: dict[str, list[tuple[Entries, torch.Tensor]]] = {}
    for e, v in zip(entries, values, strict=True):
        by_attr.setdefault(e.attr, []).append((e, v))
    frozen = {}
    for attr, pairs in by_attr.items():
        frozen[attr] = module._parameters[attr]
        joined = pairs[0][1] if len(pairs) == 1 else torch.cat([v for _, v in pairs])
        indices = pairs[0][0].indices if len(pairs) == 1 else torch.cat([e.indices for e, _ in pairs])
        module._parameters[attr] = InjectEntries.apply(frozen[attr], joined, indices)
    return frozen


class GainTap(torch.autograd.Function):
    """Identity on a gain module's output; backward passes dy on unchanged and gives the gain's
    values their gradient by recomputing the module (its current forward, whatever that is, without
    hooks) from the saved input with the values as leaves. The module's output was computed with
    its frozen gain, which holds the values; autograd keeps its input, not its normalised output.

    apply(output, site, call, *values, *inputs): the site's values, then the call's tensors."""

    @staticmethod
    def forward(ctx, output, site: _Site, call: _Call, *tensors):
        ctx.site, ctx.call = site, call
        ctx.autocast = _autocast_state(output.device.type)
        ctx.save_for_backward(*tensors[len(site.entries) :])
        return output.clone()  # a new tensor: later in-place ops on the output stay legal

    @staticmethod
    def backward(ctx, dy):
        site: _Site = ctx.site
        inputs = ctx.saved_tensors
        with torch.enable_grad(), _autocast(*ctx.autocast):
            leaves = [e.values.detach().requires_grad_() for e in site.entries]
            args, kwargs = ctx.call.rebuild([t.detach() for t in inputs])
            with injected(site.module, site.entries, leaves):
                out = site.module.forward(*args, **kwargs)  # not __call__: no hooks run again
            grads = torch.autograd.grad(out, leaves, dy, allow_unused=True)
        wanted = ctx.needs_input_grad[3 : 3 + len(leaves)]
        values_grads = [g if w else None for g, w in zip(grads, wanted, strict=True)]
        return (dy, None, None, *values_grads, *([None] * len(inputs)))


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype | None]:
    try:
        return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, RuntimeError, AttributeError):  # a device type autocast does not know
        return device_type, False, None


def _autocast(device_type: str, enabled: bool, dtype: torch.dtype | None):
    """The autocast state a forward ran under, again (for a recomputation in backward)."""
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type, dtype=dtype)


@dataclass
class _Call:
    """The structure of a module call's arguments, with its tensors taken out (and put back)."""

    args: tuple
    kwargs: dict
    slots: list  # (is_kwarg, position or key) of each tensor

    @classmethod
    def of(cls, args: tuple, kwargs: dict) -> tuple[_Call, list[torch.Tensor]]:
        slots = [(False, i) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        slots += [(True, k) for k, a in kwargs.items() if isinstance(a, torch.Tensor)]
        tensors = [kwargs[key] if is_kw else args[key] for is_kw, key in slots]
        return cls(tuple(args), dict(kwargs), slots), tensors

    def rebuild(self, tensors: list[torch.Tensor]) -> tuple[tuple, dict]:
        args, kwargs = list(self.args), dict(self.kwargs)
        for (is_kw, key), t in zip(self.slots, tensors, strict=True):
            if is_kw:
                kwargs[key] = t
            else:
                args[key] = t
        return tuple(args), kwargs


@dataclass(eq=False)
class _Site:
    """One module whose parameters hold selected entries, and how their gradient is delivered:
    `linear` (LinearEntryTap), `gain` (GainTap), `inject` (InjectEntries in its parameter slots) or
    `root` (InjectEntries in every slot that holds the weight, for the whole model's call)."""

    module: torch.nn.Module
    path: str  # the module's name in the model
    kind: str
    entries: list[Entries]
    plan: EntryPlan | None = None
    handles: list = field(default_factory=list)
    # `root`: every (module, attribute) that holds the parameter, injected for the model's whole call
    holders: list[tuple[torch.nn.Module, str]] = field(default_factory=list)


class SparseParameters:
    """The k trainable values of each masked tensor (fp32 nn.Parameters: what the optimizer, and
    DistributedDataParallel, see), and the module hooks that feed them gradients (module docstring).
    Every model weight stays frozen: no dense weight gradient is ever kept.

    `attach` hooks the model; before each forward pass and each `state_dict()` of the model, its
    weights are brought up to date with the values (root pre-hooks write them when a version
    changed, so an optimizer step by any training loop is seen); `detach` takes every hook off and
    gives the parameters back their requires_grad.
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
        self.sites: list[_Site] = []
        self._model: torch.nn.Module | None = None
        self._root_handles: list = []  # the write before a forward and before a state dict
        self._hook_guards: weakref.finalize | None = None  # releases the compile hook guards
        self._flags: list[tuple[torch.nn.Parameter, bool]] = []
        self._written: tuple[int, ...] | None = None
        self._called: set[str] | None = None  # module paths whose hook ran, while probing

    # ------------------------------------------------------------------ hooking the model

    def attach(self, model: torch.nn.Module, *, sparse_linear: bool = True) -> None:
        """Deliver every masked tensor's gradient to its values; `sparse_linear=False` injects into
        linear layers too (their dense gradient is formed: the slower reference path).

        Raises PieceError when a masked tensor is not a parameter of `model`."""
        if self._model is not None:
            raise PieceError("these sparse parameters are attached to a model already; detach them first")
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in self._flags:  # nothing is trained but the values
            p.requires_grad_(False)
        self.sites = self._plan_sites(model, sparse_linear)
        for site in self.sites:
            self._hook(site)
        self._model = model
        self._written = None
        # run as it is, never traced: under torch.compile the write's loop over the masked tensors
        # (each its own shape) would be compiled again per tensor, up to dynamo's recompile limit
        write = torch.compiler.disable(self._write_if_changed)
        self._root_handles = [
            model.register_forward_pre_hook(write, prepend=True),
            # a state dict holds the trained weights (save_pretrained right after optimizer.step())
            model.register_state_dict_pre_hook(lambda module, prefix, keep_vars: write(module, None)),
        ]
        self._hook_guards = _hold_hook_guards(model)
        self.write()

    def _plan_sites(self, model: torch.nn.Module, sparse_linear: bool) -> list[_Site]:
        holders = owners(model)
        paths = {id(m): path for path, m in model.named_modules(remove_duplicate=False)}
        for name, p in self.params.items():
            if not holders.get(id(holder(p)[0])):
                raise PieceError(f"masked tensor '{name}' is not a parameter of this model")
        sites: dict[tuple[int, str], _Site] = {}
        output = _output_weight(model)
        for name, p in self.params.items():
            param, offset = holder(p)  # an expert stored apart: its part of the fused weight
            if param is output:
                # fused losses (TRL's fused LM head, Liger's fused cross-entropy) read the output
                # embedding's weight directly, never calling its module: inject it for the whole call
                entries = [Entries(name, "weight", self.values[name], self.indices[name])]
                sites[(id(model), name)] = _Site(model, "", "root", entries, holders=holders[id(p)])
                continue
            shared = len(holders[id(param)]) > 1
            for module, attr in holders[id(param)]:
                entries = Entries(name, attr, self.values[name], self.indices[name] + offset)
                if sparse_linear and not shared and is_linear_weight(module, p):
                    plan = EntryPlan.for_indices(self.indices[name], module.in_features)
                    sites[(id(module), "linear")] = _Site(
                        module, paths[id(module)], "linear", [entries], plan
                    )
                    continue
                gain = not shared and is_gain_module(module)
                kind = "gain" if gain else "inject"
                site = sites.setdefault((id(module), kind), _Site(module, paths[id(module)], kind, []))
                site.entries.append(entries)
        return list(sites.values())

    def _hook(self, site: _Site) -> None:
        module = site.module
        if site.kind == "root":
            self._hook_root(site)
            return
        if site.kind == "inject":
            frozen: list[dict[str, torch.Tensor]] = []  # a stack: a module may be called inside its own call

            def inject(mod, args):
                self._note_call(site)
                frozen.append(inject_into(mod, site.entries, [e.values for e in site.entries]))

            def put_back(mod, args, output):
                if frozen:
                    mod._parameters.update(frozen.pop())

            site.handles += [
                module.register_forward_pre_hook(inject),
                module.register_forward_hook(put_back, always_call=True),
            ]
            return

        def tap(mod, args, kwargs, output):
            self._note_call(site)
            if not torch.is_grad_enabled():
                return output
            if site.kind == "linear":
                x = args[0] if args else kwargs["input"]
                return LinearEntryTap.apply(output, x, site.entries[0].values, site.plan)
            call, tensors = _Call.of(args, kwargs)
            return GainTap.apply(output, site, call, *(e.values for e in site.entries), *tensors)

        site.handles.append(module.register_forward_hook(tap, with_kwargs=True))

    def _hook_root(self, site: _Site) -> None:
        """The weight with its values, in every slot that holds it, while the model runs."""
        entry = site.entries[0]
        frozen: list[list[torch.Tensor]] = []

        def inject(mod, args):
            self._note_call(site)
            frozen.append([m._parameters[attr] for m, attr in site.holders])
            weight = InjectEntries.apply(frozen[-1][0], entry.values, entry.indices)
            for m, attr in site.holders:
                m._parameters[attr] = weight

        def put_back(mod, args, output):
            if frozen:
                for (m, attr), weight in zip(site.holders, frozen.pop(), strict=True):
                    m._parameters[attr] = weight

        site.handles += [
            site.module.register_forward_pre_hook(inject),
            site.module.register_forward_hook(put_back, always_call=True),
        ]

    def _note_call(self, site: _Site) -> None:
        if self._called is not None:
            self._called.add(site.path)

    def _write_if_changed(self, module, args) -> None:
        if self._written != self._versions():
            self.write()

    def _versions(self) -> tuple[int, ...]:
        return tuple(v._version for v in self.values.values())

    def check_attached(self) -> None:
        """Every hook is still on its module (a library that cleared a module's hooks would stop the
        values' gradients silently). Raises PieceError naming the module."""
        for site in self.sites:
            hooks = {**site.module._forward_pre_hooks, **site.module._forward_hooks}
            if any(handle.id not in hooks for handle in site.handles):
                raise PieceError(
                    f"the hooks that train '{site.entries[0].name}' were taken off module '{site.path}' "
                    "by something else that changed the model; attach the sparse parameters again"
                )

    def detach(self) -> None:
        """Undo attach: every hook off, the parameters' requires_grad as they were."""
        for site in self.sites:
            for handle in site.handles:
                handle.remove()
        self.sites = []
        if self._root_handles:
            for handle in self._root_handles:
                handle.remove()
            self._root_handles = []
            self._hook_guards()  # a finalizer runs once: a model collected later releases nothing again
        for p, flag in self._flags:
            p.requires_grad_(flag)
        self._flags.clear()
        self._model = None

    # ------------------------------------------------------------------ proving the path

    def probe(self, loss_of_batch: Callable[[], torch.Tensor]) -> None:
        """Run one forward and backward (`loss_of_batch` returns a loss with its graph) and check
        that every value got a gradient; the values' gradients and the random state are left as
        they were. Raises PieceError naming the first masked tensor off the autograd path, and why:
        its module never called (a forward replaced above it, or data that does not use it), or
        called without its output reaching the loss."""
        saved_grads = {n: v.grad for n, v in self.values.items()}
        for v in self.values.values():
            v.grad = None
        devices = [p.device for p in self.params.values() if p.device.type == "cuda"][:1]
        try:
            with self.calls() as called, torch.random.fork_rng(devices=devices):
                loss = loss_of_batch()
                if loss.requires_grad:
                    loss.backward()
            missing = [n for n, v in self.values.items() if v.grad is None]
        finally:
            for n, v in self.values.items():
                v.grad = saved_grads[n]
        if missing:
            raise PieceError(self._why_no_gradient(missing[0], called))

    def _why_no_gradient(self, name: str, called: set[str]) -> str:
        site = next(s for s in self.sites if any(e.name == name for e in s.entries))
        if site.path in called:
            return (
                f"masked tensor '{name}' gets no gradient: module '{site.path}' runs, but its output "
                "does not reach the loss (the model detaches it or uses the tensor elsewhere); leave "
                "it out of the mask (--exclude when scoring)"
            )
        replaced = _replaced_forward_above(self._model, site.path)
        if replaced is not None:
            return (
                f"masked tensor '{name}' gets no gradient: module '{site.path}' is never called, because "
                f"'{replaced}' runs a forward that a library put in place of its own (hub kernels, say) "
                "and computes it another way; load the model without it (USE_HUB_KERNELS=NO for hub "
                "kernels) or leave the tensor out of the mask (--exclude when scoring)"
            )
        side = image_side([name])
        if side is not None:
            return (
                f"masked tensor '{name}' gets no gradient: it is in {side}, which only image records "
                f"reach, and this data reaches none of it (module '{site.path}' never runs); train on "
                "image records, or leave it out with --exclude"
            )
        return (
            f"masked tensor '{name}' gets no gradient: module '{site.path}' is not used on this data; "
            "train on data that uses it, or leave it out of the mask (--exclude when scoring)"
        )

    # ------------------------------------------------------------------ values and weights

    def write(self, values: dict[str, torch.Tensor] | None = None) -> None:
        """Put the current values (or `values`) into the model's weights (into this rank's shard of
        a weight FSDP shards: the next all-gather brings them to the others)."""
        current = values is None
        values = self.values if current else values
        with torch.no_grad():
            for name, p in self.params.items():
                part = local_part(p, self.world)
                positions, offsets = part.select(self.indices[name])
                part.values[offsets] = values[name].detach()[positions].to(p.dtype)
        self._written = self._versions() if current else None

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

    @contextmanager
    def calls(self) -> Iterator[set[str]]:
        """Inside, the paths of the modules whose hooks run are collected in the set yielded."""
        previous, self._called = self._called, set()
        try:
            yield self._called
        finally:
            self._called = previous

    def changed_entries(self, called: set[str] | None = None) -> int:
        """Entries whose value, rounded to its weight's dtype, differs from the base's (of the
        tensors held by the modules in `called` only, if given)."""
        names = (
            None if called is None else {e.name for s in self.sites if s.path in called for e in s.entries}
        )
        total = 0
        for name, v in self.values.items():
            if names is not None and name not in names:
                continue
            dtype = self.params[name].dtype
            total += int((v.detach().to(dtype) != self.base_values[name].to(dtype)).sum())
        return total


def _output_weight(model: torch.nn.Module) -> torch.nn.Parameter | None:
    """The output embedding's weight (a language model's head), if the model says which it is."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None
    weight = getattr(head, "weight", None)
    return weight if isinstance(weight, torch.nn.Parameter) else None


def _replaced_forward_above(model: torch.nn.Module | None, path: str) -> str | None:
    """The nearest module above `path` whose instance carries a forward of its own (hub
    kernels, accelerate or a user's patch put it there), or None."""
    if model is None:
        return None
    parts = path.split(".") if path else []
    for depth in range(len(parts) - 1, -1, -1):  # its own forward may be replaced: its hooks still run
        prefix = ".".join(parts[:depth])
        module = model.get_submodule(prefix) if prefix else model
        if "forward" in module.__dict__:
            return prefix or type(model).__name__
    return None
