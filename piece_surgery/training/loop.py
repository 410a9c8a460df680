"""The sparse trainer: fine-tune only the masked entries; memory and optimizer state scale with k.

The model keeps its weights. For each masked tensor the trainable state is the fp32 vector of its k
selected values (sparse_grad.SparseParameters): before every forward pass they are written into the
weight (in the weight's dtype), backward delivers their gradient without a dense weight gradient,
and AdamW only ever sees the values. `train_sparse` is the whole loop, top to bottom.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from piece_surgery.data.examples import Dataset
from piece_surgery.formats.delta import TrainLog
from piece_surgery.models.loading import enable_activation_checkpointing
from piece_surgery.models.naming import is_norm
from piece_surgery.runtime.distributed import World
from piece_surgery.runtime.errors import PieceError
from piece_surgery.training.budget import DriftBudget, DriftEstimate, TrainingDiverged, saved_state_note
from piece_surgery.training.config import TrainConfig
from piece_surgery.training.measures import Measures
from piece_surgery.training.schedule import lr_factor, total_steps
from piece_surgery.training.sparse_grad import SparseParameters
from piece_surgery.training.state import load_state, save_state
from piece_surgery.training.steps import MicroBatchLoss, probe_batch, step_gradients
from piece_surgery.training.unchanged import why_unchanged


@dataclass
class TrainResult:
    values: dict[str, torch.Tensor]  # tensor name -> trained fp32 values at the mask's indices
    steps: int  # optimizer steps the values have had (those before a resume included)
    train_loss: float | None  # mean loss of the last optimizer step
    eval_loss: float | None
    history: list[dict] = field(default_factory=list)
    resumed_from: int | None = None
    optimizer_state: dict[str, int] = field(default_factory=dict)  # state name -> total entries
    predicted_drift: float | None = None  # 1/2 sum F d^2 at the end (a mask with the retain Fisher)
    measured_drift: float | None = None  # mean token KL(base || tuned) on general text at the end
    stopped_by_drift_budget: bool = False
    # the first step whose drift passed --drift-budget: {"step", "drift"}; the values are those of
    # the last step within it (`steps`)
    drift_budget_passed: dict | None = None
    # why most entries with a gradient ended unchanged in the weights' dtype (their updates below its
    # resolution, or below float32's), or None (training.unchanged)
    unchanged_reason: str | None = None
    unchanged_entries: int | None = None  # the entries with a non-zero gradient that ended unchanged
    ranks: int = 1  # the processes that trained (1: no launcher, or a launcher that started one)

    def summary(self) -> dict:
        """The run's figures, as every report reads them: `train --json`, the delta's provenance and
        the lines the command prints; `log` is every step's (formats.delta.TrainLog, as JSON)."""
        return {
            "steps": self.steps,
            "ranks": self.ranks,
            "resumed_from": self.resumed_from,
            "first_train_loss": self.history[0]["loss"] if self.history else None,
            "final_train_loss": self.train_loss,
            "final_eval_loss": self.eval_loss,
            "predicted_drift": self.predicted_drift,
            "measured_drift": self.measured_drift,
            "stopped_by_drift_budget": self.stopped_by_drift_budget,
            "drift_budget_passed": self.drift_budget_passed,
            "unchanged_reason": self.unchanged_reason,
            "unchanged_entries": self.unchanged_entries,
            "log": TrainLog.of(self.history).to_json(),
        }


def train_sparse(
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    indices: dict[str, torch.Tensor],
    dataset: Dataset,
    config: TrainConfig,
    *,
    pad_id: int = 0,
    eval_dataset: Dataset | None = None,
    general_dataset: Dataset | None = None,
    state_dir: Path | None = None,
    resume: bool = False,
    resume_key: dict | None = None,
    progress: Callable[[int, dict], None] | None = None,
    sparse_linear: bool = True,
    fisher: dict[str, torch.Tensor] | None = None,
    world: World | None = None,
    autocast: torch.dtype | None = None,
) -> TrainResult:
    """Train the masked entries of `params` (tensor name -> model parameter) in place.

    `indices` maps each masked tensor's name to its sorted int64 flat indices (k_t entries); the
    trainable state is one fp32 vector of k_t values per tensor, on the parameter's device, and
    AdamW's moments are as large. Returns the trained fp32 values (on the CPU) and what the run saw;
    the model holds them (rounded to its dtype) when this returns. `config.lr` must be set
    (TrainConfig.for_mask fills the default of a mask's method).

    Each optimizer step's loss is the mean token loss over the step's loss-bearing tokens (summed
    over its micro-batches and ranks), so any split of a global batch trains the same values. With
    `state_dir` and
    `config.save_every`, a resumable state is written there atomically every `save_every` steps;
    `resume=True` continues from it (`resume_key` must match the saved one). `sparse_linear=False`
    computes every masked tensor's dense gradient and keeps its k entries (the slower reference
    path). `fisher` (tensor name -> the per-token retain Fisher at the mask's entries, fp32) gives
    the predicted drift of every step (nats per token), for `retain_weight` and a budget on it.
    With `config.drift_budget`, the run stops at the first step whose drift (measured on
    `general_dataset` every `eval_every` steps, or predicted every step: `config.budget_on`) passes
    the budget, and keeps the values of the last step within it. With a `world` (several
    processes), each rank trains on its share of every step's micro-batches and
    DistributedDataParallel keeps the values equal; rank 0 saves the state. `autocast` is the dtype
    the forward runs under (a run's Placement; None: bf16 for fp32 weights on a CUDA GPU with it).

    Raises PieceError for empty data, options the mask cannot serve, or a budget the first
    measured step already passes (nothing to keep); TrainingDiverged for a non-finite loss or value
    (naming the last good saved state).
    """
    _check_inputs(dataset, config, fisher, general_dataset)
    sparse = SparseParameters(params, indices, world)
    optimizer = _adamw(sparse, config)
    ranks = world.size if world is not None else 1
    total = total_steps(len(dataset.examples), config, ranks)
    resume_key = {**(resume_key or {}), "config": config.resume_key(), "ranks": ranks}
    start, history, kept = _starting_point(
        state_dir, sparse, optimizer, resume_key, resume, total, config.seed, world
    )
    _prepare_model(model, sparse, config, sparse_linear)
    loop = _Loop(
        sparse,
        optimizer,
        config,
        dataset,
        pad_id,
        world,
        Measures(model, sparse, config, pad_id, eval_dataset, general_dataset, world),
        DriftBudget(config, sparse, history, kept),
        DriftEstimate(sparse, fisher) if fisher is not None else None,
        state_dir,
        resume_key,
        history,
        last_saved=start if resume else None,
    )
    try:
        total = loop.resume_within_budget(start, total)
        loop.forward = MicroBatchLoss(model, sparse, world, autocast)
        # before the first step: every value on the autograd path, or one line that says why not
        sparse.probe(
            lambda: loop.forward.loss_sum(probe_batch(dataset, pad_id, loop.forward.device), fallback=False)
        )
        for step in range(start, total):
            record = loop.step(step, total)
            if progress:
                progress(1, record)
            loop.save_if_due(step + 1)
            if loop.stop_if_past_budget(record):
                break
        sparse.write()
        loop.measures.finish(loop.history)
        records = loop.history[start:] if not loop.budget.passed_at else []
        unchanged = why_unchanged(sparse, optimizer, config.lr, records)
    finally:
        if loop.forward is not None:
            loop.forward.close()
        sparse.detach()
        for p in model.parameters():
            p.grad = None
    return loop.result(start, total, resumed=resume, unchanged=unchanged)


@dataclass
class _Loop:
    """One run of train_sparse: what every step reads and updates."""

    sparse: SparseParameters
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    dataset: Dataset
    pad_id: int
    world: World | None
    measures: Measures
    budget: DriftBudget
    drift: DriftEstimate | None
    state_dir: Path | None
    resume_key: dict
    history: list[dict]
    last_saved: int | None = None
    forward: MicroBatchLoss | None = None

    @property
    def train_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None

    def resume_within_budget(self, start: int, total: int) -> int:
        """The last step to run: `total`, or, for a state saved past the budget (interrupted before
        it stopped), the step it resumes at, with what the uninterrupted run would have kept."""
        if self.history and self.budget.passed(
            self.budget.resumed_record(self.history, self.drift),
            saved_state_note(self.last_saved, self.state_dir),
        ):
            self.history = self.budget.roll_back(self.history)
            self.measures.restore(self.history[-1])
            return start
        return total

    def step(self, step: int, total: int) -> dict:
        """One optimizer step (0-based `step` of `total`): its record (loss, lr, gradient norm,
        drifts and held-out loss when measured), added to the history."""
        self.sparse.check_attached()
        self.sparse.write()
        loss = step_gradients(self.forward, self.dataset, step, self.config, self.pad_id)
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"the loss became {loss} at step {step + 1}: lower --lr or check the data"
                + _last_good(self.last_saved, self.state_dir)
            )
        factor = lr_factor(step, total, self.config)
        grad_norm = _optimizer_step(self.sparse, self.optimizer, self.config, factor, self.drift)
        _check_finite_values(self.sparse, step, self.last_saved, self.state_dir)
        record = {"step": step + 1, "loss": loss, "lr": self.config.lr * factor, "grad_norm": grad_norm}
        if self.drift is not None:
            record["predicted_drift"] = self.drift.value()
        every = self.config.eval_every
        if every and ((step + 1) % every == 0 or step + 1 == total):
            self.measures.take(record)  # the last step too: a budget must see the values it writes
        self.history.append(record)
        return record

    def save_if_due(self, steps_done: int) -> None:
        """Write the resumable state every --save-every steps (rank 0; every rank's RNG state)."""
        if self.state_dir is None or not self.config.save_every or steps_done % self.config.save_every:
            return
        rng = self.world.gather(torch.get_rng_state()) if self.world is not None else [torch.get_rng_state()]
        if self.world is None or self.world.is_main:
            save_state(
                self.state_dir,
                self.sparse,
                self.optimizer,
                steps_done,
                self.history,
                self.resume_key,
                rng,
                self.budget.saved(),
            )
        self.last_saved = steps_done

    def stop_if_past_budget(self, record: dict) -> bool:
        """Whether the step passed --drift-budget (then the values of the last step within it are
        put back and the history ends there)."""
        if not self.budget.passed(record, saved_state_note(self.last_saved, self.state_dir)):
            return False
        self.history = self.budget.roll_back(self.history)
        self.measures.restore(self.history[-1])
        return True

    def result(
        self, start: int, total: int, *, resumed: bool, unchanged: tuple[str | None, int | None]
    ) -> TrainResult:
        passed = self.budget.passed_at
        return TrainResult(
            values={n: v.detach().cpu() for n, v in self.sparse.values.items()},
            steps=self.history[-1]["step"] if passed else max(total, start),
            train_loss=self.train_loss,
            eval_loss=self.measures.eval_loss,
            history=self.history,
            resumed_from=start if resumed else None,
            optimizer_state=_optimizer_state_sizes(self.optimizer),
            predicted_drift=self.drift.value() if self.drift is not None else None,
            measured_drift=self.measures.drift,
            stopped_by_drift_budget=passed is not None,
            drift_budget_passed=passed,
            unchanged_reason=unchanged[0],
            unchanged_entries=unchanged[1],
            ranks=self.world.size if self.world is not None else 1,
        )


def _check_inputs(dataset: Dataset, config: TrainConfig, fisher, general: Dataset | None = None) -> None:
    if config.lr is None:
        raise PieceError(
            "TrainConfig.lr is not set: train_sparse does not know the mask's method; "
            "give lr, or TrainConfig.for_mask(mask.info.method, mask.fisher is not None) for its default"
        )
    if not dataset.examples:
        raise PieceError("the training data has no examples")
    measured_budget = config.drift_budget and config.budget_on == "measured"
    if measured_budget and not (config.eval_every and general):
        raise PieceError(
            "a drift budget on the measured drift needs general text to measure it on and a period: "
            "give --eval-general and --eval-every (TrainConfig.eval_every), or --budget-on predicted"
        )
    config.check_fisher(fisher is not None)


def _starting_point(
    state_dir: Path | None,
    sparse: SparseParameters,
    optimizer: torch.optim.Optimizer,
    resume_key: dict,
    resume: bool,
    total: int,
    seed: int,
    world: World | None,
) -> tuple[int, list, tuple[int, dict] | None]:
    """(first step, history, the values a drift budget keeps): 0, none and none for a fresh run
    (seeded), the saved ones on --resume."""
    if not resume:
        torch.manual_seed(seed)
        return 0, [], None
    start, history, kept = load_state(
        state_dir, sparse, optimizer, resume_key, rank=world.rank if world else 0
    )
    if start > total:
        raise PieceError(
            f"--resume: the saved state is at step {start}, past the {total} steps this run asks for; "
            "raise --max-steps or --epochs, or start afresh without --resume"
        )
    return start, history, kept


def _prepare_model(
    model: torch.nn.Module, sparse: SparseParameters, config: TrainConfig, sparse_linear: bool
):
    sparse.attach(model, sparse_linear=sparse_linear)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
        if hasattr(model, "enable_input_require_grads"):  # checkpointed layers need a grad input
            model.enable_input_require_grads()
    model.train()


def _optimizer_step(
    sparse: SparseParameters,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    factor: float,
    drift: DriftEstimate | None,
) -> float:
    """Penalty, clipping, the scheduled learning rate, one AdamW step over the values; returns the
    gradient's L2 norm over every value (before clipping, the penalty included)."""
    if drift is not None and config.retain_weight:
        drift.add_penalty_gradient(config.retain_weight)
    grads = [v.grad for v in sparse.values.values() if v.grad is not None]
    if config.clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(list(sparse.values.values()), config.clip)
    else:
        norms = [torch.linalg.vector_norm(g) for g in grads]
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else 0.0
    for group in optimizer.param_groups:
        group["lr"] = config.lr * group["lr_scale"] * factor
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def _last_good(last_saved: int | None, state_dir: Path | None) -> str:
    return f"; the last good state (step {last_saved}) is in {state_dir}" if last_saved else ""


def _check_finite_values(
    sparse: SparseParameters, step: int, last_saved: int | None, state_dir: Path | None
) -> None:
    for name, value in sparse.values.items():
        if not bool(torch.isfinite(value).all()):
            raise TrainingDiverged(
                f"the trained values of '{name}' became non-finite at step {step + 1}: lower --lr or "
                "--weight-decay" + _last_good(last_saved, state_dir)
            )


def _adamw(sparse: SparseParameters, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the values; norm gains in a group of their own when they train at another rate."""
    norms = {n for n in sparse.values if is_norm(n)} if config.norm_lr_scale != 1.0 else set()
    groups = [
        {"params": [v for n, v in sparse.values.items() if n not in norms], "lr_scale": 1.0},
        {"params": [v for n, v in sparse.values.items() if n in norms], "lr_scale": config.norm_lr_scale},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )


def _optimizer_state_sizes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for state in optimizer.state.values():
        for key, t in state.items():
            if isinstance(t, torch.Tensor):
                sizes[key] = sizes.get(key, 0) + t.numel()
    return sizes
