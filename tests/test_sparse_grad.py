import types

import pytest
import torch

from piece_surgery.sparse_grad import (
    EntryPlan,
    SelectedEntryLinear,
    is_gain_module,
    recompute_in_backward,
    restore,
    route_linear,
)


@pytest.mark.parametrize("distinct_cols", [3, 40])  # few columns: gathered copy, block; many: x, per entry
@pytest.mark.parametrize("bias", [True, False])
def test_selected_entry_gradient_equals_dense_gradient(distinct_cols, bias):
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(48, 24, bias=bias)
    cols = torch.randperm(48, generator=gen)[:distinct_cols]
    flat = torch.unique(
        torch.randint(0, 24, (60,), generator=gen) * 48
        + cols[torch.randint(0, distinct_cols, (60,), generator=gen)]
    )
    x = torch.randn(3, 7, 48, generator=gen, requires_grad=True)
    target = torch.randn(3, 7, 24, generator=gen)

    # brute force: the dense weight gradient, then its entries
    dense_x = x.detach().clone().requires_grad_(True)
    loss = ((layer(dense_x) - target) ** 2).sum()
    grad_w, grad_x_dense = torch.autograd.grad(loss, [layer.weight, dense_x])
    expected = grad_w.reshape(-1)[flat]

    values = layer.weight.detach().reshape(-1)[flat].clone().requires_grad_(True)
    plan = EntryPlan.for_indices(flat, 48)
    assert plan.gather == (distinct_cols * 2 <= 48)
    # entries in 3 columns form a small block (one matrix product); in 40 they are scattered
    assert plan.block == (distinct_cols == 3)
    with torch.no_grad():
        layer.weight.requires_grad_(False)
    out = SelectedEntryLinear.apply(x, layer.weight, layer.bias, values, plan)
    ((out - target) ** 2).sum().backward()
    torch.testing.assert_close(values.grad, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, grad_x_dense, rtol=1e-5, atol=1e-6)


def test_route_and_restore_linear():
    layer = torch.nn.Linear(8, 4)
    values = torch.zeros(2, requires_grad=True)
    route_linear(layer, values, torch.tensor([1, 9]))
    layer.weight.requires_grad_(False)
    layer(torch.randn(2, 8)).sum().backward()
    assert values.grad is not None and values.grad.shape == (2,)
    restore(layer)
    assert "forward" not in layer.__dict__

    wrapped = torch.nn.Linear(8, 4)
    own = types.MethodType(lambda self, x: torch.zeros(2, 4), wrapped)  # e.g. a hook library's
    wrapped.forward = own
    route_linear(wrapped, values, torch.tensor([1, 9]))
    assert wrapped.forward != own
    restore(wrapped)
    assert wrapped.forward == own


def _saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for backward while `fn` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def test_recomputed_norm_gives_the_same_gradients_and_keeps_less():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(64)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=gen) + 0.5)
    x = torch.randn(4, 16, 64, generator=gen)
    target = torch.randn(4, 16, 64, generator=gen)

    def run():
        inp = x.clone().requires_grad_(True)
        out, saved = _saved_bytes(lambda: ((norm(inp * 2.0) - target) ** 2).sum())
        grads = torch.autograd.grad(out, [inp, norm.weight])
        return grads, saved

    (dense_x, dense_w), dense_saved = run()
    assert is_gain_module(norm) and not is_gain_module(torch.nn.Linear(4, 4))
    recompute_in_backward(norm)
    (re_x, re_w), re_saved = run()
    restore(norm)
    assert torch.equal(re_x, dense_x) and torch.equal(re_w, dense_w)
    # the dense path keeps the normalised activation (4 x 16 x 64 floats) for the gain's gradient
    assert re_saved <= dense_saved - x.numel() * 4
