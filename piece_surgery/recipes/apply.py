"""The `apply` recipe: merge deltas into a base checkpoint folder, from a command line or a merge
recipe (YAML); the merged folder records the recipe that made it.
"""

from __future__ import annotations

import time
from pathlib import Path

from piece_surgery.formats.artifacts import Artifact, open_artifact
from piece_surgery.formats.merge_recipe import Recipe, parse_size, scales_for
from piece_surgery.io.outputs import check_output
from piece_surgery.io.sniff import CHECKPOINT
from piece_surgery.merging.combine import ScaledDelta
from piece_surgery.merging.plan import ApplyResult, check_apply, execute_apply, plan_apply
from piece_surgery.models.checkpoint import open_checkpoint
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.progress import Progress


def _refuse_duplicates(artifacts: list[Artifact], recipe: Recipe) -> None:
    """The same delta twice (by path or by content) is almost always a typo, not a doubled scale."""
    seen: dict[tuple, str] = {}
    if recipe.source is not None:  # apply --recipe refuses the flags
        advice = "list it once with its scale, or set allow_duplicates: true in the recipe"
    else:
        advice = "give it once with a --scale, or pass --allow-duplicates"
    for a in artifacts:
        for key in (("path", a.path.resolve()), ("digest", a.delta.weights_sha256)):
            if key in seen:
                raise PieceError(f"delta '{a.ref}' is the same delta as '{seen[key]}'; {advice}")
            seen[key] = a.ref


def _plan(recipe: Recipe, *, dry_run: bool, overwrite: bool):
    """Check the output (unless a dry run), open the base and the deltas, plan the merge."""
    base_ref = recipe.resolve(recipe.base)
    delta_refs = [recipe.resolve(path) for path, _ in recipe.deltas]
    original_base = recipe.resolve(recipe.original_base) if recipe.original_base else None
    if not delta_refs:
        raise PieceError("give at least one delta to apply")
    scales = scales_for(delta_refs, [s for _, s in recipe.deltas])
    output = None
    if not dry_run:
        from_file = recipe.source is not None
        output = check_output(
            recipe.output_path,
            overwrite=overwrite,
            inputs=(base_ref, *delta_refs, original_base, recipe.source if from_file else None),
            protected=[recipe.folder] if from_file else [],  # a recipe's folder: outputs lie inside it
            kind=CHECKPOINT,
        )
    base = open_checkpoint(base_ref, what="base")
    artifacts = [open_artifact(ref, want="delta") for ref in delta_refs]
    if not recipe.allow_duplicates:
        _refuse_duplicates(artifacts, recipe)
    deltas = [ScaledDelta(a.delta, s, f"delta '{a.ref}'") for a, s in zip(artifacts, scales, strict=True)]
    shard_size = parse_size(recipe.shard_size, recipe.named("shard_size"))
    if shard_size is not None and shard_size < 1:
        raise PieceError(f"{recipe.named('shard_size')} must be positive")
    return plan_apply(
        base,
        deltas,
        on_conflict=recipe.on_conflict,
        force=recipe.force,
        shard_size=shard_size,
        output=output,
        recipe=recipe,
        original_base=original_base,
        delta_refs=[path for path, _ in recipe.deltas],
    )


def apply_recipe(
    recipe: Recipe, *, dry_run: bool = False, overwrite: bool = False, quiet: bool = True
) -> ApplyResult:
    """Plan and run a merge recipe (from `load_recipe(path)` or `Recipe.from_arguments`): paths
    resolve against the recipe's folder; with `dry_run`, every check runs and nothing is written.
    The merged folder records the recipe."""

    start = time.perf_counter()
    refs = [recipe.base, *(path for path, _ in recipe.deltas), recipe.original_base]
    try:
        plan = _plan(recipe, dry_run=dry_run, overwrite=overwrite)
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
