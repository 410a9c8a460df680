"""The scoring methods, in one table: what each needs from the data pass, where it comes from, and
the function that turns the pass's accumulators into per-entry scores.

For every micro-batch b, g_b is the gradient of that micro-batch's mean token loss; the data pass
keeps sum_b g_b ("the sum") and/or sum_b g_b^2 ("the squares") per eligible entry, in fp32.
Adding an estimator is one row here (and its test); `score`, `train`, the CLI's option checks and
the README's method table all read this table.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from piece_surgery.runtime.errors import PieceError

if TYPE_CHECKING:  # annotations only: the table is read by the CLI, which must not import torch
    import torch

    from piece_surgery.runtime.distributed import World

Scores = dict[str, "torch.Tensor"]


class _Lazy:
    """importance.py, imported when a score is computed (it needs torch)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module("piece_surgery.scoring.importance"), name)


importance = _Lazy()


@dataclass
class ScoreInputs:
    """What a method's score function may read: the accumulators of the data pass (fp32 tensors of
    each eligible tensor's shape, or of this rank's shard under FSDP; consumed), the weights (for
    data-free methods), and how to add a number up over the ranks."""

    params: dict[str, torch.nn.Parameter]  # noqa: F821 - a string annotation
    sums: Scores
    squares: Scores
    retain_fisher: Scores | None = None  # piece-r: F_retain = sum over retain micro-batches of g^2
    retain_damping: float = 0.01  # piece-r: the quantile of F_retain added to it
    seed: int = 0
    world: World | None = None
    sum_over_ranks: Callable[[float], float] = float


@dataclass(frozen=True)
class Method:
    name: str
    formula: str  # the score, as the docs write it (in code type)
    source: str  # "PIECE" (the paper's estimators), "baseline" or "ours"
    keeps_sum: bool  # the data pass keeps sum_b g_b
    keeps_squares: bool  # the data pass keeps sum_b g_b^2
    uses_retain: bool  # a first pass over retain text gives F_retain (--retain and its options)
    score: Callable[[ScoreInputs], tuple[Scores, float | None]]  # scores, and piece-r's damping value
    note: str = ""  # what the formula is, in words

    @property
    def needs_data(self) -> bool:
        return self.keeps_sum or self.keeps_squares


def _no_damping(function: Callable[[ScoreInputs], Scores]):
    return lambda inputs: (function(inputs), None)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "piece-r",
            "(sum_b g_b)^2 / (F_retain + delta)",
            "ours",
            keeps_sum=True,
            keeps_squares=False,
            uses_retain=True,
            score=lambda i: importance.piece_r_scores(
                i.sums, i.retain_fisher, i.retain_damping, sum_over_ranks=i.sum_over_ranks
            ),
        ),
        Method(
            "piece-s",
            "|sum_b g_b| / sqrt(sum_b g_b^2 + 1)",
            "PIECE",
            keeps_sum=True,
            keeps_squares=True,
            uses_retain=False,
            score=_no_damping(lambda i: importance.piece_s_scores(i.sums, i.squares, damping=1.0)),
        ),
        Method(
            "piece-f",
            "sum_b g_b^2",
            "PIECE",
            keeps_sum=False,
            keeps_squares=True,
            uses_retain=False,
            score=_no_damping(lambda i: i.squares),
            note="(empirical diagonal Fisher)",
        ),
        Method(
            "gradient",
            "|sum_b g_b|",
            "baseline",
            keeps_sum=True,
            keeps_squares=False,
            uses_retain=False,
            score=_no_damping(lambda i: {k: v.abs_() for k, v in i.sums.items()}),
        ),
        Method(
            "magnitude",
            "|theta|",
            "baseline",
            keeps_sum=False,
            keeps_squares=False,
            uses_retain=False,
            score=_no_damping(lambda i: importance.magnitude_scores(i.params, i.world)),
        ),
        Method(
            "random",
            "",
            "baseline",
            keeps_sum=False,
            keeps_squares=False,
            uses_retain=False,
            score=_no_damping(lambda i: importance.random_scores(i.params, i.seed, i.world)),
            note="seeded uniform",
        ),
        Method(
            "piece-s-rel",
            "|sum_b g_b| / sqrt(sum_b g_b^2 + mean(sum_b g_b^2))",
            "ours",
            keeps_sum=True,
            keeps_squares=True,
            uses_retain=False,
            score=_no_damping(
                lambda i: importance.piece_s_scores(
                    i.sums, i.squares, damping=importance.mean_of(i.squares, i.sum_over_ranks)
                )
            ),
        ),
    )
}

DEFAULT_METHOD = "piece-r"


def method_named(name: str) -> Method:
    """The method called `name`; PieceError for an unknown name."""
    if name not in METHODS:
        raise PieceError(f"unknown method '{name}'; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def markdown_table() -> str:
    """The README's table of methods, made from this one (a test keeps the two the same)."""
    rows = ["| `--method` | score | needs data |", "|---|---|---|"]
    for m in METHODS.values():
        label = f"`{m.name}`"
        if m.name == DEFAULT_METHOD:
            label += " (default, ours)"
        elif m.source == "ours":
            label += " (ours)"
        needs = "yes, and retain text" if m.uses_retain else "yes" if m.needs_data else "no"
        formula = m.formula.replace("|", "\\|")  # a pipe ends a table cell, even inside code
        score = " ".join(part for part in (f"`{formula}`" if formula else "", m.note) if part)
        rows.append(f"| {label} | {score} | {needs} |")
    return "\n".join(rows)
