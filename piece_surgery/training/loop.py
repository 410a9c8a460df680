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

from piece_surgery.data.dataset import Dataset, collate
from piece_surgery.evaluation.loss import batch_logits, evaluate, token_loss_sum
from piece_surgery.models.loading import enable_activation_checkpointing
from piece_surgery.models.naming import is_norm
from piece_surgery.runtime.distributed import World, register_error
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.sharding import is_sharded
from piece_surgery.training.config import TrainConfig
from piece_surgery.training.sparse_grad import SparseParameters
from piece_surgery.training.state import load_state, save_state


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
    # why no entry changed although the values had gradients (updates below the dtype's resolution)
    unchanged_reason: str | None = None

    def summary(self) -> dict:
        """The run's figures, as every report reads them: `train --json`, the delta's provenance and
        the lines the command prints."""
        return {
            "steps": self.steps,
            "resumed_from": self.resumed_from,
            "first_train_loss": self.history[0]["loss"] if self.history else None,
            "final_train_loss": self.train_loss,
            "final_eval_loss": self.eval_loss,
            "predicted_drift": self.predicted_drift,
            "measured_drift": self.measured_drift,
            "stopped_by_drift_budget": self.stopped_by_drift_budget,
            "drift_budget_passed": self.drift_budget_passed,
            "unchanged_reason": self.unchanged_reason,
        }


@register_error
class TrainingDiverged(PieceError):
    pass


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
    DistributedDataParallel keeps the values equal; rank 0 saves the state.

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
        _Measures(model, sparse, config, pad_id, eval_dataset, general_dataset, world),
        _Budget(config, sparse, history, kept),
        DriftEstimate(sparse, fisher) if fisher is not None else None,
        state_dir,
        resume_key,
        history,
        last_saved=start if resume else None,
    )
    try:
        total = loop.resume_within_budget(start, total)
        loop.forward = _MicroBatchLoss(model, sparse, world)
        # before the first step: every value on the autograd path, or one line that says why not
        sparse.probe(
            lambda: loop.forward.loss_sum(_probe_batch(dataset, pad_id, loop.forward.device), fallback=False)
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
        unchanged = _why_unchanged(sparse, loop.history[start:] if not loop.budget.passed_at else [])
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
    measures: _Measures
    budget: _Budget
    drift: DriftEstimate | None
    state_dir: Path | None
    resume_key: dict
    history: list[dict]
    last_saved: int | None = None
    forward: _MicroBatchLoss | None = None

    @property
    def train_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None

    def resume_within_budget(self, start: int, total: int) -> int:
        """The last step to run: `total`, or, for a state saved past the budget (interrupted before
        it stopped), the step it resumes at, with what the uninterrupted run would have kept."""
        if self.history and self.budget.passed(
            self.budget.resumed_record(self.history, self.drift),
            _saved_state(self.last_saved, self.state_dir),
        ):
            self.history = self.budget.roll_back(self.history, self.measures)
            return start
        return total

    def step(self, step: int, total: int) -> dict:
        """One optimizer step (0-based `step` of `total`): its record (loss, lr, gradient norm,
        drifts and held-out loss when measured), added to the history."""
        self.sparse.check_attached()
        self.sparse.write()
        loss = _step_gradients(self.forward, self.dataset, step, self.config, self.pad_id)
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
        if not self.budget.passed(record, _saved_state(self.last_saved, self.state_dir)):
            return False
        self.history = self.budget.roll_back(self.history, self.measures)
        return True

    def result(self, start: int, total: int, *, resumed: bool, unchanged: str | None) -> TrainResult:
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
            unchanged_reason=unchanged,
        )


def _why_unchanged(sparse: SparseParameters, records: list[dict]) -> str | None:
    """None if an entry changed (in its weight's dtype) or no step ran. Raises PieceError when the
    values never received a gradient; else says why the updates left every entry as it was."""
    if not records or sparse.changed_entries():
        return None
    if all(r.get("grad_norm", 1.0) == 0.0 for r in records):
        raise PieceError(
            f"the trained values received no gradient in {len(records)} steps, so nothing was learned; "
            "check that the data has loss-bearing tokens the masked entries influence"
        )
    largest, relative, dtype = 0.0, 0.0, None
    for name, v in sparse.values.items():
        change = (v.detach() - sparse.base_values[name]).abs()
        if change.numel() and float(change.max()) >= largest:
            i = int(change.argmax())
            largest = float(change[i])
            relative = largest / max(abs(float(sparse.base_values[name][i])), 1e-30)
            dtype = sparse.params[name].dtype
    resolution = torch.finfo(dtype).eps if dtype is not None else float("nan")
    return (
        f"no entry changed in the weights' dtype: the largest update was {largest:.3g} ({relative:.3g} "
        f"of its entry), below {dtype} resolution (about {resolution:.3g} relative); raise --lr or "
        "train longer"
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


@dataclass
class _Measures:
    """What the loop measures every --eval-every steps and at the end: the loss on held-out data,
    and the drift on general text: mean token KL(base || the model now), the base being the same
    model with the base's values written back (only the masked entries differ). Every rank
    measures (the same values): a model FSDP shards runs on all ranks or none."""

    model: torch.nn.Module
    sparse: SparseParameters
    config: TrainConfig
    pad_id: int
    eval_dataset: Dataset | None
    general_dataset: Dataset | None
    world: World | None = None
    eval_loss: float | None = None
    drift: float | None = None

    def take(self, record: dict) -> None:
        self.sparse.write()
        if self.eval_dataset is not None:
            self.eval_loss = record["eval_loss"] = evaluate(
                self.model, self.eval_dataset, self.config.batch_size, self.pad_id
            )
        if self.general_dataset is not None:
            drift = self._drift()
            if self.world is not None:  # every rank stops (or not) on the same number: rank 0's
                drift = self.world.gather(drift)[0]
            self.drift = record["measured_drift"] = drift

    def finish(self, history: list[dict]) -> None:
        """The last step's figures: taken now, unless the loop (or the run a state was saved
        by) took them at that step."""
        wanted = self.eval_dataset is not None or self.general_dataset is not None
        last = history[-1] if history else {}
        if wanted and not ("eval_loss" in last or "measured_drift" in last):
            self.take(last)
        else:
            self.eval_loss = last.get("eval_loss", self.eval_loss)
            self.drift = last.get("measured_drift", self.drift)

    def _drift(self) -> float:
        from piece_surgery.evaluation.drift import compare, model_forward

        forward = model_forward(self.model)
        was_training = self.model.training
        self.model.eval()

        def base(batch):
            with self.sparse.as_base():  # norm gains and shared weights take the values in forward
                return forward(batch)

        def tuned(batch):
            return forward(batch)

        try:
            device = next(self.model.parameters()).device
            with self.sparse.calls() as called:
                measured = compare(
                    self.general_dataset,
                    base,
                    {"tuned": tuned},
                    batch_size=self.config.batch_size,
                    pad_id=self.pad_id,
                    device=device,
                )
        finally:
            self.sparse.write()
            self.model.train(was_training)
        kl = measured["tuned"].kl
        if kl == 0.0 and self.sparse.changed_entries(called):
            # the base pass and the tuned pass gave the same logits on every token: a write into
            # the live model did not reach its forward, and the figure would be a silent 0
            raise PieceError(
                "the drift measured 0 exactly although trained entries differ from the base: the base "
                "values written into the model did not take effect in its forward (a replaced forward "
                "that caches its weights?); load the model without it (USE_HUB_KERNELS=NO)"
            )
        return kl


class _Budget:
    """--drift-budget: after each step, whether its drift (the measured one when the step measured
    it, or the predicted one) passed the budget; the values of the last step within it, to keep.
    A copy of k fp32 values per tensor, taken when a step is within the budget."""

    def __init__(
        self,
        config: TrainConfig,
        sparse: SparseParameters,
        history: list[dict],
        saved: tuple[int, dict[str, torch.Tensor]] | None = None,
    ):
        self.limit = config.drift_budget
        self.key = f"{config.budget_on}_drift"
        self.sparse = sparse
        self.kept: dict[str, torch.Tensor] | None = None
        self.kept_record: dict | None = None
        self.passed_at: dict | None = None
        if not self.limit or not history:
            return
        # a resumed run: the kept values its state saved, if their step is within this budget (the
        # step it resumes at is checked, and kept or rolled back, by the first `passed`)
        records = {r["step"]: r for r in history}
        record = records.get(saved[0]) if saved is not None else None
        if record is not None and record.get(self.key) is not None and record[self.key] <= self.limit:
            self.kept = {n: v.to(sparse.values[n].device) for n, v in saved[1].items()}
            self.kept_record = record

    def resumed_record(self, history: list[dict], drift) -> dict:
        """The record of the step a run resumes at, with its predicted drift (for a budget on it)."""
        last = dict(history[-1])
        if self.key == "predicted_drift" and drift is not None:
            last["predicted_drift"] = drift.value()
        return last

    def passed(self, record: dict, state_note: str = "") -> bool:
        value = record.get(self.key)
        if not self.limit or value is None:
            return False
        if value <= self.limit:
            self._keep(record)
            return False
        self.passed_at = {"step": record["step"], "drift": value, "budget": self.limit, "on": self.key[:-6]}
        if self.kept is None:
            raise PieceError(
                f"the {self.key.split('_')[0]} drift at step {record['step']} ({value:.4g}) already passes "
                f"--drift-budget {self.limit:g}, and no earlier step was measured within it: nothing to "
                "keep; raise the budget, lower --lr, or measure more often (--eval-every)" + state_note
            )
        return True

    def saved(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """What a resumable state keeps of the budget: the kept step and its values."""
        if self.kept is None:
            return None
        return self.kept_record["step"], self.kept

    def roll_back(self, history: list[dict], measures: _Measures) -> list[dict]:
        """Put the kept values back; the history up to the kept step."""
        with torch.no_grad():
            for name, value in self.sparse.values.items():
                value.copy_(self.kept[name])
        step = self.kept_record["step"]
        if "measured_drift" in self.kept_record:
            measures.drift = self.kept_record["measured_drift"]
        if "eval_loss" in self.kept_record:
            measures.eval_loss = self.kept_record["eval_loss"]
        return [r for r in history if r["step"] <= step]

    def _keep(self, record: dict) -> None:
        self.kept = {n: v.detach().clone() for n, v in self.sparse.values.items()}
        self.kept_record = record


class DriftEstimate:
    """The drift a change d of the trained values is predicted to cost: 1/2 sum_i F_i d_i^2 in nats
    per token (the mean token KL(base || tuned) on the retain text, to second order), with F the
    per-token retain Fisher at the mask's entries (fp32, aligned with the values). O(k) a call."""

    def __init__(self, sparse: SparseParameters, fisher: dict[str, torch.Tensor]):
        self.values = sparse.values
        self.start = sparse.base_values
        self.fisher = {n: fisher[n].to(v.device, torch.float32) for n, v in sparse.values.items()}

    def value(self) -> float:
        total = 0.0
        for name, v in self.values.items():
            d = v.detach() - self.start[name]
            total += 0.5 * float((self.fisher[name] * d * d).sum(dtype=torch.float64))
        return total

    def add_penalty_gradient(self, weight: float) -> None:
        """The gradient of weight/2 sum F d^2 (weight F d), added to the values' gradients.
        TrainingDiverged, naming the penalty, when it overflows (a huge --retain-weight, or a mask
        whose Fisher values are near the float maximum)."""
        for name, v in self.values.items():
            penalty = weight * self.fisher[name] * (v.detach() - self.start[name])
            if not bool(torch.isfinite(penalty).all()):
                largest = float(self.fisher[name].max())
                raise TrainingDiverged(
                    f"the retain penalty overflowed on '{name}': --retain-weight {weight:g} times the mask's "
                    f"retain Fisher (up to {largest:.3g}) times the change is not a finite number; lower "
                    "--retain-weight"
                )
            v.grad = penalty if v.grad is None else v.grad.add_(penalty)


def _saved_state(last_saved: int | None, state_dir: Path | None) -> str:
    if not last_saved:
        return ""
    return (
        f"; the state saved at step {last_saved} is in {state_dir} (--resume with a higher "
        "--drift-budget continues it, --overwrite discards it)"
    )


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


class _MicroBatchLoss:
    """A micro-batch's loss: the model's own forward in one process, under DDP through it."""

    def __init__(self, model: torch.nn.Module, sparse: SparseParameters, world: World | None):
        self.model = model
        self.world = world
        self.values = [sparse.values[n] for n in sorted(sparse.values)]
        self.device = next(model.parameters()).device
        self.autocast = _use_bf16_autocast(model)
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
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
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


def _step_gradients(
    forward: _MicroBatchLoss, dataset: Dataset, step: int, config: TrainConfig, pad_id: int
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


def _probe_batch(dataset: Dataset, pad_id: int, device: torch.device) -> dict:
    """A micro-batch for the probe: the first example, and the first image record if the first is
    text (a projector trains on image records alone)."""
    examples = [dataset.examples[0]]
    if examples[0].model_inputs is None:
        examples += [e for e in dataset.examples if e.model_inputs is not None][:1]
    return {k: v.to(device) for k, v in collate(examples, pad_id).items()}


def _use_bf16_autocast(model: torch.nn.Module) -> bool:
    """fp32 weights on a CUDA GPU with bf16: run the forward under bf16 autocast."""
    p = next(model.parameters())
    return p.device.type == "cuda" and torch.cuda.is_bf16_supported() and p.dtype == torch.float32


def _optimizer_state_sizes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for state in optimizer.state.values():
        for key, t in state.items():
            if isinstance(t, torch.Tensor):
                sizes[key] = sizes.get(key, 0) + t.numel()
    return sizes
