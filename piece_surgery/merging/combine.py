"""Deltas combined on one tensor: W = W_base + sum_i scale_i x delta_i, with each entry's recorded
base value checked against the weights it meets, the exactness rule (TensorDelta.applied_to), and
the conflict policies (sum, mean, ties, error). Folders (plan.py) and live models (live.py) merge
through it, so both agree bit for bit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

import torch

from piece_surgery.formats.delta import Delta, TensorDelta
from piece_surgery.runtime.dtypes import same_bits
from piece_surgery.runtime.errors import PieceError


@dataclass
class ScaledDelta:
    """One delta of a merge: its entries, its scale, and how to name it in messages."""

    delta: Delta
    scale: float
    label: str


@dataclass
class TensorPart:
    """One delta's entries of one tensor, at its scale; how messages name it, what it is applied
    to, and how a user applies it anyway (empty: there is no way)."""

    entries: TensorDelta
    scale: float
    label: str
    target: str = "this base"
    force_hint: str = "pass --force to apply it anyway (task arithmetic)"
    compact_hint: str = "to apply a compact delta onto another base, give --original-base"
    refused_as: str | None = None  # the start of a refusal, if not "<label> was not made from <target>"

    def refusal(self, what: str) -> PieceError:
        hint = f"; {self.force_hint}" if self.force_hint else ""
        start = self.refused_as or f"{self.label} was not made from {self.target}"
        return PieceError(f"{start}: {what}{hint}")


@dataclass
class Overlap:
    shared: int = 0  # entries touched by more than one delta
    chained: int = 0  # ... where a later delta was made on top of an earlier one (sequential)
    conflicts: int = 0  # ... where deltas made from the same base both change the entry
    sign_disagreements: int = 0  # ... conflicts whose changes point in opposite directions
    mismatched: int = 0  # entries whose base matched neither the base nor the stack so far

    def add(self, other: Overlap) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


# ---------------------------------------------------------------- combining deltas on one tensor


def combine(
    name: str,
    base_flat: torch.Tensor,
    parts: list[TensorPart],
    *,
    on_conflict: str = "sum",
    force: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, Overlap]:
    """New values at the union of the deltas' indices: W = W_base + sum_i scale_i * delta_i.

    Each delta's recorded base values are checked per entry against the weights it meets: the stack
    so far (the first delta, or a delta trained on top of the earlier ones) or the original base (a
    delta trained side by side from the same base). At scale 1 on matching weights the tuned value
    is written as is, so apply reproduces a tuned checkpoint bit for bit. An entry several deltas
    made side by side change (a conflict) gets base + the sum of their changes ("sum"), their mean
    ("mean"), or the sum of those that agree with the sign of the sum ("ties", as TIES-merging
    elects a sign per entry; Yadav et al. 2023).

    `base_flat` is the tensor's base values, 1-D in its dtype, on the CPU. Returns (union of the
    parts' flat indices, sorted int64; the values there in the base's dtype; the overlap counts).
    Raises PieceError for an entry on neither the stack nor the base, a dtype that differs from
    the base's (both unless `force`), or a conflict under `on_conflict="error"`.
    """
    if len(parts) == 1:
        return _combine_one(name, base_flat, parts[0], force=force)
    union = torch.unique(torch.cat([p.entries.indices for p in parts]))
    base_u = base_flat[union]
    current = base_u.clone()
    stack = _Branches(len(parts), base_u)
    overlap = Overlap()
    for i, part in enumerate(parts):
        pos = torch.searchsorted(union, part.entries.indices)
        delta = _matched(name, part, current[pos], base_u[pos])
        _check_dtype(name, part, base_flat.dtype, force)
        new, on_current = delta.applied_to(current[pos], part.scale)
        recorded = delta.base.to(base_flat.dtype)
        on_base = same_bits(base_u[pos], recorded)
        chained, conflicting = stack.place(i, pos, recorded)
        mismatch = ~on_current & ~on_base & ~chained
        overlap.chained += int(chained.sum())
        overlap.mismatched += int(mismatch.sum())
        _refuse(name, part, int(mismatch.sum()), int(conflicting.sum()), on_conflict, force)
        stack.add(i, pos, part.scale * delta.change(), delta.tuned.to(base_flat.dtype))
        current[pos] = new
    conflicted, change, disagree = stack.resolved(on_conflict)
    current = torch.where(conflicted, (base_u.double() + change).to(base_flat.dtype), current)
    _refuse_overflow(name, union, current, base_u)
    overlap.shared = int((stack.touched > 1).sum())
    overlap.conflicts = int(conflicted.sum())
    overlap.sign_disagreements = int(disagree.sum())
    return union, current, overlap


class _Branches:
    """Which deltas at each entry of a tensor build on which (combine's bookkeeping).

    A delta made on top of another (its recorded base is what that delta left) extends that
    delta's branch; one made side by side (from the same base, or under --force from any other)
    starts a branch of its own. An entry
    with one branch takes the values applied in turn (exact); an entry with several is a conflict:
    base + the policy over the branches' total changes, whatever order the deltas came in. What
    the deltas record decides, so the policy holds with --force on another base too."""

    def __init__(self, parts: int, base: torch.Tensor):
        n = base.numel()
        self.branch_of = torch.full((parts, n), -1, dtype=torch.long)  # part -> its branch per entry
        self.left = torch.zeros((parts, n), dtype=base.dtype)  # what each part left (its tuned values)
        self.totals = torch.zeros((parts, n), dtype=torch.float64)  # per branch (its first part's index)
        self.touched = torch.zeros(n, dtype=torch.int32)

    def place(self, i: int, pos: torch.Tensor, recorded: torch.Tensor):
        """(chained, conflicting): where part `i` extends an earlier part's branch, and where it
        starts another beside existing ones. Every entry that ends with more than one branch is a
        conflict (resolved() counts them), whatever base each branch records: deltas made side by
        side from one base, or (under --force) from different bases."""
        first = self.touched[pos] == 0
        branch = torch.full((pos.numel(),), i, dtype=torch.long)
        chained = torch.zeros(pos.numel(), dtype=torch.bool)
        for j in reversed(range(i)):  # the latest delta it was made on
            extends = ~chained & (self.branch_of[j, pos] >= 0) & same_bits(self.left[j, pos], recorded)
            branch = torch.where(extends, self.branch_of[j, pos], branch)
            chained |= extends
        self.branch_of[i, pos] = branch
        return chained, ~first & ~chained

    def add(self, i: int, pos: torch.Tensor, change: torch.Tensor, tuned: torch.Tensor) -> None:
        branch = self.branch_of[i, pos]
        self.totals[branch, pos] += change
        self.left[i, pos] = tuned
        self.touched[pos] += 1

    def resolved(self, on_conflict: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(conflicted entries, the change each gets, entries whose branches disagree in sign)."""
        present = torch.zeros_like(self.totals, dtype=torch.bool)
        for branches in self.branch_of:
            valid = branches >= 0
            present[branches[valid], torch.nonzero(valid).flatten()] = True
        count = present.sum(0)
        total = self.totals.sum(0)
        positive, negative = self.totals.clamp(min=0).sum(0), self.totals.clamp(max=0).sum(0)
        if on_conflict == "mean":
            change = total / count.clamp(min=1).double()
        elif on_conflict == "ties":  # the branches that agree with the sign of the sum (TIES-merging)
            change = torch.where(total > 0, positive, torch.where(total < 0, negative, 0.0))
        else:
            change = total
        conflicted = count > 1
        return conflicted, change, conflicted & (positive > 0) & (negative < 0)


def _matched(name: str, part: TensorPart, *candidates: torch.Tensor) -> TensorDelta:
    """A compact delta records a digest of its base values, not the values: they are the first of
    the candidates (the stack so far, the original base) the digest matches."""
    delta = part.entries.matched(*candidates)
    if delta is None:
        raise dataclasses.replace(part, force_hint=part.compact_hint).refusal(
            f"tensor '{name}' differs from the base values its digest records"
        )
    return delta


def _check_dtype(name: str, part: TensorPart, dtype: torch.dtype, force: bool) -> None:
    if part.entries.dtype != dtype and not force:
        raise part.refusal(f"tensor '{name}' is {part.entries.dtype} in the delta but {dtype} there")


def _refuse(name: str, part: TensorPart, mismatched: int, conflicts: int, on_conflict: str, force: bool):
    if mismatched and not force:
        raise part.refusal(
            f"tensor '{name}' differs at {mismatched} of its {part.entries.indices.numel()} entries"
        )
    if conflicts and on_conflict == "error":
        raise PieceError(
            f"{part.label} changes {conflicts} entries of '{name}' that an earlier delta also changes; "
            "choose --on-conflict sum, mean or ties"
        )


def merge_one(
    name: str, current: torch.Tensor, part: TensorPart, *, force: bool
) -> tuple[TensorDelta, torch.Tensor, int]:
    """One delta's entries of one tensor onto the weights' `current` values there (1-D, the weights'
    dtype, CPU): its base resolved (a compact delta's digest), checked (dtype and per-entry base
    values: refused unless `force`), and the exactness rule applied (TensorDelta.applied_to).
    Returns the resolved delta, the new values and the count of entries not on its base. Every
    way of applying a delta (a folder, a loaded model, DeltaSwitcher) goes through here."""
    delta = _matched(name, part, current)
    _check_dtype(name, part, current.dtype, force)
    new, on_base = delta.applied_to(current, part.scale)
    mismatched = int((~on_base).sum())
    _refuse(name, part, mismatched, 0, "sum", force)
    _refuse_overflow(name, delta.indices, new, current)
    return delta, new, mismatched


def _refuse_overflow(name: str, indices: torch.Tensor, new: torch.Tensor, current: torch.Tensor) -> None:
    """A merge may not turn a finite weight into inf or NaN (scales too large for the dtype)."""
    overflowed = torch.nonzero(~torch.isfinite(new) & torch.isfinite(current)).flatten()
    if overflowed.numel():
        raise PieceError(
            f"merging sets entry {int(indices[overflowed[0]])} of '{name}' to {float(new[overflowed[0]])}: "
            f"the scales are too large for {new.dtype}"
        )


def _combine_one(
    name: str, base_flat: torch.Tensor, part: TensorPart, *, force: bool
) -> tuple[torch.Tensor, torch.Tensor, Overlap]:
    """combine() for the common case of one delta: no union to build, the same result."""
    delta, new, mismatched = merge_one(name, base_flat[part.entries.indices], part, force=force)
    return delta.indices, new, Overlap(mismatched=mismatched)


# ---------------------------------------------------------------- apply to checkpoint folders


# ---------------------------------------------------------------- in place on a loaded model
