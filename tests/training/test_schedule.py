"""Learning-rate schedule and data order of the trainer, against torch's own schedulers and brute force."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from piece_surgery.training.config import TrainConfig
from piece_surgery.training.schedule import lr_factor, step_examples, steps_per_epoch


def torch_schedule(schedule: str, warmup: int, total: int) -> list[float]:
    """The same schedule built from torch.optim.lr_scheduler, read step by step."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    span = total - warmup
    if schedule == "constant":
        main = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif schedule == "linear":
        main = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0 - min(e / span, 1.0))
    else:
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=span, eta_min=0.0)
    if warmup:
        ramp = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup - 1
        )
        scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
    else:
        scheduler = main
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 1, 4])
def test_lr_factor_matches_torch_schedulers(schedule, warmup):
    total = 17
    config = TrainConfig(schedule=schedule, warmup_steps=warmup)
    ours = [lr_factor(step, total, config) for step in range(total)]
    expected = torch_schedule(schedule, warmup, total)
    assert ours == pytest.approx(expected, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    batch=st.integers(1, 6),
    accum=st.integers(1, 3),
    seed=st.integers(0, 5),
    epochs=st.integers(1, 3),
)
def test_each_epoch_sees_every_example_once(n, batch, accum, seed, epochs):
    config = TrainConfig(batch_size=batch, grad_accum=accum, seed=seed, epochs=epochs)
    per_epoch = steps_per_epoch(n, config)
    assert per_epoch == math.ceil(n / (batch * accum))
    for epoch in range(epochs):
        steps = [step_examples(epoch * per_epoch + s, n, config) for s in range(per_epoch)]
        assert sorted(i for chosen in steps for i in chosen) == list(range(n))
        assert all(len(chosen) == batch * accum for chosen in steps[:-1])
        # brute force: the epoch's order is torch's permutation seeded with seed + epoch
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        assert [i for chosen in steps for i in chosen] == order


def test_data_order_depends_on_the_seed_and_the_epoch():
    a = [step_examples(s, 30, TrainConfig(batch_size=5, seed=0)) for s in range(12)]
    b = [step_examples(s, 30, TrainConfig(batch_size=5, seed=1)) for s in range(12)]
    assert a != b
    assert a[:6] != a[6:]  # the second epoch is another permutation
