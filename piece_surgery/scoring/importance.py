"""PIECE importance: the gradient pass that accumulates sum_b g_b and sum_b g_b^2 per eligible entry,
and the arithmetic of the estimators (which method uses which: the table in methods.py).

For every micro-batch b, g_b is the gradient of that micro-batch's mean token loss (PIECE's
definition: the micro-batch size, --batch-size, defines g_b).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from piece_surgery.data.examples import Dataset
from piece_surgery.evaluation.loss import micro_batch_losses
from piece_surgery.models.fused import ParameterSlice, holder
from piece_surgery.models.parts import image_side
from piece_surgery.runtime.distributed import World
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.sharding import is_sharded, local_part
from piece_surgery.scoring.options import check_labels, check_normalization


@dataclass
class PassStats:
    """What the data pass saw: micro-batches, examples, loss-bearing tokens and the mean loss."""

    batches: int = 0
    examples: int = 0
    tokens: int = 0
    loss_sum: float = 0.0
    inverse_tokens: float = 0.0  # sum over micro-batches of 1 / their loss-bearing tokens

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.batches, 1)

    def add(self, loss: float, tokens: int, examples: int) -> None:
        """One micro-batch: its mean token loss, loss-bearing tokens and examples."""
        self.batches += 1
        self.examples += examples
        self.tokens += tokens
        self.inverse_tokens += 1.0 / max(tokens, 1)
        self.loss_sum += loss


def accumulate_gradients(
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    dataset: Dataset,
    *,
    batch_size: int,
    pad_id: int,
    keep_sum: bool,
    keep_squares: bool,
    accumulator_device: torch.device | None = None,
    progress: Callable[[int], None] | None = None,
    labels: str = "empirical",
    seed: int = 0,
    squares_into: dict[str, torch.Tensor] | None = None,
    world: World | None = None,
    reduce: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], PassStats]:
    """One pass over `dataset` in micro-batches of `batch_size` examples; returns (sums, squares,
    stats): per eligible tensor (keys of `params`), sum_b g_b and sum_b g_b^2, fp32 tensors of the
    parameter's shape (of this rank's shard under FSDP) on `accumulator_device` (default: the
    model's device), and what the pass saw. A kind not kept (`keep_sum`, `keep_squares`) is {}.

    g_b is the gradient of micro-batch b's mean token loss (loss-bearing tokens only, padding
    excluded; `pad_id` pads). Each weight's gradient is folded into the accumulators by a hook the
    moment backward produces it, then dropped: the peak is weights + activations + accumulators
    (4 bytes per eligible entry and kind kept), never a dense gradient copy. Only `params` get
    gradients; the model runs in eval mode (no dropout) and its flags are restored after.
    `labels="sampled"` takes the loss on labels drawn (seeded by `seed`) from the model's own
    distribution. `squares_into` accumulates sum g_b^2 into existing buffers (several retain sets,
    one buffer). With a `world`, each rank passes over its share of the micro-batches, and the sums
    are added up over the ranks at the end (unless `reduce=False`: the caller reduces once, later).
    With weights sharded by FSDP (--fsdp), every rank passes over every micro-batch instead and
    keeps the sums of its own shard: rank 0's loss alone is back-propagated, so FSDP's summing
    reduce-scatter hands each rank exactly its shard of g_b.

    Raises PieceError for a non-finite loss or accumulator (bad data, or an overflow in a
    16-bit dtype: try float32).
    """
    device = next(model.parameters()).device
    sharded = any(is_sharded(p) for p in params.values())
    acc = _Accumulators.for_params(params, accumulator_device or device, keep_sum, keep_squares, sharded)
    if squares_into is not None:
        acc.squares = squares_into
    stats = PassStats()
    check_labels(labels)
    generator = torch.Generator(device=device).manual_seed(seed) if labels == "sampled" else None
    shard = (world.rank, world.size) if world is not None and not sharded else None
    backward_scale = 0.0 if sharded and world.rank != 0 else 1.0
    error = None
    with _gradients_only_for(model, params), _deterministic_mode(model):
        handles = [] if sharded else acc.hook(params)
        try:
            for loss, tokens, examples in micro_batch_losses(
                model, dataset, batch_size, pad_id, sample_labels=generator, shard=shard
            ):
                value = _checked_loss(loss, stats, dataset, params)
                (loss * backward_scale if sharded else loss).backward()
                if sharded:  # FSDP has reduce-scattered each gradient: this rank's shard is here
                    acc.take_shards(params)
                stats.add(value, tokens, examples)
                if progress:
                    progress(examples)
        except PieceError as exc:
            if world is None:
                raise
            error = exc  # raised on every rank, below, so that none waits for the others in vain
        finally:
            for h in handles:
                h.remove()
    if world is not None:
        world.agree(error)
        if reduce and not sharded:
            reduce_pass(world, [*acc.sums.values(), *acc.squares.values()], stats)
    for key, value in {**acc.sums, **acc.squares}.items():
        if not torch.isfinite(value).all():
            raise PieceError(f"gradients of '{key}' overflowed to inf/nan; try --dtype float32")
    return acc.sums, acc.squares, stats


@dataclass
class _Accumulators:
    """The fp32 sums (sum_b g_b, sum_b g_b^2) of one pass, per eligible tensor; gradients are folded
    in as backward produces them."""

    sums: dict[str, torch.Tensor]
    squares: dict[str, torch.Tensor]
    device: torch.device

    @classmethod
    def for_params(cls, params, device, keep_sum: bool, keep_squares: bool, sharded: bool) -> _Accumulators:
        def zeros(p: torch.Tensor) -> torch.Tensor:
            return torch.zeros(p.to_local().shape if sharded else p.shape, dtype=torch.float32, device=device)

        sums = {key: zeros(p) for key, p in params.items()} if keep_sum else {}
        squares = {key: zeros(p) for key, p in params.items()} if keep_squares else {}
        return cls(sums, squares, device)

    def add(self, key: str, grad: torch.Tensor) -> None:
        g = grad.to(device=self.device, dtype=torch.float32, non_blocking=True)
        if key in self.sums:
            self.sums[key].add_(g)
        if key in self.squares:
            self.squares[key].addcmul_(g, g)

    def hook(self, params: dict[str, torch.Tensor]) -> list:
        """Post-accumulate-grad hooks on the parameters of `params`: each gradient joins the sums of
        every eligible tensor it holds (a whole parameter, or the experts stored apart that are parts
        of it: ParameterSlice), then is dropped. Returns the hooks' handles."""
        by_param: dict[int, tuple[torch.nn.Parameter, list]] = {}
        for key, p in params.items():
            param, _ = holder(p)
            part = p.stored if isinstance(p, ParameterSlice) else None
            by_param.setdefault(id(param), (param, []))[1].append((key, part))

        def fold(parts: list) -> Callable[[torch.Tensor], None]:
            def hook(param: torch.Tensor) -> None:
                for key, part in parts:
                    self.add(key, param.grad if part is None else part.of(param.grad))
                param.grad = None

            return hook

        return [param.register_post_accumulate_grad_hook(fold(parts)) for param, parts in by_param.values()]

    def take_shards(self, params: dict[str, torch.nn.Parameter]) -> None:
        for key, p in params.items():
            if p.grad is not None:  # None: no path from this loss (a projector, text data)
                self.add(key, p.grad.to_local())
            p.grad = None


def _checked_loss(loss: torch.Tensor, stats: PassStats, dataset: Dataset, params: dict) -> float:
    """The micro-batch's loss as a number; PieceError if it is not finite or reaches no eligible
    tensor (naming the image side of a vision-language model when that is all that is eligible)."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise PieceError(
            f"the loss is {value} on micro-batch {stats.batches + 1}: bad data or a broken model "
            "(try --dtype float32)"
        )
    if not loss.requires_grad:  # every eligible tensor is off this data's path
        side = image_side(params)
        if side is not None:
            raise PieceError(
                f"no eligible tensor gets a gradient from '{dataset.name}': they are all in {side}, "
                "which only image records reach, and these records reach none of it; include "
                "language-model tensors (--include) or give image records"
            )
        raise PieceError(
            f"no eligible tensor gets a gradient from '{dataset.name}' (the data never reaches "
            "them): choose other --include patterns"
        )
    return value


def reduce_pass(world: World, accumulators: list[torch.Tensor], stats: PassStats) -> None:
    """Add up the ranks' accumulators (in place) and what their passes saw."""
    for acc in accumulators:
        world.all_reduce(acc)
    for name in ("batches", "examples", "tokens"):
        setattr(stats, name, int(world.sum(getattr(stats, name))))
    stats.loss_sum = world.sum(stats.loss_sum)
    stats.inverse_tokens = world.sum(stats.inverse_tokens)


@contextmanager
def _gradients_only_for(model: torch.nn.Module, params: dict[str, torch.nn.Parameter]) -> Iterator[None]:
    """Only `params` get gradients (frozen weights cost no compute or memory); flags restored after."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    eligible = {id(holder(p)[0]) for p in params.values()}
    for p, _ in saved:
        p.requires_grad_(id(p) in eligible)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
            p.grad = None


@contextmanager
def _deterministic_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout: a score is a function of weights and data), except that layers flagged
    for activation checkpointing stay in training mode: transformers checkpoints only then."""
    was_training = model.training
    model.eval()
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            module.training = True  # the layer alone, not its dropout or attention children
    try:
        yield
    finally:
        model.train(was_training)


def piece_s_scores(
    sums: dict[str, torch.Tensor], squares: dict[str, torch.Tensor], *, damping: float
) -> dict[str, torch.Tensor]:
    """PIECE-S, |sum_b g_b| / sqrt(sum_b g_b^2 + damping) (the paper's damping is 1), computed in
    the accumulators' memory: both inputs are consumed."""
    scores = {}
    for key in list(sums):
        g2 = squares.pop(key)
        scores[key] = sums.pop(key).abs_().div_(g2.add_(damping).sqrt_())
    return scores


def mean_of(tensors: dict[str, torch.Tensor], sum_over_ranks: Callable[[float], float] = float) -> float:
    """The mean of every entry of every tensor (of the whole tensors, for FSDP shards)."""
    total = sum_over_ranks(sum(float(t.sum(dtype=torch.float64)) for t in tensors.values()))
    return total / max(sum_over_ranks(sum(t.numel() for t in tensors.values())), 1)


def piece_r_scores(
    sums: dict[str, torch.Tensor],
    retain_fisher: dict[str, torch.Tensor],
    damping: float,
    *,
    sum_over_ranks: Callable[[float], float] = float,
) -> tuple[dict[str, torch.Tensor], float]:
    """piece-r, (sum_b g_b)^2 / (F_retain + delta), with delta the `damping` quantile of F_retain (at
    least the smallest positive float, so an entry no retain text moves cannot divide by zero).

    `sums` (fp32, per eligible tensor) become the scores in place; `retain_fisher` is kept (its
    values at the chosen entries go into the mask). Returns the scores and delta.
    Source: to second order a change d gains sum_i g_i d_i on the domain and costs drift
    1/2 sum_i F_i d_i^2 (the KL from the model on the retain text), so the entries with the most
    gain per unit of drift have the largest g_i^2 / F_i.
    """
    delta = max(
        quantile(retain_fisher, damping, sum_over_ranks=sum_over_ranks), torch.finfo(torch.float32).tiny
    )
    return {key: sums.pop(key).square_().div_(retain_fisher[key] + delta) for key in list(sums)}, delta


def quantile(
    tensors: dict[str, torch.Tensor], q: float, *, sum_over_ranks: Callable[[float], float] = float
) -> float:
    """The q-quantile of the non-negative values of all tensors together, exactly: the value at
    ascending rank floor(q x (n - 1)), found by bisection over float bit patterns (31 counting
    passes, no sorted copy of all values). `sum_over_ranks` adds counts up over the ranks (FSDP
    shards)."""
    n = int(sum_over_ranks(sum(int(t.numel()) for t in tensors.values())))
    rank = math.floor(q * (n - 1))
    # sums of squares are >= +0.0, so their bit patterns as int32 sort like the values: a view, no copy
    keys = [t.detach().reshape(-1).float().view(torch.int32) for t in tensors.values()]

    def count_at_most(bits: int) -> int:
        return int(sum_over_ranks(sum(int((k <= bits).sum()) for k in keys)))

    lo, hi = 0, 0x7F800000  # smallest t with count(<= t) > rank
    while lo < hi:
        mid = (lo + hi) // 2
        if count_at_most(mid) > rank:
            hi = mid
        else:
            lo = mid + 1
    return float(torch.tensor(lo, dtype=torch.int32).view(torch.float32))


def magnitude_scores(
    params: dict[str, torch.nn.Parameter], world: World | None = None
) -> dict[str, torch.Tensor]:
    """|theta| per entry, fp32 (for FSDP shards, this rank's part)."""
    return {k: local_part(p, world).values.float().abs() for k, p in params.items()}


def random_scores(
    params: dict[str, torch.nn.Parameter], seed: int, world: World | None = None
) -> dict[str, torch.Tensor]:
    """Uniform [0, 1) per entry from a CPU generator seeded once, drawn in tensor-name order (for
    FSDP shards, each rank's own part of what one process would draw)."""
    generator = torch.Generator().manual_seed(seed)
    scores = {}
    for k in sorted(params):
        drawn = torch.rand(params[k].shape, generator=generator).view(-1)
        if is_sharded(params[k]):
            part = local_part(params[k], world)
            drawn = drawn[part.start : part.stop].clone()
        scores[k] = drawn
    return scores


def normalize_scores(
    scores: dict[str, torch.Tensor],
    how: str,
    *,
    sum_over_ranks: Callable[[float], float] = float,
    sizes: dict[str, int] | None = None,
    groups: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """`tensor`: divide each tensor's scores by their mean, so tensors compete on relative
    importance rather than on the scale of their gradients (in place); `none`: as they are.
    `groups` (name -> the weight it is part of) makes several stored tensors one: the experts a
    checkpoint stores one tensor each share the mean of the fused weight the model holds, so a mask
    does not depend on how the files store them.
    For shards, `sum_over_ranks` adds up over the ranks and `sizes` are the whole tensors' sizes."""
    check_normalization(how)
    if how == "tensor":
        totals: dict[str, list[float]] = {}
        for name, s in scores.items():
            group = totals.setdefault((groups or {}).get(name, name), [0.0, 0])
            group[0] += sum_over_ranks(float(s.sum(dtype=torch.float64)))
            group[1] += sizes[name] if sizes else s.numel()
        for name, s in scores.items():
            total, size = totals[(groups or {}).get(name, name)]
            mean = total / max(size, 1)
            if mean > 0:
                s.div_(mean)
    return scores
