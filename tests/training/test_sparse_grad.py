"""The selected-entry gradients, checked against dense autograd, and the hooks that deliver them:
they survive whatever replaces a module's forward (hub kernels, a library's patch, torch.compile),
and a value off the autograd path is one line that names the real cause."""

import types

import pytest
import torch
from transformers import AutoModelForCausalLM

from piece_surgery.models.structure import is_gain_module
from piece_surgery.runtime.errors import PieceError
from piece_surgery.training.sparse_grad import EntryPlan, SparseParameters, selected_entry_gradient


def _flat_indices(gen, rows, cols, distinct_cols, n=60):
    chosen = torch.randperm(cols, generator=gen)[:distinct_cols]
    flat = (
        torch.randint(0, rows, (n,), generator=gen) * cols
        + chosen[torch.randint(0, distinct_cols, (n,), generator=gen)]
    )
    return torch.unique(flat)


@pytest.mark.parametrize("distinct_cols", [3, 40])  # few columns: gathered copy, block; many: x, per entry
def test_selected_entry_gradient_equals_the_dense_gradients_entries(distinct_cols):
    gen = torch.Generator().manual_seed(0)
    flat = _flat_indices(gen, 24, 48, distinct_cols)
    x = torch.randn(3, 7, 48, generator=gen)
    dy = torch.randn(3, 7, 24, generator=gen)
    plan = EntryPlan.for_indices(flat, 48)
    assert plan.gather == (distinct_cols * 2 <= 48)
    # entries in 3 columns form a small block (one matrix product); in 40 they are scattered
    assert plan.block == (distinct_cols == 3)
    # brute force: every entry's sum over tokens, one at a time
    rows, cols = flat // 48, flat % 48
    expected = torch.stack([(dy[..., r] * x[..., c]).sum() for r, c in zip(rows, cols, strict=True)])
    got = selected_entry_gradient(dy, plan.saved_input(x), plan)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_a_hooked_linear_gets_the_dense_gradient_at_its_entries_and_the_same_input_gradient(bias):
    gen = torch.Generator().manual_seed(1)
    layer = torch.nn.Linear(48, 24, bias=bias)
    flat = _flat_indices(gen, 24, 48, 40)
    x = torch.randn(3, 7, 48, generator=gen)
    target = torch.randn(3, 7, 24, generator=gen)

    dense_x = x.clone().requires_grad_(True)
    grad_w, grad_x = torch.autograd.grad(((layer(dense_x) - target) ** 2).sum(), [layer.weight, dense_x])

    sparse = SparseParameters({"weight": layer.weight}, {"weight": flat})
    sparse.attach(layer)
    assert not layer.weight.requires_grad
    hooked_x = x.clone().requires_grad_(True)
    ((layer(hooked_x) - target) ** 2).sum().backward()
    torch.testing.assert_close(sparse.values["weight"].grad, grad_w.reshape(-1)[flat], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hooked_x.grad, grad_x, rtol=1e-5, atol=1e-6)
    sparse.detach()
    assert layer.weight.requires_grad and not layer._forward_hooks and not layer._forward_pre_hooks


def _saved_bytes(fn):
    """Bytes of distinct storages autograd keeps for backward while `fn` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def test_a_trained_gain_is_recomputed_in_backward_with_the_same_gradients_and_keeps_less():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(64)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=gen) + 0.5)
    x = torch.randn(4, 16, 64, generator=gen)
    target = torch.randn(4, 16, 64, generator=gen)
    every = torch.arange(64)

    def run(wanted):
        inp = x.clone().requires_grad_(True)
        out, saved = _saved_bytes(lambda: ((norm(inp * 2.0) - target) ** 2).sum())
        return torch.autograd.grad(out, [inp, wanted]), saved

    (dense_x, dense_w), dense_saved = run(norm.weight)
    assert is_gain_module(norm) and not is_gain_module(torch.nn.Linear(4, 4))
    sparse = SparseParameters({"weight": norm.weight}, {"weight": every})
    sparse.attach(norm)
    assert [s.kind for s in sparse.sites] == ["gain"]
    (re_x, re_w), re_saved = run(sparse.values["weight"])
    sparse.detach()
    assert torch.equal(re_x, dense_x) and torch.equal(re_w, dense_w)
    # the dense path keeps the normalised activation (4 x 16 x 64 floats) for the gain's gradient
    assert re_saved <= dense_saved - x.numel() * 4


def _tiny_llama(tiny):
    return AutoModelForCausalLM.from_pretrained(tiny("llama"))


def _masked(model, names, k=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    indices = {n: torch.sort(torch.randperm(params[n].numel(), generator=gen)[:k]).values for n in names}
    return {n: params[n] for n in names}, indices


NAMES = [
    "model.layers.0.self_attn.q_proj.weight",  # a linear weight: selected entries only
    "model.layers.1.input_layernorm.weight",  # a norm gain: recomputed in backward
    "model.norm.weight",
    "model.embed_tokens.weight",  # tied to lm_head: injected into both
]


def _gradients(model, params, indices, batch, *, replace=None, compiled=False):
    sparse = SparseParameters(params, indices)
    sparse.attach(model)
    if replace is not None:
        replace(model)
    runner = torch.compile(model, backend="aot_eager") if compiled else model
    runner(**batch).loss.backward()
    grads = {n: v.grad.clone() for n, v in sparse.values.items()}
    sparse.detach()
    return grads


def test_values_get_their_gradient_whatever_replaces_the_forwards(tiny):
    """What transformers' hub kernels do on every train()/eval() (a forward set on the instance),
    and torch.compile: the hooks run either way, and the gradients are the dense autograd ones."""
    model = _tiny_llama(tiny)
    params, indices = _masked(model, NAMES)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}

    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params.values()))
    model(**batch).loss.backward()
    dense = {n: p.grad.reshape(-1)[indices[n]].float() for n, p in params.items()}
    model.zero_grad(set_to_none=True)

    def kernelize_like(m):  # the class's forward, set again on every RMSNorm instance
        for module in m.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.forward = types.MethodType(type(module).forward, module)

    for how in (None, kernelize_like):
        got = _gradients(model, params, indices, batch, replace=how)
        for n in NAMES:
            torch.testing.assert_close(got[n], dense[n], rtol=1e-4, atol=1e-6)
    compiled = _gradients(model, params, indices, batch, compiled=True)
    for n in NAMES:
        torch.testing.assert_close(compiled[n], dense[n], rtol=1e-4, atol=1e-6)


def test_a_value_off_the_autograd_path_is_one_line_naming_the_cause(tiny):
    model = _tiny_llama(tiny)
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(0))
    name = "model.layers.1.mlp.down_proj.weight"
    params, indices = _masked(model, [name, "model.layers.0.self_attn.q_proj.weight"])
    sparse = SparseParameters(params, indices)
    sparse.attach(model)
    sparse.probe(lambda: model(input_ids=ids, labels=ids).loss)  # on the path: passes
    assert all(v.grad is None for v in sparse.values.values())  # and leaves no gradient behind

    mlp = model.model.layers[1].mlp
    mlp.forward = types.MethodType(lambda self, x: x * 0.5, mlp)  # a fused kernel, say
    with pytest.raises(
        PieceError, match=r"'model.layers.1.mlp.down_proj' is never called.*'model.layers.1.mlp'"
    ):
        sparse.probe(lambda: model(input_ids=ids, labels=ids).loss)
    del mlp.forward

    mlp.down_proj._forward_hooks.clear()  # a library that takes hooks off
    with pytest.raises(PieceError, match="taken off module 'model.layers.1.mlp.down_proj'"):
        sparse.check_attached()
    sparse.detach()


def test_a_module_the_data_does_not_use_is_named_as_such():
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(4, 4), "spare": torch.nn.Linear(4, 4)})
    params = {"used.weight": model["used"].weight, "spare.weight": model["spare"].weight}
    sparse = SparseParameters(params, {n: torch.tensor([0, 5]) for n in params})
    sparse.attach(model)
    with pytest.raises(PieceError, match="module 'spare' is not used on this data"):
        sparse.probe(lambda: model["used"](torch.ones(2, 4)).sum())
    sparse.detach()


def test_the_weights_follow_the_values_whoever_steps_them(tiny):
    """A root pre-hook writes values whose version changed, so a plain optimizer loop trains."""
    model = _tiny_llama(tiny)
    name = "model.layers.0.mlp.up_proj.weight"
    params, indices = _masked(model, [name])
    sparse = SparseParameters(params, indices)
    sparse.attach(model)
    with torch.no_grad():
        sparse.values[name].add_(1.0)
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids)
    assert torch.equal(params[name].detach().reshape(-1)[indices[name]], sparse.values[name].detach())
    sparse.detach()


def _train(model, params, indices, batch, steps, compiled):
    sparse = SparseParameters(params, indices)
    sparse.attach(model)
    runner = torch.compile(model, backend="aot_eager") if compiled else model
    optimizer = torch.optim.AdamW(sparse.values.values(), lr=1e-2)
    for _ in range(steps):
        runner(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    values = {n: v.detach().clone() for n, v in sparse.values.items()}
    sparse.detach()
    return values


def test_compiled_training_recompiles_nothing_of_ours_and_trains_as_eager(tiny):
    """Under torch.compile: the write of the values into the weights before each forward runs
    uncompiled (traced, its loop over the masked tensors, each its own shape, compiled again per
    tensor up to dynamo's recompile limit); and a frame compiled for a layer without hooks is not
    reused for one with ours (layer 0's MLP masked, layer 1's not: its gradients stopped after the
    first step). 3 compiled steps train the values as 3 eager steps do."""
    import logging

    model = _tiny_llama(tiny)
    names = [n for n, p in model.named_parameters() if "layers.0." in n or p.dim() == 1 or "embed" in n]
    params, indices = _masked(model, names)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    eager = _train(model, params, indices, batch, 3, compiled=False)
    model = _tiny_llama(tiny)  # the base again
    params = {n: p for n, p in model.named_parameters() if n in indices}
    base = {n: p.detach().reshape(-1)[indices[n]].float().clone() for n, p in params.items()}

    setting = torch._dynamo.config.skip_nnmodule_hook_guards  # another test may hold a model still
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    dynamo = logging.getLogger("torch._dynamo")
    torch._dynamo.reset()
    torch._logging.set_logs(recompiles=True)
    dynamo.addHandler(handler)
    try:
        compiled = _train(model, params, indices, batch, 3, compiled=True)
    finally:
        dynamo.removeHandler(handler)
        torch._logging.set_logs()
        torch._dynamo.reset()
    assert torch._dynamo.config.skip_nnmodule_hook_guards == setting  # as it was, once detached
    ours = [m.splitlines()[0] for m in messages if "piece_surgery" in m.splitlines()[0]]
    assert not ours, ours
    assert not [m for m in messages if "recompile_limit" in m]
    moved = torch.cat([(compiled[n] - base[n]).abs() for n in names])
    assert (moved > 1e-3).float().mean() > 0.5  # Adam: about lr a step, where a gradient reaches
    for n in names:
        torch.testing.assert_close(compiled[n], eager[n], rtol=0, atol=1e-4)


def test_compile_hook_guards_are_held_while_a_model_carries_our_hooks(tiny):
    """The process-wide setting comes back when the last model is detached, or collected without."""
    import gc

    config = torch._dynamo.config
    setting = config.skip_nnmodule_hook_guards
    models = [_tiny_llama(tiny) for _ in range(2)]
    attached = []
    for model in models:
        params, indices = _masked(model, NAMES[:2])
        sparse = SparseParameters(params, indices)
        sparse.attach(model)
        attached.append(sparse)
    assert config.skip_nnmodule_hook_guards is False
    attached[0].detach()
    attached[0].detach()  # twice: released once
    assert config.skip_nnmodule_hook_guards is False  # the second model still carries hooks
    del models, attached, model, sparse, params
    gc.collect()
    assert config.skip_nnmodule_hook_guards == setting
