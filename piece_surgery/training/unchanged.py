"""Why trained entries ended as they were: the warning a sparse run gives when the updates of most of
its mask's entries were lost, rounded away in the weights' dtype (bf16 keeps 8 bits of an entry) or
already in float32 (a learning rate too small to move an fp32 value at all)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from piece_surgery.runtime.dtypes import dtype_name
from piece_surgery.runtime.errors import PieceError
from piece_surgery.training.sparse_grad import SparseParameters

# Warn when more than half of the entries that had a gradient ended unchanged: the delta then holds
# fewer than half of the entries the mask selected and the run trained. The share compares the run
# with its own mask, not with a loss, a size or a learning rate, so it means the same for any model,
# data, density and dtype; a run whose learning rate suits its weights changes nearly every entry
# that has a gradient (the tiny test models at the default rates, bf16 or fp32: none lost), and one
# whose learning rate is far too small loses nearly all (bf16 at lr 1e-9: 928 of 929), so the line
# between them is wide and half sits in its middle.
LOST_SHARE = 0.5
FLOAT32_EPS = torch.finfo(torch.float32).eps


@dataclass
class Lost:
    """What became of the masked entries' updates (counts over every masked tensor)."""

    with_gradient: int  # entries whose gradient was non-zero at some step (AdamW's 2nd moment > 0)
    changed: int  # entries whose value in the weights' dtype differs from the base's
    lost: int  # entries with a gradient that ended unchanged in the weights' dtype
    unmoved: int  # of the lost, those whose fp32 value did not move either (lost in float32)
    # the lost entry whose update came nearest to showing: (its fp32 update, that over its magnitude,
    # the weights' dtype); the update is AdamW's next step at the peak lr where the fp32 value did
    # not move (most of the lost entries), else how far the fp32 value moved
    nearest: tuple[float, float, torch.dtype | None] = (0.0, 0.0, None)


def lost_updates(sparse: SparseParameters, optimizer: torch.optim.Optimizer, lr: float) -> Lost:
    """Count the masked entries whose updates were lost, from the values (fp32), their base values
    and AdamW's state (`lr`: the run's peak learning rate, before each group's lr_scale)."""
    counts = [0, 0, 0, 0]
    per_tensor = []
    for name, value in sparse.values.items():
        v, base, dtype = value.detach(), sparse.base_values[name], sparse.params[name].dtype
        state = optimizer.state.get(value, {})
        had_gradient = state["exp_avg_sq"] > 0 if "exp_avg_sq" in state else torch.zeros_like(v, dtype=bool)
        changed = v.to(dtype) != base.to(dtype)
        lost = had_gradient & ~changed
        unmoved = lost & (v == base)
        for i, t in enumerate((had_gradient, changed, lost, unmoved)):
            counts[i] += int(t.sum())
        per_tensor.append((value, base, dtype, lost, unmoved, state))
    float32_lost = counts[3] * 2 >= counts[2] and counts[2] > 0
    nearest = (0.0, -1.0, None)
    for value, base, dtype, lost, unmoved, state in per_tensor:
        where = unmoved if float32_lost else lost & ~unmoved
        if not bool(where.any()):
            continue
        update = _adamw_step(value, state, optimizer, lr) if float32_lost else (value.detach() - base).abs()
        relative = update / base.abs().clamp_min(1e-30)
        i = int(torch.where(where, relative, -1.0).argmax())
        if float(relative[i]) > nearest[1]:
            nearest = (float(update[i]), float(relative[i]), dtype)
    return Lost(*counts, nearest=(nearest[0], max(nearest[1], 0.0), nearest[2]))


def _adamw_step(value: torch.Tensor, state: dict, optimizer: torch.optim.Optimizer, lr: float):
    """|AdamW's update| of each entry at `lr` times the value's group lr_scale, from its moments."""
    group = next(g for g in optimizer.param_groups if any(p is value for p in g["params"]))
    if "exp_avg" not in state:
        return torch.zeros_like(value.detach())
    (beta1, beta2), step = group["betas"], float(state["step"])
    m = state["exp_avg"] / (1 - beta1**step)
    v = state["exp_avg_sq"] / (1 - beta2**step)
    peak = lr * group.get("lr_scale", 1.0)
    return (peak * m / (v.sqrt() + group["eps"]) + peak * group["weight_decay"] * value.detach()).abs()


def why_unchanged(
    sparse: SparseParameters, optimizer: torch.optim.Optimizer, lr: float, records: list[dict]
) -> tuple[str | None, int | None]:
    """(the warning, the number of entries with a gradient that ended unchanged) after a run whose
    steps are `records`: no warning when no step ran, or when at most LOST_SHARE of the entries that
    had a gradient ended unchanged in the weights' dtype. Raises PieceError when the values never
    received a gradient. The warning is one line that names the cause with its numbers."""
    if not records:
        return None, None
    lost = lost_updates(sparse, optimizer, lr)
    if lost.changed and lost.lost <= LOST_SHARE * lost.with_gradient:
        return None, lost.lost
    if not lost.changed and all(r.get("grad_norm", 1.0) == 0.0 for r in records):
        raise PieceError(
            f"the trained values received no gradient in {len(records)} steps, so nothing was learned; "
            "check that the data has loss-bearing tokens the masked entries influence"
        )
    update, relative, dtype = lost.nearest
    name = dtype_name(dtype) if dtype is not None else "the weights' dtype"
    if lost.changed:
        share = lost.lost / max(lost.with_gradient, 1)
        head = (
            f"{lost.lost:,} of the {lost.with_gradient:,} mask entries with a non-zero gradient "
            f"({share:.1%}) ended unchanged in {name}; the delta changes {lost.changed:,}"
        )
    else:
        head = f"no entry changed in {name}"
    if lost.unmoved * 2 >= lost.lost:
        rounding = f", before any rounding to {name}" if dtype not in (None, torch.float32) else ""
        return (
            f"{head}: the updates underflowed already in float32{rounding}: "
            f"at --lr {lr:g} AdamW's largest step there is {update:.3g} ({relative:.3g} of its entry), "
            f"below float32 resolution (about {FLOAT32_EPS:.3g} relative); --lr is too small: raise it"
        ), lost.lost
    eps = torch.finfo(dtype).eps if dtype is not None else float("nan")
    return (
        f"{head}: their float32 updates (the largest {update:.3g}, {relative:.3g} of its entry) are below "
        f"{name} resolution (about {eps:.3g} relative); raise --lr or train longer"
    ), lost.lost
