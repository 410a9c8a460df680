"""Merging deltas into a checkpoint folder, planned, then executed: `plan_apply` checks the deltas
against the base's names, shapes and dtypes and decides everything (output shards, conflict
policy, force); `check_apply` (a dry run) and `execute_apply` (the real run) then merge every
touched tensor through the same `combine`, so both report the same overlap.
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from piece_surgery.formats.merge_recipe import CONFLICT_POLICIES, RECIPE_FILE, Recipe, card_section
from piece_surgery.io.filepatch import copy_with_patches
from piece_surgery.io.outputs import atomic_path
from piece_surgery.io.sniff import INDEX_FILE, SINGLE_FILE
from piece_surgery.merging.combine import Overlap, ScaledDelta, TensorPart, combine
from piece_surgery.merging.naming import as_stored_in
from piece_surgery.models.checkpoint import Checkpoint, open_checkpoint
from piece_surgery.models.layout import (
    ShardReader,
    model_files,
    save_shard,
    shard_metadata,
    weight_files,
    write_index,
)
from piece_surgery.runtime.errors import PieceError


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
        hints = {}
        if self.recipe is not None and self.recipe.source is not None:  # flags are refused with it
            hints = {
                "force_hint": "set force: true in the recipe to apply it anyway (task arithmetic)",
                "compact_hint": "to apply a compact delta onto another base, set original_base in the recipe",
            }
        return [
            TensorPart(d.delta.tensors[name], d.scale, d.label, **hints)
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
    base: Checkpoint,
    deltas: list[ScaledDelta],
    *,
    on_conflict: str = "sum",
    force: bool = False,
    shard_size: int | None = None,
    output: Path | None = None,
    recipe: Recipe | None = None,
    original_base: str | None = None,
    delta_refs: list[str] | None = None,
) -> ApplyPlan:
    """Check the deltas (loaded, with their scales) against the base (names, shapes) and plan the
    output's shards (`output`, checked by the caller; None: a dry run). `original_base` reads a
    compact delta's base values from the base it was made from. The per-entry base values are
    checked while merging (check_apply or execute_apply)."""
    if on_conflict not in CONFLICT_POLICIES:
        raise PieceError(f"unknown --on-conflict '{on_conflict}'; use sum, mean, ties or error")
    if not deltas:
        raise PieceError("give at least one delta to apply")
    if original_base is not None:
        flag = recipe.named("original_base") if recipe is not None else "--original-base"
        if all(t.base is not None for d in deltas for t in d.delta.tensors.values()):
            raise PieceError(f"{flag} is for compact deltas, and none of these is: leave it out")
        _recover_base_values(deltas, original_base, flag)
    deltas = [replace(d, delta=as_stored_in(d.delta, base.layout, base.skeleton)) for d in deltas]
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
        delta_refs=list(delta_refs) if delta_refs is not None else [d.label for d in deltas],
        shards=_shard_plan(base, shard_size),
        output_bytes=sum(info.nbytes for info in base.layout.values()),
        on_conflict=on_conflict,
        force=force,
        output=Path(output) if output is not None else None,
        resharded=shard_size is not None,
        recipe=recipe,
    )


def _recover_base_values(deltas: list[ScaledDelta], original_base: str, flag: str) -> None:
    """Compact deltas record a digest of their base values; read the values from the base they
    were made from (checked against the digest), so they apply onto another base too."""
    original = open_checkpoint(original_base, what="original base")
    with original.reader() as reader:
        for d in deltas:
            for name, t in list(d.delta.tensors.items()):
                if t.base is not None:
                    continue
                if name not in original.layout:
                    raise PieceError(f"{flag} has no tensor '{name}' that {d.label} changes")
                values = reader.get(name).reshape(-1)[t.indices].clone()
                if not t.matches(values):
                    raise PieceError(f"{d.label} was not made from {flag}: tensor '{name}' differs")
                d.delta.tensors[name] = t.with_base(values)


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
    _warn_mismatch(result.overlap, dry_run=True)
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
        for item in model_files(base.folder):  # config, tokenizer, templates, card: the model's own
            target = tmp / item.relative_to(base.folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, target)
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


def _warn_mismatch(overlap: Overlap, *, dry_run: bool = False) -> None:
    if overlap.mismatched:
        done = (
            "--force would apply them anyway (a dry run writes nothing)"
            if dry_run
            else "applied with --force"
        )
        warnings.warn(
            f"{overlap.mismatched} entries did not match the deltas' recorded base values; {done}",
            stacklevel=3,
        )
