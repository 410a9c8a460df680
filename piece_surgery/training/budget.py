"""--drift-budget: after each step, whether its drift (measured, or predicted from the retain
Fisher a piece-r mask carries) passed the budget, and the values of the last step within it; and
the predicted drift itself (DriftEstimate), with the gradient of the retain penalty."""

from __future__ import annotations

from pathlib import Path

import torch

from piece_surgery.runtime.distributed import register_error
from piece_surgery.runtime.errors import PieceError
from piece_surgery.training.config import TrainConfig
from piece_surgery.training.sparse_grad import SparseParameters


class DriftBudget:
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
        # steps between measurements: the predicted drift is read every step
        self.period = (config.eval_every or 1) if config.budget_on == "measured" else 1
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
            more_often = ", or measure more often (--eval-every)" if self.period > 1 else ""
            raise PieceError(
                f"the {self.key.split('_')[0]} drift at step {record['step']} ({value:.4g}) already passes "
                f"--drift-budget {self.limit:g}, and no earlier step was measured within it: nothing to "
                f"keep; raise the budget or lower --lr{more_often}" + state_note
            )
        return True

    def saved(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """What a resumable state keeps of the budget: the kept step and its values."""
        if self.kept is None:
            return None
        return self.kept_record["step"], self.kept

    def roll_back(self, history: list[dict]) -> list[dict]:
        """Put the kept values back; the history up to the kept step (whose record holds what was
        measured there)."""
        with torch.no_grad():
            for name, value in self.sparse.values.items():
                value.copy_(self.kept[name])
        step = self.kept_record["step"]
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


def saved_state_note(last_saved: int | None, state_dir: Path | None) -> str:
    if not last_saved:
        return ""
    return (
        f"; the state saved at step {last_saved} is in {state_dir} (--resume with a higher "
        "--drift-budget continues it, --overwrite discards it)"
    )


@register_error
class TrainingDiverged(PieceError):
    pass
