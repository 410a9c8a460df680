"""How to score (ScoreOptions): the method, the density, what is eligible, and how piece-r takes
its retain Fisher; checked when made, with the help text the CLI shows on each field. No torch.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from piece_surgery.models.eligible import DEFAULT_EXCLUDE
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.options import check_density, check_fields, check_seed
from piece_surgery.runtime.paths import is_present
from piece_surgery.runtime.records import JsonRecord
from piece_surgery.scoring.methods import DEFAULT_METHOD, METHODS, method_named

LABELS = ("empirical", "sampled")


NORMALIZATIONS = ("none", "tensor")


def check_labels(labels: str) -> None:
    if labels not in LABELS:
        raise PieceError(f"unknown --retain-labels '{labels}'; use empirical or sampled")


def check_normalization(how: str) -> None:
    if how not in NORMALIZATIONS:
        raise PieceError(f"unknown --normalize '{how}'; use none or tensor")


# piece-r drifted far less than PIECE-S for the same domain gain, and delta = the 1st percentile of
# F_retain less than the 10th (docs/evidence.md)
DEFAULT_RETAIN_DAMPING = 0.01
SELF = "self"  # --retain self: text sampled from the model itself
GENERAL = "general"  # --retain general: the general-text set shipped with the package
CHAT = "chat"  # --retain chat: the model's own answers to the shipped instructions, as chats
NAMED_SETS = (SELF, GENERAL, CHAT)  # retain sources named by a word, not a path
DRIFT_SETS = (SELF, GENERAL)  # the words eval --general and train --eval-general take (chat: retain only)


def check_drift_set(ref: str | Path, flag: str) -> None:
    """A set the drift is measured on (`eval --general`, `train --eval-general`): a data file, `self`
    or `general`. PieceError, one line naming the words taken, for a word that is none of these
    (nothing is at its path), checked before any data is read."""
    name = str(ref)
    if name in DRIFT_SETS or is_present(Path(name).expanduser()):
        return
    raise PieceError(
        f"{flag} '{name}': no such data file, and not a word {flag} takes; give a data file, self "
        "(text the model writes itself) or general (the shipped general text)"
    )


# piece-r without --retain keeps the shipped general-text set: on every domain of
# benchmarks/multidomain.py it drifted less than the model's own text at equal gain, on Wikipedia and
# on the model's own chat answers alike (docs/evidence.md, "Seven domains")
DEFAULT_RETAIN = GENERAL
# piece-r's own options: None in a record means not given (the default applies, and another method
# may leave them out)
RETAIN_DEFAULTS = {"retain_labels": "empirical", "retain_damping": DEFAULT_RETAIN_DAMPING}
SELF_DEFAULTS = {"self_samples": 64, "self_length": 128}


@dataclass
class ScoreOptions(JsonRecord):
    """How to score; checked when made (every rule between its fields included), so mistakes fail in
    milliseconds, before any loading. The CLI's flags are its fields (cli/options.py)."""

    method: str = field(
        default=DEFAULT_METHOD, metadata={"help": ", ".join(METHODS) + ".", "metavar": "METHOD"}
    )
    density: float = field(
        default=0.001, metadata={"help": "Fraction of eligible entries to select.", "metavar": "FRACTION"}
    )
    batch_size: int = field(
        default=1, metadata={"help": "Micro-batch size: one gradient g_b per micro-batch."}
    )
    include: list[str] = field(
        default_factory=list, metadata={"help": "Regex on tensor names; repeatable.", "metavar": "REGEX"}
    )
    exclude: list[str] = field(
        default_factory=lambda: list(DEFAULT_EXCLUDE),
        metadata={
            "help": "Regex: matching tensors are not eligible unless an --include names them; "
            "repeatable. [default: embed]",
            "metavar": "REGEX",
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed (random method, self text, sampled labels)."})
    offload_accumulators: bool = field(
        default=False,
        metadata={"help": "Keep the fp32 sums in host memory (large models on GPU).", "flag": True},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Trade compute for activation memory.", "flag": True}
    )
    normalize: str = field(
        default="none",
        metadata={
            "help": "none, or tensor: scores divided by each tensor's mean before the top-k (experts "
            "stored one tensor each: the mean of the fused weight the model holds).",
            "metavar": "none|tensor",
        },
    )
    # piece-r: the text whose behaviour to keep (file paths: never recorded, a mask names its
    # sources by name and sha256), how its Fisher is taken and damped, what `--retain self` writes
    # None: not decided yet (the library's recipes add theirs with `with_retain`)
    retain: list[str] | None = field(
        default=None,
        metadata={
            "help": "piece-r: text whose behaviour to keep: a data file, general (the shipped set), "
            "chat (the model's own answers to shipped instructions) or self; repeatable. "
            "[default: general]",
            "metavar": "FILE|general|chat|self",
            "transient": True,
        },
    )
    retain_labels: str | None = field(
        default=None,
        metadata={
            "help": "piece-r: empirical (the text's tokens) or sampled (drawn from the model). "
            "[default: empirical]",
            "metavar": "empirical|sampled",
        },
    )
    retain_damping: float | None = field(
        default=None,
        metadata={
            "help": "piece-r: delta = this quantile of F_retain. [default: 0.01]",
            "metavar": "QUANTILE",
        },
    )
    self_samples: int | None = field(
        default=None, metadata={"help": "--retain self: texts to write. [default: 64]"}
    )
    self_length: int | None = field(
        default=None,
        metadata={
            "help": "--retain self: tokens per text; --retain chat: most tokens per answer. [default: 128]",
            "metavar": "TOKENS",
        },
    )
    # the fields the maker gave (the others took their defaults): kept through dataclasses.replace
    given: frozenset[str] | None = field(default=None, metadata={"transient": True, "cli": False})

    def __post_init__(self) -> None:
        check_fields(self)  # what the CLI parses, Python callers may give as anything
        if self.given is None:
            defaults = {**RETAIN_DEFAULTS, **SELF_DEFAULTS}
            self.given = frozenset(n for n in defaults if getattr(self, n) is not None)
            self.given |= {"retain"} if self.retain else set()
        self.retain = None if self.retain is None else [str(r) for r in self.retain]
        for name, value in {**RETAIN_DEFAULTS, **SELF_DEFAULTS}.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        method = method_named(self.method)
        check_seed(self.seed)
        check_normalization(self.normalize)
        check_density(self.density)
        check_labels(self.retain_labels)
        if self.batch_size < 1:
            raise PieceError("--batch-size must be at least 1")
        if not (0.0 <= self.retain_damping <= 1.0):  # also refuses nan
            raise PieceError(f"--retain-damping {self.retain_damping} is a quantile: give a number in [0, 1]")
        if self.self_samples < 1 or self.self_length < 2:
            raise PieceError("--self-samples must be at least 1 and --self-length at least 2")
        for pattern in [*self.include, *self.exclude]:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise PieceError(f"pattern '{pattern}' is not a valid regex: {exc}") from exc
        self._check_retain(method.uses_retain)

    def _check_retain(self, uses_retain: bool) -> None:
        """Retain text and its options only for a method that uses them, the self-text options only
        with the text the model writes (--self-length with self or chat, --self-samples with self),
        and each retain source named once."""
        retain_given = [n for n in ("retain", *RETAIN_DEFAULTS, *SELF_DEFAULTS) if n in self.given]
        if retain_given and not uses_retain:
            flag = retain_given[0].replace("_", "-")
            raise PieceError(f"--{flag} is for --method piece-r (got {self.method}); leave it out")
        written = () if self.retain is None else [s for s in self.retain if s in (SELF, CHAT)]
        if "self_samples" in self.given and self.retain is not None and SELF not in self.retain:
            raise PieceError("--self-samples is for --retain self: add --retain self")
        if "self_length" in self.given and self.retain is not None and not written:
            raise PieceError("--self-length is for --retain self or --retain chat: add one of them")

    @classmethod
    def from_json(cls, data):
        """Recorded options (a mask's): their values are what the run used, defaults included, not
        what a user gave."""
        return None if data is None else cls(**cls.json_values(data), given=frozenset())

    def with_retain(self, sources) -> ScoreOptions:
        """These options with `sources` (paths, general, self) added to their retain sets, which are
        then decided (the rules between the fields checked again)."""
        sources = [*(self.retain or []), *map(str, sources)]
        return dataclasses.replace(
            self, retain=sources, given=self.given | ({"retain"} if sources else set())
        )

    @property
    def retain_sources(self) -> list[str]:
        """The retain sets scoring reads: piece-r without any keeps DEFAULT_RETAIN."""
        retain = self.retain or []
        return [DEFAULT_RETAIN] if method_named(self.method).uses_retain and not retain else retain
