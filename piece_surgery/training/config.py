"""The hyperparameters of a sparse run (TrainConfig): checked when made, with the help text the
CLI shows on each field, recorded in the delta and read back from it. No torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.options import check_seed
from piece_surgery.runtime.records import JsonRecord

SCHEDULES = ("constant", "linear", "cosine")


# AdamW moves each value by about lr per step; past 1 a single step wrecks any weight
MAX_LR = 1.0


# The learning rate a mask's method trains best at (docs/training.md has the frontier behind them):
# piece-r keeps to entries the model's other behaviour barely uses, which move little per step.
DEFAULT_LRS = {"piece-r": 1e-3}


DEFAULT_LR = 1e-4


# The penalty retain_weight/2 sum F d^2 for a mask that carries the retain Fisher (piece-r): on the
# benchmark it cut drift at equal gain several-fold (with the model's own text as the retain set)
DEFAULT_RETAIN_WEIGHT = 100.0


def default_lr(method: str | None) -> float:
    """The default learning rate for a mask scored with `method` (None: unknown)."""
    return DEFAULT_LRS.get(method or "", DEFAULT_LR)


def _help(text: str, **more) -> dict:
    return {"help": text, **more}


def parse_betas(text: str) -> tuple[float, float]:
    """--betas as the command line gives them: two numbers, e.g. "0.9,0.95"."""
    try:
        parts = tuple(float(x) for x in str(text).split(","))
    except ValueError:
        parts = ()
    if len(parts) != 2:
        raise PieceError(f"--betas '{text}' must be two numbers, e.g. 0.9,0.95")
    return parts


@dataclass
class TrainConfig(JsonRecord):
    """Hyperparameters of a sparse run; checked when made. A delta records them
    (`provenance.hyperparameters`), and TrainConfig.from_json reads them back."""

    # None: default_lr(the mask's method), chosen by train_checkpoint; train_sparse needs a number
    lr: float | None = field(
        default=None, metadata=_help("Learning rate (AdamW). [default: 1e-3 for piece-r masks, else 1e-4]")
    )
    epochs: int = field(default=1, metadata=_help("Passes over the data (unless --max-steps)."))
    max_steps: int | None = field(default=None, metadata=_help("Stop after this many optimizer steps."))
    batch_size: int = field(default=4, metadata=_help("Examples per micro-batch."))
    grad_accum: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    schedule: str = field(
        default="constant", metadata=_help("constant, linear or cosine.", metavar="constant|linear|cosine")
    )
    warmup_steps: int = field(default=0, metadata=_help("Linear warm-up steps."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    betas: tuple[float, float] = field(
        default=(0.9, 0.95),
        metadata=_help(
            "AdamW betas, e.g. 0.9,0.95.",
            metavar="B1,B2",
            cli_type=str,
            parse=parse_betas,
            cli_default="0.9,0.95",
        ),
    )
    clip: float = field(default=1.0, metadata=_help("Gradient-norm clip (0: off)."))
    eval_every: int | None = field(
        default=None,
        metadata=_help(
            "Evaluate every N steps and at the last. [default with --drift-budget: a tenth of the run]"
        ),
    )
    save_every: int | None = field(default=None, metadata=_help("Save a resumable state every N steps."))
    seed: int = field(default=0, metadata=_help("Data order (and the random method)."))
    gradient_checkpointing: bool = field(
        default=False, metadata=_help("Trade compute for activation memory.", flag=True)
    )
    # norm gains scale whole channels, so they may want a smaller step than matrix entries
    norm_lr_scale: float = field(
        default=1.0, metadata=_help("Learning-rate multiplier for norm gains in the mask (1: same lr).")
    )
    # stop at the first step whose drift passes this, keeping the last step within it; the drift is
    # measured (mean token KL from the base on general text) unless budget_on says "predicted" (the
    # diagonal-Fisher estimate 1/2 sum F d^2, which the retain penalty makes read low: evidence.md)
    drift_budget: float | None = field(
        default=None,
        metadata=_help(
            "Stop once the drift (mean token KL from the base, nats) passes this; keep the last step "
            "within it."
        ),
    )
    # None: not given (read as "measured"); given without a budget, an error
    budget_on: str | None = field(
        default=None,
        metadata=_help(
            "What --drift-budget reads: measured (KL on --eval-general, default the shipped general "
            "set, every --eval-every steps, default a tenth of the run, and at the last) or predicted "
            "(1/2 sum F d^2 from a piece-r mask's retain Fisher, every step). [default: measured]",
            metavar="predicted|measured",
        ),
    )
    # None: DEFAULT_RETAIN_WEIGHT with a mask that carries the Fisher, else 0 (see for_mask);
    # train_sparse reads None as 0
    retain_weight: float | None = field(
        default=None,
        metadata=_help(
            "Add retain_weight/2 sum F d^2 to the loss. "
            "[default: 100 with a mask that carries the retain Fisher (piece-r), else 0]"
        ),
    )

    # the fields the maker gave (budget_on: its default is not a choice); kept by dataclasses.replace
    given: frozenset[str] | None = field(default=None, metadata={"transient": True, "cli": False})

    def for_mask(self, method: str | None, carries_fisher: bool) -> TrainConfig:
        """This config, with the defaults of a mask scored with `method` for what was not given:
        its learning rate, and the retain penalty where the mask carries the retain Fisher."""
        lr = default_lr(method) if self.lr is None else self.lr
        weight = self.retain_weight
        if weight is None:
            weight = DEFAULT_RETAIN_WEIGHT if carries_fisher else 0.0
        return replace(self, lr=lr, retain_weight=weight)

    def __post_init__(self) -> None:
        if self.lr is not None and not 0 < self.lr <= MAX_LR:
            raise PieceError(f"--lr must be positive and at most {MAX_LR:g}, got {self.lr}")
        check_seed(self.seed)
        if self.schedule not in SCHEDULES:
            raise PieceError(f"unknown --schedule '{self.schedule}'; use constant, linear or cosine")
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise PieceError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("max_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise PieceError(f"--{name.replace('_', '-')} must be at least 1")
        if not (self.norm_lr_scale >= 0 and math.isfinite(self.norm_lr_scale)):
            raise PieceError("--norm-lr-scale must be a number >= 0")
        if self.warmup_steps < 0:
            raise PieceError("--warmup-steps must not be negative")
        for name in ("weight_decay", "clip"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):  # also refuses nan
                raise PieceError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if self.given is None:  # made now (dataclasses.replace keeps what the maker gave)
            self.given = frozenset({"budget_on"} if self.budget_on is not None else ())
        if "budget_on" in self.given and self.drift_budget is None:
            raise PieceError(
                "--budget-on says what --drift-budget stops on; give --drift-budget too, or leave it out"
            )
        self.budget_on = self.budget_on or "measured"
        if self.budget_on not in ("predicted", "measured"):
            raise PieceError(f"unknown --budget-on '{self.budget_on}'; use predicted or measured")
        if self.drift_budget is not None and not (self.drift_budget > 0 and math.isfinite(self.drift_budget)):
            raise PieceError(f"--drift-budget must be a positive, finite number, got {self.drift_budget}")
        weight = self.retain_weight
        if weight is not None and not (weight >= 0 and math.isfinite(weight)):
            raise PieceError(f"--retain-weight must be a finite number >= 0, got {self.retain_weight}")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise PieceError("--betas must be two numbers in [0, 1), e.g. 0.9,0.95")

    @classmethod
    def from_json(cls, data):
        """A recorded config (a delta's hyperparameters, a resumable state): its values are what the
        run used, defaults included, not what a user gave."""
        return None if data is None else cls(**cls.json_values(data), given=frozenset())

    @property
    def needs_fisher(self) -> bool:
        """The run reads the retain Fisher a piece-r mask carries: a budget on the predicted drift,
        or the retain penalty."""
        return bool((self.drift_budget and self.budget_on == "predicted") or self.retain_weight)

    def check_fisher(self, available: bool, method: str | None = None) -> None:
        """PieceError when the run needs the retain Fisher (needs_fisher) and the mask will not carry
        it (`method`: how the mask is scored, if known)."""
        if self.needs_fisher and not available:
            how = f"; --method {method} has none" if method else ": score with --method piece-r --retain ..."
            raise PieceError(
                "--budget-on predicted and --retain-weight need a mask that carries the retain Fisher "
                f"(--method piece-r){how}"
            )

    def resume_key(self) -> dict:
        """The settings a resumed run must share with the interrupted one (where it stops, and how
        often it measures or saves, may change)."""
        keep = self.to_json()
        for free in ("max_steps", "epochs", "eval_every", "save_every", "drift_budget", "budget_on"):
            keep.pop(free)
        return keep
