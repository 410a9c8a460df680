"""The sparse delta: what it holds and where it came from.

A delta stores, per touched tensor, the flat indices of the changed entries and the base and tuned
values there (a compact delta: a digest of the base values), and the exactness rule that applies
it. Its folder, in every format version, is formats/delta_folder.py's; diffing two checkpoints is
merging/diff.py's, merging deltas merging/'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from piece_surgery.formats.codec import values_digest
from piece_surgery.runtime.dtypes import (
    as_bits,
    index_dtype,
    numel,
    same_bits,
)
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.records import CheckpointIdentity, DataRecord, JsonRecord
from piece_surgery.runtime.version import __version__

FORMAT = "piece-surgery/delta"


@dataclass
class DiffProvenance(JsonRecord):
    """A delta made by `diff` of two checkpoints (or `import` of an adapter)."""

    tuned: str  # how the tuned checkpoint was named
    density: float | None = None
    top_k: int | None = None
    changed_fraction: dict[str, float] = field(default_factory=dict)  # per tensor, of its entries
    made_by: str = "diff"


# a step's figures as the log keeps them: float32's precision, in half the characters of a float64
LOG_DIGITS = 7


def _logged(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.{LOG_DIGITS}g}")


@dataclass(frozen=True)
class TrainLog(JsonRecord):
    """Every optimizer step of a run, as columns of equal length (one entry per step, in order):
    the step (1-based), its loss (mean token loss over the step's loss-bearing tokens, nats), the
    learning rate it took, the L2 norm of the values' gradient (before clipping), and where taken
    the predicted drift (1/2 sum F d^2), the measured drift (mean token KL from the base on the
    general text) and the held-out loss; null at the steps that did not take them, and a column of
    none left out. Numbers keep LOG_DIGITS significant digits."""

    step: list[int]
    loss: list[float]
    lr: list[float]
    grad_norm: list[float]
    predicted_drift: list[float | None] | None = None
    measured_drift: list[float | None] | None = None
    eval_loss: list[float | None] | None = None

    COLUMNS: ClassVar[tuple[str, ...]] = ("loss", "lr", "grad_norm")
    MEASURES: ClassVar[tuple[str, ...]] = ("predicted_drift", "measured_drift", "eval_loss")

    @classmethod
    def of(cls, history: list[dict]) -> TrainLog:
        """The log of a run's history (train_sparse's per-step records)."""
        columns = {name: [_logged(r[name]) for r in history] for name in cls.COLUMNS}
        for name in cls.MEASURES:
            if any(r.get(name) is not None for r in history):
                columns[name] = [_logged(r.get(name)) for r in history]
        return cls([int(r["step"]) for r in history], **columns)

    def __post_init__(self) -> None:
        lengths = {
            len(getattr(self, n))
            for n in ("step", *self.COLUMNS, *self.MEASURES)
            if getattr(self, n) is not None
        }
        if len(lengths) > 1:
            raise ValueError("a training log's columns must be of equal length")

    def rows(self) -> list[dict]:
        """One record per step (a column's null left out), as the run's history held them."""
        names = [n for n in (*self.COLUMNS, *self.MEASURES) if getattr(self, n) is not None]
        return [
            {"step": step, **{n: getattr(self, n)[i] for n in names if getattr(self, n)[i] is not None}}
            for i, step in enumerate(self.step)
        ]


@dataclass
class TrainProvenance(JsonRecord):
    """A delta made by `train`: the mask it trained, the hyperparameters, the data, the losses."""

    method: str | None
    density: float | None
    mask: dict[str, Any]  # method, density, data, seed and k of the mask
    hyperparameters: dict[str, Any]  # TrainConfig.to_json() and max_length
    data: DataRecord | None
    eval_data: DataRecord | None
    steps: int
    final_train_loss: float | None
    final_eval_loss: float | None
    predicted_drift: float | None = None  # 1/2 sum F d^2 (a mask that carries the retain Fisher)
    stopped_by_drift_budget: bool = False
    made_by: str = "train"
    measured_drift: float | None = None  # mean token KL(base || tuned) on --eval-general, at the end
    eval_general: DataRecord | None = None  # the general text it was measured on
    drift_budget_passed: dict | None = None  # {"step", "drift", "budget", "on"}: the step past it
    ranks: int | None = None  # the processes that trained it (None: recorded before 0.2)
    log: TrainLog | None = None  # every step's figures (None: recorded before 0.2)

    # the fields a run's summary fills (training.loop.TrainResult.summary)
    FIGURES: ClassVar[tuple[str, ...]] = (
        "steps",
        "ranks",
        "final_train_loss",
        "final_eval_loss",
        "predicted_drift",
        "measured_drift",
        "stopped_by_drift_budget",
        "drift_budget_passed",
    )


Provenance = DiffProvenance | TrainProvenance
# `train` writes made_by "train"; a model trained by another loop (integrations/) "trainer"
_PROVENANCES = {"diff": DiffProvenance, "train": TrainProvenance, "trainer": TrainProvenance}


def provenance_from_json(data: Any) -> Provenance | None:
    """The provenance record delta.json holds (None for one this version does not know)."""
    if not isinstance(data, dict) or data.get("made_by") not in _PROVENANCES:
        return None
    return _PROVENANCES[data["made_by"]].from_json(data)


@dataclass
class DeltaInfo:
    """What a delta records besides its entries: the base it was made from and how."""

    base: CheckpointIdentity | None = None
    provenance: Provenance | None = None
    tool_version: str = __version__
    # what `eval --record` measured: gain and drift, the data by name, sha256 and tokens
    evaluations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def method(self) -> str:
        """The scoring method for a trained delta, else how it was made (e.g. `diff`)."""
        if isinstance(self.provenance, TrainProvenance) and self.provenance.method:
            return self.provenance.method
        return self.provenance.made_by if self.provenance else "unknown"


@dataclass
class TensorDelta:
    indices: torch.Tensor  # int64, sorted unique flat indices
    base: torch.Tensor | None  # base values at those indices; None for a compact delta, until matched
    tuned: torch.Tensor  # tuned values at those indices (checkpoint dtype)
    shape: tuple[int, ...]
    base_sha256: str | None = None  # compact: the digest of the base values at the indices
    index_bytes: int | None = None  # compact: bytes of the encoded index gaps
    # names of the same weight (tied) that the base's files did not store, so they loaded as this
    # tensor: the delta changes them too. None: not recorded (deltas written before 0.2)
    loads_as: tuple[str, ...] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.tuned.dtype

    def change(self) -> torch.Tensor:
        """tuned - base, in float64 (exact for bf16, fp16 and fp32 values)."""
        if self.base is None:
            raise ValueError("a compact delta's change needs its base values: match it first (with_base)")
        return self.tuned.double() - self.base.double()

    def digest(self) -> str:
        """The digest of the base values (recorded for a compact delta, computed otherwise)."""
        return self.base_sha256 or values_digest(as_bits(self.base).numpy())

    def matches(self, values: torch.Tensor) -> bool:
        """Whether `values` (at the indices, in the delta's dtype) are the base it was made from."""
        if self.base is not None:
            return bool(same_bits(values.to(self.dtype), self.base).all())
        return values_digest(as_bits(values.detach().cpu().to(self.dtype)).numpy()) == self.base_sha256

    def matched(self, *candidates: torch.Tensor) -> TensorDelta | None:
        """This delta with its base values known: itself if it holds them, else (a compact delta)
        built on the first candidate whose values its digest matches; None if none does."""
        if self.base is not None:
            return self
        for values in candidates:
            if self.matches(values):
                return self.with_base(values)
        return None

    def applied_to(self, current: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(new values, on_base): the values the entries take when this delta is applied at `scale`
        onto weights whose values there are `current` (1-D, the weight's dtype, on the CPU), and
        which of them are the recorded base, bit for bit.

        The exactness rule, the one place it is written: where the scale is 1, the dtypes agree and
        the current value is the recorded base, the tuned value itself is written, so a delta on its
        own base gives the tuned weights bit for bit (base + (tuned - base) in floating point is not
        always tuned, e.g. for a weight that crosses zero); elsewhere current + scale x (tuned -
        base), computed in float64 and rounded once to the weight's dtype. Needs the base values
        (a compact delta: `matched` first)."""
        on_base = same_bits(current, self.base.to(current.dtype))
        new = (current.double() + scale * self.change()).to(current.dtype)
        if scale == 1.0 and self.dtype == current.dtype:
            new = torch.where(on_base, self.tuned, new)
        return new, on_base

    def with_base(self, values: torch.Tensor) -> TensorDelta:
        """This delta with its base values known (a compact delta, matched against a base)."""
        return replace(self, base=values.detach().cpu().to(self.dtype).clone(), index_bytes=None)

    @property
    def stored_bytes(self) -> int:
        """Bytes this tensor's arrays take in delta.safetensors (format 1, or compact if loaded so)."""
        n = int(self.indices.numel())
        if self.index_bytes is not None:
            return self.index_bytes + n * self.tuned.element_size()
        return n * index_dtype(numel(self.shape)).itemsize + 2 * n * self.tuned.element_size()


@dataclass
class Delta:
    tensors: dict[str, TensorDelta]
    info: DeltaInfo = field(default_factory=DeltaInfo)
    weights_sha256: str | None = None  # of delta.safetensors, once saved or loaded

    @property
    def count(self) -> int:
        return sum(int(t.indices.numel()) for t in self.tensors.values())

    @property
    def tensor_bytes(self) -> int:
        return sum(t.stored_bytes for t in self.tensors.values())


# ---------------------------------------------------------------- building and saving


def delta_from_values(
    entries: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    shapes: dict[str, tuple[int, ...]],
    info: DeltaInfo | None = None,
    loads_as: dict[str, list[str]] | None = None,
) -> Delta:
    """Build a delta from (indices, base values, tuned values); entries that did not change are
    dropped. `loads_as` maps a tensor to the tied names its base did not store (checkpoint.
    unstored_twins), which the delta records."""
    tensors = {}
    for name in sorted(entries):
        idx, base, tuned = entries[name]
        tuned = tuned.to(base.dtype)
        changed = ~same_bits(base, tuned)
        check_finite_change(name, idx[changed], base[changed], tuned[changed])
        if bool(changed.any()):
            tensors[name] = TensorDelta(
                idx[changed].to(torch.int64).cpu(),
                base[changed].cpu(),
                tuned[changed].cpu(),
                tuple(shapes[name]),
                loads_as=tuple((loads_as or {}).get(name, ())),
            )
    return Delta(tensors, info or DeltaInfo())


def check_finite_change(
    name: str, indices: torch.Tensor, base: torch.Tensor, tuned: torch.Tensor, where: str = "the delta"
) -> None:
    """A change may not make a finite weight NaN or infinite (a base that held one may keep it)."""
    bad = torch.nonzero(~torch.isfinite(tuned) & torch.isfinite(base)).flatten()
    if bad.numel():
        first = int(bad[0])
        raise PieceError(
            f"{where} sets entry {int(indices[first])} of '{name}' to {float(tuned[first])}; "
            "a delta may not make a weight non-finite"
        )


# ---------------------------------------------------------------- diff
