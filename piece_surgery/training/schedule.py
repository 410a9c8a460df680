"""What each optimizer step of a sparse run is: how many there are, the examples each one takes (a
seeded permutation per epoch, the same for any number of ranks) and its learning-rate factor."""

from __future__ import annotations

import math

import torch

from piece_surgery.training.config import TrainConfig


def steps_per_epoch(n_examples: int, config: TrainConfig, ranks: int = 1) -> int:
    return math.ceil(n_examples / (config.batch_size * config.grad_accum * ranks))


def total_steps(n_examples: int, config: TrainConfig, ranks: int = 1) -> int:
    return config.max_steps or config.epochs * steps_per_epoch(n_examples, config, ranks)


def budget_period(total: int) -> int:
    """How often a measured --drift-budget measures when --eval-every is not given: every tenth of
    the run, rounded up (and at the last step, as always); each measurement is two forward passes
    over the general text."""
    return max(1, math.ceil(total / 10))


def lr_factor(step: int, total: int, config: TrainConfig) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    span = max(total - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    if config.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def step_examples(step: int, n_examples: int, config: TrainConfig, ranks: int = 1) -> list[int]:
    """Which examples optimizer step `step` uses (all ranks together): a seeded permutation per
    epoch, so a resumed run sees exactly the data an uninterrupted one would, and N ranks see what
    one process with N times the gradient accumulation would."""
    per_epoch = steps_per_epoch(n_examples, config, ranks)
    epoch, within = divmod(step, per_epoch)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(config.seed + epoch)).tolist()
    size = config.batch_size * config.grad_accum * ranks
    return order[within * size : (within + 1) * size]
