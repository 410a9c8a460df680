"""One optimizer step's gradient over its micro-batches: each micro-batch's summed token loss (the
model's own forward, under DDP synchronised over the values alone), weighted so that any split of a
global batch over micro-batches and ranks trains the same values."""

from __future__ import annotations

import math

import torch

from piece_surgery.data.batches import collate
from piece_surgery.data.examples import Dataset
from piece_surgery.evaluation.forward import batch_logits
from piece_surgery.evaluation.loss import token_loss_sum
from piece_surgery.runtime.distributed import World
from piece_surgery.runtime.sharding import is_sharded
from piece_surgery.training.config import TrainConfig
from piece_surgery.training.schedule import step_examples
from piece_surgery.training.sparse_grad import SparseParameters


class _ValuesModule(torch.nn.Module):
    """The trained values as the one module DistributedDataParallel synchronises (its gradients,
    4 bytes x k per step); the model runs inside its forward but is not its submodule, so its
    frozen weights are neither broadcast nor reduced."""

    def __init__(self, sparse: SparseParameters, model: torch.nn.Module):
        super().__init__()
        self.values = torch.nn.ParameterList([sparse.values[n] for n in sorted(sparse.values)])
        object.__setattr__(self, "model", model)

    def forward(self, batch: dict | None = None) -> torch.Tensor:
        if batch is None:  # the synchronising pass: zero, with every value in its graph
            return sum(v.sum() for v in self.values) * 0.0
        return batch_logits(self.model, batch)


class MicroBatchLoss:
    """A micro-batch's loss: the model's own forward in one process, under DDP through it."""

    def __init__(
        self,
        model: torch.nn.Module,
        sparse: SparseParameters,
        world: World | None,
        autocast: torch.dtype | None = None,
    ):
        self.model = model
        self.world = world
        self.values = [sparse.values[n] for n in sorted(sparse.values)]
        self.device = next(model.parameters()).device
        self.autocast = autocast or (torch.bfloat16 if use_bf16_autocast(model) else None)
        # FSDP gathers weights in every forward and backward: a collective every rank must join
        self.collective_forward = any(is_sharded(p) for p in model.parameters())
        self.ddp = None
        if world is not None:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [world.device.index] if world.device.type == "cuda" else None
            # the values module has no buffers: nothing to broadcast but the values at the start
            self.ddp = DistributedDataParallel(_ValuesModule(sparse, model), device_ids=device_ids)

    def loss_sum(self, batch: dict, *, fallback: bool = True) -> torch.Tensor:
        """The micro-batch's summed token loss (nats), with its graph; with `fallback`, a loss that
        reaches no trained value gets a zero path to every value (so backward runs on each rank)."""
        # the model's own forward even under DDP: a backward without a DDP forward only adds to
        # the local gradients (DDP's hooks expect none), and DDP's own collectives (its bucket
        # rebuild) then run in synchronise() alone, once per step on every rank
        with torch.autocast(
            self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None
        ):
            logits = batch_logits(self.model, batch)
        loss, _ = token_loss_sum(logits, batch["labels"])
        if fallback and not loss.requires_grad:  # no trained entry on its path (text, a projector)
            loss = loss + sum(v.sum() for v in self.values) * 0.0  # a zero gradient, a graph to run
        return loss  # the logits die here: backward needs only the log-probabilities

    def synchronise(self) -> None:
        """A backward of zero through DDP: it all-reduces the values' accumulated gradients."""
        self.ddp().backward()

    def close(self) -> None:
        # DDP's reducer must go while the process group lives: destroyed after it (at exit), its
        # threads end the process with std::terminate
        self.ddp = None


def step_gradients(
    forward: MicroBatchLoss, dataset: Dataset, step: int, config: TrainConfig, pad_id: int
) -> float:
    """Accumulate one optimizer step's gradient over its micro-batches; returns the step's mean token
    loss, or the first non-finite loss (whose backward is skipped).

    The step's loss is the mean over every loss-bearing token of the step: each micro-batch adds its
    summed token loss divided by the step's token count (summed over micro-batches and ranks, known
    to every rank from the data), so any split of the same global batch (--batch-size x
    --grad-accum x ranks) trains the same values, up to float rounding. (Scoring keeps PIECE's
    per-micro-batch mean: there the micro-batch defines g_b.)

    Under DDP each rank takes every size-th micro-batch and accumulates locally; once every rank
    is known to be fine, one synchronised backward of a zero loss adds up the accumulated values'
    gradients over the ranks (4 bytes x k). A rank that failed makes every rank return its loss,
    so none waits in vain for the others."""
    world = forward.world
    ranks = world.size if world is not None else 1
    chosen = step_examples(step, len(dataset.examples), config, ranks)
    step_tokens = sum(dataset.examples[i].loss_tokens for i in chosen)
    groups = [chosen[i : i + config.batch_size] for i in range(0, len(chosen), config.batch_size)]
    weight = ranks / step_tokens  # DDP averages the ranks' gradients: x ranks makes it their sum
    mine = groups[world.rank :: ranks] if world is not None else groups
    if forward.collective_forward:  # every rank runs as many passes; a rank short of data adds nothing
        rounds = math.ceil(len(groups) / ranks)
        mine = [*((g, 1.0) for g in mine), *(([chosen[0]], 0.0) for _ in range(rounds - len(mine)))]
    else:
        mine = [(g, 1.0) for g in mine]
    total, bad = 0.0, None
    for group, share in mine:
        examples = [dataset.examples[i] for i in group]
        batch = {k: v.to(forward.device) for k, v in collate(examples, pad_id).items()}
        loss = forward.loss_sum(batch)
        value = float(loss.detach()) * share
        if not math.isfinite(value):
            bad = value
            break
        total += value
        (loss * (weight * share)).backward()
        del loss  # before the next forward
    if world is None:
        return bad if bad is not None else total / step_tokens
    bad = next((v for v in world.gather(bad) if v is not None), None)
    if bad is not None:
        world.barrier()  # leave together: a rank that quits first cuts the others' last transfers
        return bad
    forward.synchronise()
    return world.sum(total) / step_tokens


def probe_batch(dataset: Dataset, pad_id: int, device: torch.device) -> dict:
    """A micro-batch for the probe: the first example, and the first image record if the first is
    text (a projector trains on image records alone)."""
    examples = [dataset.examples[0]]
    if examples[0].model_inputs is None:
        examples += [e for e in dataset.examples if e.model_inputs is not None][:1]
    return {k: v.to(device) for k, v in collate(examples, pad_id).items()}


def use_bf16_autocast(model: torch.nn.Module) -> bool:
    """fp32 weights on a CUDA GPU with bf16: run the forward under bf16 autocast."""
    p = next(model.parameters())
    return p.device.type == "cuda" and torch.cuda.is_bf16_supported() and p.dtype == torch.float32
