"""Merging deltas: W = W_base + sum_i scale_i x delta_i, into a checkpoint folder or a loaded model.

`plan_apply` checks the deltas against the base's names, shapes and dtypes and decides everything
(output shards, conflict policy, force); `check_apply` (a dry run) and `execute_apply` (the real run)
then merge every touched tensor through the same `combine`, so both report the same overlap.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
import warnings
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import torch

from piece_surgery.formats.artifacts import Artifact, open_artifact
from piece_surgery.formats.delta import Delta, TensorDelta
from piece_surgery.formats.merge_recipe import (
    CONFLICT_POLICIES,
    RECIPE_FILE,
    Recipe,
    card_section,
    parse_size,
    scales_for,
)
from piece_surgery.io.filepatch import copy_with_patches
from piece_surgery.io.outputs import atomic_path, check_output
from piece_surgery.models.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    Checkpoint,
    ShardReader,
    model_files,
    open_checkpoint,
    save_shard,
    shard_metadata,
    stored_names,
    weight_files,
    write_index,
)
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
        chained, side_by_side = stack.place(i, pos, recorded, on_base)
        mismatch = ~on_current & ~on_base & ~chained
        overlap.chained += int(chained.sum())
        overlap.mismatched += int(mismatch.sum())
        _refuse(name, part, int(mismatch.sum()), int(side_by_side.sum()), on_conflict, force)
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
    delta's branch; one made side by side from the same base starts a branch of its own. An entry
    with one branch takes the values applied in turn (exact); an entry with several is a conflict:
    base + the policy over the branches' total changes, whatever order the deltas came in. What
    the deltas record decides, so the policy holds with --force on another base too."""

    def __init__(self, parts: int, base: torch.Tensor):
        n = base.numel()
        self.recorded_base = base.clone()  # the base the first delta at each entry records
        self.branch_of = torch.full((parts, n), -1, dtype=torch.long)  # part -> its branch per entry
        self.left = torch.zeros((parts, n), dtype=base.dtype)  # what each part left (its tuned values)
        self.totals = torch.zeros((parts, n), dtype=torch.float64)  # per branch (its first part's index)
        self.touched = torch.zeros(n, dtype=torch.int32)

    def place(self, i: int, pos: torch.Tensor, recorded: torch.Tensor, on_base: torch.Tensor):
        """(chained, side by side): where part `i` extends an earlier part's branch, and where it
        starts another beside existing ones (a conflict)."""
        first = self.touched[pos] == 0
        self.recorded_base[pos] = torch.where(first, recorded, self.recorded_base[pos])
        branch = torch.full((pos.numel(),), i, dtype=torch.long)
        chained = torch.zeros(pos.numel(), dtype=torch.bool)
        for j in reversed(range(i)):  # the latest delta it was made on
            extends = ~chained & (self.branch_of[j, pos] >= 0) & same_bits(self.left[j, pos], recorded)
            branch = torch.where(extends, self.branch_of[j, pos], branch)
            chained |= extends
        side_by_side = ~first & ~chained & (on_base | same_bits(self.recorded_base[pos], recorded))
        self.branch_of[i, pos] = branch
        return chained, side_by_side

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
        raise dataclasses.replace(
            part, force_hint="to apply a compact delta onto another base, give --original-base"
        ).refusal(f"tensor '{name}' differs from the base values its digest records")
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


@dataclass
class ApplyPlan:
    """Everything a merge into a checkpoint folder needs, decided before any weight is read."""

    base: Checkpoint
    deltas: list[ScaledDelta]
    shards: dict[str, list[str]]  # output file -> tensor names, in order
    output_bytes: int
    on_conflict: str = "sum"
    force: bool = False
    output: Path | None = None  # None: a dry run
    resharded: bool = False  # True: tensors are regrouped (--shard-size), not patched in their files
    recipe: Recipe | None = None  # what the output records about how it was made
    delta_refs: list[str] = field(default_factory=list)  # the deltas as the user named them

    def parts(self, name: str) -> list[TensorPart]:
        return [
            TensorPart(d.delta.tensors[name], d.scale, d.label)
            for d in self.deltas
            if name in d.delta.tensors
        ]

    @property
    def changed_tensors(self) -> list[str]:
        return sorted({name for d in self.deltas for name in d.delta.tensors})

    def union_indices(self, name: str) -> torch.Tensor:
        """The sorted flat indices of `name` that any of the plan's deltas changes."""
        parts = [p.entries.indices for p in self.parts(name)]
        return parts[0] if len(parts) == 1 else torch.unique(torch.cat(parts))


@dataclass
class ApplyResult:
    """What a merge changed: entries per tensor, and how the deltas overlapped."""

    plan: ApplyPlan
    touched: dict[str, int] = field(default_factory=dict)
    overlap: Overlap = field(default_factory=Overlap)
    seconds: float = 0.0

    @property
    def dry_run(self) -> bool:
        return self.plan.output is None

    def to_json(self) -> dict:
        """What `apply --json` prints (schema in docs/cli.md)."""
        plan = self.plan
        recipe = plan.recipe
        return {
            "output": None if self.dry_run else str(plan.output),
            "dry_run": self.dry_run,
            "base": recipe.base if recipe else plan.base.identity.name,
            "deltas": [
                {"path": label, "scale": d.scale, "entries": d.delta.count}
                for label, d in zip(plan.delta_refs, plan.deltas, strict=True)
            ],
            "entries": sum(self.touched.values()),
            "tensors": len(self.touched),
            "overlap": dataclasses.asdict(self.overlap),
            "output_files": len(plan.shards),
            "output_bytes": plan.output_bytes,
            "seconds": round(self.seconds, 3),
        }

    def merge(self, name: str, flat: torch.Tensor, *, write: bool = True) -> None:
        """Merge the deltas' entries of tensor `name` (its base values, flat) and record what
        changed; with `write`, the merged values are written into `flat` in place."""
        plan = self.plan
        union, values, overlap = combine(
            name, flat, plan.parts(name), on_conflict=plan.on_conflict, force=plan.force
        )
        if write:
            flat[union] = values
        self.touched[name] = int(union.numel())
        self.overlap.add(overlap)


def plan_apply(
    base_ref: str,
    delta_refs: list[str],
    *,
    scales: list[float] | None = None,
    on_conflict: str = "sum",
    force: bool = False,
    shard_size: int | None = None,
    output: Path | None = None,
    overwrite: bool = False,
    allow_duplicates: bool = False,
    recipe: Recipe | None = None,
    original_base: str | None = None,
) -> ApplyPlan:
    """Check the deltas against the base (names, shapes) and the output, and plan the shards.

    The per-entry base values are checked while merging (check_apply or execute_apply).
    """
    if on_conflict not in CONFLICT_POLICIES:
        raise PieceError(f"unknown --on-conflict '{on_conflict}'; use sum, mean, ties or error")
    if not delta_refs:
        raise PieceError("give at least one delta to apply")
    scales = scales_for(delta_refs, scales)
    if output is not None:
        from_file = recipe is not None and recipe.source is not None
        output = check_output(
            output,
            overwrite=overwrite,
            inputs=(base_ref, *delta_refs, original_base, recipe.source if from_file else None),
            protected=[recipe.folder] if from_file else [],  # a recipe's folder: outputs lie inside it
        )
    base = open_checkpoint(base_ref, what="base")
    artifacts = [open_artifact(ref, want="delta") for ref in delta_refs]
    if not allow_duplicates:
        _refuse_duplicates(artifacts)
    deltas = [ScaledDelta(a.delta, s, f"delta '{a.ref}'") for a, s in zip(artifacts, scales, strict=True)]
    if original_base is not None:
        if all(t.base is not None for d in deltas for t in d.delta.tensors.values()):
            raise PieceError("--original-base is for compact deltas, and none of these is: leave it out")
        _recover_base_values(deltas, original_base)
    deltas = [replace(d, delta=as_stored_in(base, d.delta)) for d in deltas]
    for d in deltas:
        for name, t in d.delta.tensors.items():
            if name not in base.layout:
                raise PieceError(f"{d.label} changes tensor '{name}', which the base does not have")
            if tuple(base.layout[name].shape) != tuple(t.shape):
                raise PieceError(
                    f"{d.label}: tensor '{name}' has shape {list(t.shape)} in the delta but "
                    f"{list(base.layout[name].shape)} in the base"
                )
    if shard_size is not None and shard_size < 1:
        raise PieceError("--shard-size must be positive")
    return ApplyPlan(
        base=base,
        deltas=deltas,
        delta_refs=[recipe_path for recipe_path, _ in recipe.deltas] if recipe else list(delta_refs),
        shards=_shard_plan(base, shard_size),
        output_bytes=sum(info.nbytes for info in base.layout.values()),
        on_conflict=on_conflict,
        force=force,
        output=Path(output) if output is not None else None,
        resharded=shard_size is not None,
        recipe=recipe,
    )


def as_stored_in(base: Checkpoint, delta: Delta) -> Delta:
    """The delta under the names `base` stores its tensors by, as loading pairs them (a name with
    or without the base-model prefix, another layout of a vision-language model), and, for a tied
    weight the delta's base stored once (the head loaded as the embedding), every copy `base`
    stores of it, so that they load tied again. A new Delta; the one given is not changed."""
    needs_prefix = any(name not in base.layout for name in delta.tensors)
    needs_twins = any(t.loads_as for t in delta.tensors.values())
    if not (needs_prefix or needs_twins):
        return delta
    skeleton = base.skeleton()
    base_names = stored_names(skeleton, base.layout)
    loads_into = {stored: name for name, stored in stored_names(skeleton, delta.tensors).items()}
    tensors = {}
    for name, t in delta.tensors.items():
        stored = name if name in base.layout else base_names.get(loads_into.get(name, name), name)
        tensors[stored] = t
        for twin in t.loads_as or ():
            copy = base_names.get(twin)
            if copy is not None and copy not in delta.tensors and copy not in tensors:
                tensors[copy] = replace(t, loads_as=())  # this base stores the twin: change it too
    return replace(delta, tensors=tensors)


def _recover_base_values(deltas: list[ScaledDelta], original_base: str) -> None:
    """Compact deltas record a digest of their base values; read the values from the base they
    were made from (checked against the digest), so they apply onto another base too."""
    original = open_checkpoint(original_base, what="original base")
    with original.reader() as reader:
        for d in deltas:
            for name, t in list(d.delta.tensors.items()):
                if t.base is not None:
                    continue
                if name not in original.layout:
                    raise PieceError(f"--original-base has no tensor '{name}' that {d.label} changes")
                values = reader.get(name).reshape(-1)[t.indices].clone()
                if not t.matches(values):
                    raise PieceError(f"{d.label} was not made from --original-base: tensor '{name}' differs")
                d.delta.tensors[name] = t.with_base(values)


def _refuse_duplicates(artifacts: list[Artifact]) -> None:
    """The same delta twice (by path or by content) is almost always a typo, not a doubled scale."""
    seen: dict[tuple, str] = {}
    for a in artifacts:
        for key in (("path", a.path.resolve()), ("digest", a.delta.weights_sha256)):
            if key in seen:
                raise PieceError(
                    f"delta '{a.ref}' is the same delta as '{seen[key]}'; give it once with a --scale, "
                    "or pass --allow-duplicates"
                )
            seen[key] = a.ref


def _shard_plan(base: Checkpoint, shard_size: int | None) -> dict[str, list[str]]:
    layout = base.layout
    if shard_size is None:
        files = weight_files(base.folder)
        plan: dict[str, list[str]] = {}
        for name in sorted(layout, key=lambda n: (files[n], n)):
            plan.setdefault(files[name], []).append(name)
        return plan
    groups: list[list[str]] = [[]]
    used = 0
    for name in sorted(layout, key=lambda n: (layout[n].file, n)):
        if groups[-1] and used + layout[name].nbytes > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += layout[name].nbytes
    if len(groups) == 1:
        return {SINGLE_FILE: groups[0]}
    n = len(groups)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


def check_apply(plan: ApplyPlan) -> ApplyResult:
    """A dry run: merge every touched tensor in memory (checking each entry's base value), write nothing."""
    result = ApplyResult(plan)
    with plan.base.reader() as reader:
        for name in plan.changed_tensors:
            result.merge(name, reader.get(name).reshape(-1), write=False)
    _warn_mismatch(result.overlap)
    return result


def execute_apply(plan: ApplyPlan, progress=None) -> ApplyResult:
    """Write the merged checkpoint shard by shard into a temporary folder, then rename it to the
    plan's output."""
    if plan.output is None:
        raise ValueError("the plan has no output: use check_apply for a dry run")
    result = ApplyResult(plan)
    base = plan.base
    metadata = shard_metadata(base.folder) or {"format": "pt"}
    changed = set(plan.changed_tensors)
    with atomic_path(plan.output, is_dir=True) as tmp, base.reader() as reader:
        for item in model_files(base.folder):  # config, tokenizer, card: what belongs to the model
            shutil.copy2(item, tmp / item.name)
        if plan.recipe is not None:
            _record_recipe(plan, tmp)
        weight_map: dict[str, str] = {}
        for file, names in plan.shards.items():
            weight_map.update(dict.fromkeys(names, file))
            touched = [n for n in names if n in changed]
            patched = not plan.resharded and _patch_shard(plan, result, file, touched, tmp)
            if not patched:
                _write_shard(result, reader, names, touched, tmp / file, metadata)
            if progress:
                progress(1)
        # the output keeps the base's layout family (an index, even over one shard, as mergekit
        # writes) unless --shard-size regroups it
        if not plan.resharded and (base.folder / INDEX_FILE).is_file():
            shutil.copy2(base.folder / INDEX_FILE, tmp / INDEX_FILE)
        elif len(plan.shards) > 1:
            write_index(tmp, weight_map, plan.output_bytes)
    _warn_mismatch(result.overlap)
    return result


def _record_recipe(plan: ApplyPlan, folder: Path) -> None:
    """The recipe beside the weights, and a section of the card (the base's card, or a new one)."""
    recorded = plan.recipe.recorded(plan.output)
    (folder / RECIPE_FILE).write_text(recorded.to_yaml())
    card = folder / "README.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8", errors="replace").rstrip("\n") + "\n"
    else:
        base_model = plan.base.identity.repo_id
        text = (
            "---\n"
            + (f"base_model: {base_model}\n" if base_model else "")
            + "tags:\n- piece-surgery\n- merge\n---\n"
        )
    card.write_text(text + card_section(recorded, plan.output))


def _patch_shard(plan: ApplyPlan, result: ApplyResult, file: str, touched: list[str], tmp: Path) -> bool:
    """The output file is the input file with some entries changed: untouched bytes are copied by
    the kernel, changed tensors read, merged and written back in place."""
    patches = {name: (plan.union_indices(name), partial(result.merge, name)) for name in touched}
    return copy_with_patches(plan.base.folder / file, tmp / file, patches)


def _write_shard(
    result: ApplyResult,
    reader: ShardReader,
    names: list[str],
    touched: list[str],
    path: Path,
    metadata: dict[str, str],
) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        tensor = reader.get(name)
        if name in touched:
            # a private copy: writing into the memory-mapped tensor would fault page by page
            tensor = tensor.clone()
            result.merge(name, tensor.view(-1))
        tensors[name] = tensor
    save_shard(tensors, path, metadata)


def _warn_mismatch(overlap: Overlap) -> None:
    if overlap.mismatched:
        warnings.warn(
            f"{overlap.mismatched} entries did not match the deltas' recorded base values; "
            "applied with --force",
            stacklevel=3,
        )


def apply_recipe(
    recipe: Recipe, *, dry_run: bool = False, overwrite: bool = False, quiet: bool = True
) -> ApplyResult:
    """Plan and run a merge recipe (from `load_recipe(path)` or `Recipe.from_arguments`): paths
    resolve against the recipe's folder; with `dry_run`, every check runs and nothing is written.
    The merged folder records the recipe."""
    from piece_surgery.runtime.progress import Progress

    start = time.perf_counter()
    refs = [recipe.base, *(path for path, _ in recipe.deltas), recipe.original_base]
    try:
        plan = plan_apply(
            recipe.resolve(recipe.base),
            [recipe.resolve(path) for path, _ in recipe.deltas],
            scales=[s for _, s in recipe.deltas],
            on_conflict=recipe.on_conflict,
            force=recipe.force,
            shard_size=parse_size(recipe.shard_size),
            output=None if dry_run else recipe.output_path,
            overwrite=overwrite,
            allow_duplicates=recipe.allow_duplicates,
            recipe=recipe,
            original_base=recipe.resolve(recipe.original_base) if recipe.original_base else None,
        )
    except PieceError as exc:
        read_as_ids = [r for r in refs if r and recipe.source is not None and recipe.reads_as_repo_id(r)]
        if not read_as_ids:
            raise
        raise PieceError(
            f"{exc} ('{read_as_ids[0]}' is not beside the recipe, in '{recipe.folder}', so it was read as "
            "a Hub repo id: a recipe's paths are relative to its own folder)"
        ) from exc
    if dry_run:
        result = check_apply(plan)
    else:
        with Progress(len(plan.shards), "writing", quiet=quiet, unit="shard") as bar:
            result = execute_apply(plan, progress=bar.advance)
    result.seconds = time.perf_counter() - start
    return result


def apply(
    base_ref: str,
    delta_refs: list[str],
    output: Path,
    *,
    scales: list[float] | None = None,
    on_conflict: str = "sum",
    force: bool = False,
    shard_size: str | int | None = None,
    overwrite: bool = False,
    allow_duplicates: bool = False,
    original_base: str | None = None,
    quiet: bool = True,
) -> ApplyResult:
    """The `apply` recipe from arguments: W = W_base + sum_i scale_i x delta_i, written to `output`
    shard by shard (see apply_recipe; `shard_size` as `--shard-size` takes it, e.g. "2GB")."""
    recipe = Recipe.from_arguments(
        base_ref,
        list(delta_refs),
        output,
        scales=scales,
        on_conflict=on_conflict,
        force=force,
        allow_duplicates=allow_duplicates,
        shard_size=shard_size,
        original_base=original_base,
    )
    return apply_recipe(recipe, overwrite=overwrite, quiet=quiet)


# ---------------------------------------------------------------- in place on a loaded model


@dataclass
class AppliedDelta:
    """What apply_to_model changed, to restore it bit for bit with revert()."""

    model: torch.nn.Module
    saved: dict[str, tuple[torch.Tensor, torch.Tensor]]  # param name -> (indices, original values)

    def revert(self) -> None:
        params = dict(self.model.named_parameters())
        write_entries(
            self.model, [(pname, params[pname], idx, values) for pname, (idx, values) in self.saved.items()]
        )


def write_entries(
    model: torch.nn.Module, writes: list[tuple[str, torch.nn.Parameter, torch.Tensor, torch.Tensor]]
):
    """Write each (parameter name, parameter, flat indices, values) into the live model, then check
    that it took effect: the parameter is still the one the model holds under that name, and its
    entries read back bit for bit. PieceError otherwise (a library replaced the model's weights)."""
    with torch.no_grad():
        for _, param, idx, values in writes:
            param.view(-1)[idx.to(param.device)] = values.to(param.device, param.dtype)
    for pname, param, idx, values in writes:
        try:
            held = model.get_parameter(pname)
        except AttributeError:
            held = None
        written = param.detach().view(-1)[idx.to(param.device)]
        if held is not param or not bits_equal(written, values.to(param.device, param.dtype)):
            raise PieceError(
                f"writing the delta's entries into '{pname}' did not take effect: the model no longer "
                "holds that weight (something replaced it after loading); load the model again"
            )


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b hold the same bits (NaNs included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(as_int), b.view(as_int))


def model_tensors(model: torch.nn.Module, delta: Delta) -> dict[str, tuple[str, torch.nn.Parameter]]:
    """The model parameter each of the delta's tensors is (stored names paired with the model's as
    loading pairs them, checkpoint.stored_names): delta tensor name -> (parameter name, parameter).

    Tied weights are one parameter under several names: a delta that changes several of them (a
    checkpoint that stores both copies) lists each, and here the parameter appears once, under the
    first; the copies must change alike. PieceError for a tensor the model lacks, or tied copies
    changed differently."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loads_into = {stored: name for name, stored in stored_names(model, delta.tensors).items()}
    found: dict[str, tuple[str, torch.nn.Parameter]] = {}
    first_of: dict[int, str] = {}  # id(parameter) -> the delta tensor that stands for it
    for name in sorted(delta.tensors):
        pname = loads_into.get(name)
        if pname not in params:
            raise PieceError(f"the delta changes '{name}', which the model does not have")
        param = params[pname]
        if id(param) in first_of:
            _check_same_change(delta, first_of[id(param)], name)
            continue
        first_of[id(param)] = name
        found[name] = (pname, param)
    changed = set(loads_into.values())
    for name, (pname, param) in found.items():
        _refuse_untying(delta, name, [n for n, p in params.items() if p is param and n != pname], changed)
    return found


def _refuse_untying(delta: Delta, name: str, twins: list[str], changed: set[str]) -> None:
    """This model holds `name` and `twins` as one weight. If the delta's base stored a twin apart
    and the delta leaves it (it changes a head the files stored beside the embedding, say), files
    with the delta applied load the two untied, which one weight cannot be: refused. `changed`:
    the model's names for every tensor the delta changes."""
    loads_as = delta.tensors[name].loads_as
    if loads_as is None:  # a delta written before this was recorded: applied as one weight
        return
    for twin in twins:
        if twin not in changed and twin not in loads_as:
            raise PieceError(
                f"the delta changes '{name}' but not '{twin}', which its base stored apart and this model "
                "ties to it (one weight): files with the delta applied load the two untied; apply it to "
                "files (piece-surgery apply), or load this model untied"
            )


def _check_same_change(delta: Delta, kept: str, other: str) -> None:
    a, b = delta.tensors[kept], delta.tensors[other]
    same = torch.equal(a.indices, b.indices) and bool(same_bits(a.tuned, b.tuned).all())
    if not same:
        raise PieceError(
            f"the delta changes '{kept}' and '{other}' differently, but this model ties them (one "
            "weight): load the model with them untied (both stored, as the merged folder holds them)"
        )


def apply_to_model(
    model: torch.nn.Module, delta: Delta, *, scale: float = 1.0, force: bool = False
) -> AppliedDelta:
    """Apply a delta to a loaded model in place, exactly as `apply` writes a folder (merge_one: the
    same per-entry base check and exactness rule); returns a handle whose revert() restores the
    weights bit for bit. PieceError for a delta of another model (names, shapes, base values or
    dtype, unless `force`)."""
    planned = []
    with torch.no_grad():
        for name, (pname, param) in model_tensors(model, delta).items():
            t = delta.tensors[name]
            if tuple(param.shape) != tuple(t.shape):
                raise PieceError(
                    f"tensor '{name}' has shape {list(param.shape)} in the model, "
                    f"{list(t.shape)} in the delta"
                )
            idx = t.indices.to(param.device)
            original = param.view(-1)[idx].detach().clone()
            part = TensorPart(t, scale, "the delta", "this model", "pass force=True to apply it anyway")
            _, new, _ = merge_one(name, original.cpu(), part, force=force)
            planned.append((pname, param, idx, original, new))
    # every tensor checked before any is written: a refused delta leaves the model as it was
    write_entries(model, [(pname, param, idx, new) for pname, param, idx, _, new in planned])
    return AppliedDelta(model, {pname: (idx.cpu(), original) for pname, _, idx, original, _ in planned})


def revert_delta(model: torch.nn.Module, delta: Delta) -> None:
    """Put back the delta's recorded base values (for a model that holds the delta at scale 1)."""
    if any(t.base is None for t in delta.tensors.values()):
        raise PieceError(
            "a compact delta does not hold its base values: revert with the handle apply_to_model gave"
        )
    writes = [
        (pname, param, delta.tensors[name].indices, delta.tensors[name].base)
        for name, (pname, param) in model_tensors(model, delta).items()
    ]
    write_entries(model, writes)
