"""The `piece-surgery` command line: parse options, call one library recipe, print. No logic here.

Every command takes --json (its schema is in docs/cli.md) and -q/--quiet. A user error prints one
line `error: ...` on stderr (and, under --json, {"error": ...} on stdout) and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from piece_surgery.errors import PieceError

# score.DEFAULT_METHOD, repeated: the library (and torch) is imported only once a command runs
DEFAULT_METHOD = "piece-r"

app = typer.Typer(
    help="PIECE importance masks, sparse fine-tuning and exact sparse deltas for HF checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: readable at 80 columns, option names never clipped
)
out = Console()
err = Console(stderr=True)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
Device = Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda or mps.")]
Dtype = Annotated[str, typer.Option(help="auto (the checkpoint's), float32, bfloat16 or float16.")]
TrustRemote = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow model code from the checkpoint (off by default).")
]
Output = Annotated[Path, typer.Option("-o", "--output", help="Where to write the result.")]
Patterns = Annotated[list[str] | None, typer.Option(help="Regex on tensor names; repeatable.")]
Retain = Annotated[
    list[str] | None,
    typer.Option(help="piece-r: text whose behaviour to keep: a data file, or self. [default: self]"),
]
RetainLabels = Annotated[
    str | None, typer.Option(help="empirical (the text's tokens) or sampled (drawn from the model).")
]
RetainDamping = Annotated[
    float | None, typer.Option(help="piece-r: delta = this quantile of F_retain. [default: 0.01]")
]
SelfSamples = Annotated[int | None, typer.Option(help="--retain self: texts to write. [default: 64]")]
SelfLength = Annotated[int | None, typer.Option(help="--retain self: tokens per text. [default: 128]")]
Avoid = Annotated[list[str] | None, typer.Option(help="A mask or delta whose entries to leave out.")]
Compact = Annotated[
    bool, typer.Option("--compact", help="Write format 2: index gaps and tuned values, ~half the bytes.")
]
Fsdp = Annotated[
    bool,
    typer.Option(
        "--fsdp", help="Shard the model over the ranks (torchrun): for models one device cannot hold."
    ),
]


def _version(value: bool) -> None:
    if value:
        from piece_surgery import __version__

        print(f"piece-surgery {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """PIECE importance masks, sparse fine-tuning and exact sparse deltas for HF checkpoints."""


def _emit(
    command: str, result: dict, as_json: bool, lines: list[str] = (), table: Table | None = None
) -> None:
    from piece_surgery import distributed

    world = distributed.current()
    if world is not None and not world.is_main:  # rank 0 speaks for every rank
        return
    if as_json:
        print(json.dumps({"command": command, **result}, indent=2, default=str))
        return
    if table is not None:
        out.print(table)
    for line in lines:
        out.print(line, highlight=False, soft_wrap=True)


@app.command("score")
def score_command(
    model: Annotated[str, typer.Argument(help="Model folder or Hub repo id[@revision].")],
    output: Output,
    data: Annotated[Path | None, typer.Option(help=".txt (one example per line) or .jsonl.")] = None,
    method: Annotated[
        str, typer.Option(help="piece-r (ours), piece-s, piece-f, gradient, magnitude, random, piece-s-rel.")
    ] = DEFAULT_METHOD,
    normalize: Annotated[
        str, typer.Option(help="none, or tensor: scores divided by each tensor's mean before the top-k.")
    ] = "none",
    density: Annotated[float, typer.Option(help="Fraction of eligible entries to select.")] = 0.001,
    batch_size: Annotated[int, typer.Option(help="Micro-batch size: one gradient g_b per micro-batch.")] = 1,
    max_samples: Annotated[int | None, typer.Option(help="Use at most this many examples.")] = None,
    max_length: Annotated[int, typer.Option(help="Truncate examples to this many tokens.")] = 512,
    include: Patterns = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Regex: matching tensors are not eligible. [default: embed]")
    ] = None,
    offload_accumulators: Annotated[
        bool,
        typer.Option(
            "--offload-accumulators", help="Keep the fp32 sums in host memory (large models on GPU)."
        ),
    ] = False,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Trade compute for activation memory.")
    ] = False,
    fsdp: Fsdp = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    retain: Retain = None,
    retain_labels: RetainLabels = None,
    retain_damping: RetainDamping = None,
    self_samples: SelfSamples = None,
    self_length: SelfLength = None,
    avoid: Avoid = None,
    seed: Annotated[int, typer.Option(help="Seed (random method, self text, sampled labels).")] = 0,
    trust_remote_code: TrustRemote = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Estimate per-entry importance on a domain's data and write the top-density mask."""
    from piece_surgery.artifacts import mask_breakdown
    from piece_surgery.score import ScoreOptions, score_checkpoint

    retain_options = _given(
        retain_labels=retain_labels,
        retain_damping=retain_damping,
        self_samples=self_samples,
        self_length=self_length,
    )
    options = ScoreOptions(
        method=method,
        density=density,
        batch_size=batch_size,
        include=include or [],
        exclude=["embed"] if exclude is None else exclude,
        seed=seed,
        offload_accumulators=offload_accumulators,
        gradient_checkpointing=gradient_checkpointing,
        normalize=normalize,
        **retain_options,
    )
    _refuse_unused_retain_options(method, retain, retain_options)
    start = time.perf_counter()
    mask, stats, dataset = score_checkpoint(
        model,
        data,
        options,
        retain=retain or [],
        avoid=avoid or [],
        output=output,
        overwrite=overwrite,
        max_length=max_length,
        max_samples=max_samples,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        quiet=quiet,
        fsdp=fsdp,
    )
    summary = mask_breakdown(mask)
    result = {
        "output": str(output),
        "model": model,
        "method": method,
        "density": density,
        "entries": mask.k,
        "eligible": mask.eligible,
        "tensors": summary["tensors"],
        "norm_share": summary["norm_share"],
        "examples": stats.examples,
        "skipped_examples": dataset.skipped if dataset else 0,
        "tokens": stats.tokens,
        "mean_loss": stats.mean_loss if stats.batches else None,
        "seconds": round(time.perf_counter() - start, 3),
    }
    lines = [
        f"wrote {output}: {mask.k:,} of {mask.eligible:,} eligible entries ({method}, density {density})",
        f"{summary['tensors']} tensors touched; norm weights hold {summary['norm_share']:.1%}",
    ]
    if dataset is not None:
        lines.append(
            f"{stats.examples} examples, {stats.tokens:,} loss tokens, mean loss {stats.mean_loss:.4f}"
            + (f"; skipped {dataset.skipped} with no loss-bearing token" if dataset.skipped else "")
        )
    _emit("score", result, as_json, lines)


def _given(**options) -> dict:
    """The options the user gave (those left at None take the library's defaults)."""
    return {k: v for k, v in options.items() if v is not None}


def _refuse_unused_retain_options(method: str, retain: list[str] | None, options: dict) -> None:
    """Options that would do nothing: retain options without piece-r, self options without self."""
    if (options or retain) and method != "piece-r":
        given = f"--{next(iter(options)).replace('_', '-')}" if options else "--retain"
        raise PieceError(f"{given} is for --method piece-r (got {method}); leave it out")
    if options.keys() & {"self_samples", "self_length"} and retain and "self" not in retain:
        raise PieceError("--self-samples and --self-length need --retain self (or no --retain)")


def _parse_betas(text: str) -> tuple[float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 2:
        raise PieceError(f"--betas '{text}' must be two numbers, e.g. 0.9,0.95")
    return parts


@app.command("train")
def train_command(
    model: Annotated[str, typer.Argument(help="Model folder or Hub repo id[@revision].")],
    data: Annotated[Path, typer.Option(help="Training data: .txt (one example per line) or .jsonl.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Delta folder to write.")],
    mask: Annotated[str | None, typer.Option(help="Mask from `score` (else: score first on --data).")] = None,
    method: Annotated[
        str | None, typer.Option(help="Scoring method without --mask. [default: piece-r]")
    ] = None,
    density: Annotated[
        float | None, typer.Option(help="Mask density without --mask. [default: 0.001]")
    ] = None,
    score_batch_size: Annotated[int | None, typer.Option(help="Scoring micro-batch. [default: 1]")] = None,
    normalize: Annotated[str | None, typer.Option(help="Score normalisation: none or tensor.")] = None,
    include: Patterns = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Regex not scored. [default: embed]")] = None,
    retain: Retain = None,
    retain_labels: RetainLabels = None,
    retain_damping: RetainDamping = None,
    self_samples: SelfSamples = None,
    self_length: SelfLength = None,
    avoid: Avoid = None,
    drift_budget: Annotated[
        float | None, typer.Option(help="Stop once the predicted drift 1/2 sum F d^2 reaches this.")
    ] = None,
    retain_weight: Annotated[
        float | None,
        typer.Option(
            help="Add retain_weight/2 sum F d^2 to the loss. "
            "[default: 100 with a mask that carries the retain Fisher (piece-r), else 0]"
        ),
    ] = None,
    norm_lr_scale: Annotated[
        float, typer.Option(help="Learning-rate multiplier for norm gains in the mask (1: same lr).")
    ] = 1.0,
    lr: Annotated[
        float | None, typer.Option(help="Learning rate (AdamW). [default: 1e-3 for piece-r masks, else 1e-4]")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the data (unless --max-steps).")] = 1,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per micro-batch.")] = 4,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    max_length: Annotated[int, typer.Option(help="Truncate examples to this many tokens.")] = 512,
    max_samples: Annotated[int | None, typer.Option(help="Use at most this many examples.")] = None,
    schedule: Annotated[str, typer.Option(help="constant, linear or cosine.")] = "constant",
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 0,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    betas: Annotated[str, typer.Option(help="AdamW betas.")] = "0.9,0.95",
    clip: Annotated[float, typer.Option(help="Gradient-norm clip (0: off).")] = 1.0,
    eval_data: Annotated[Path | None, typer.Option(help="Held-out data for eval loss.")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Evaluate every N steps.")] = None,
    save_every: Annotated[int | None, typer.Option(help="Save a resumable state every N steps.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the saved state.")] = False,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Trade compute for activation memory.")
    ] = False,
    fsdp: Fsdp = False,
    compact: Compact = False,
    seed: Annotated[int, typer.Option(help="Data order (and the random method).")] = 0,
    device: Device = "auto",
    dtype: Dtype = "auto",
    trust_remote_code: TrustRemote = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Fine-tune only the masked entries and write a sparse delta."""
    from piece_surgery.score import ScoreOptions
    from piece_surgery.train import train_checkpoint
    from piece_surgery.trainer import TrainConfig

    config = TrainConfig(
        lr=lr,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        schedule=schedule,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        betas=_parse_betas(betas),
        clip=clip,
        eval_every=eval_every,
        save_every=save_every,
        seed=seed,
        gradient_checkpointing=gradient_checkpointing,
        norm_lr_scale=norm_lr_scale,
        drift_budget=drift_budget,
        retain_weight=retain_weight,
    )
    retain_options = _given(
        retain_labels=retain_labels,
        retain_damping=retain_damping,
        self_samples=self_samples,
        self_length=self_length,
    )
    _refuse_unused_retain_options(method or DEFAULT_METHOD, retain, retain_options)
    scoring = _given(
        method=method, density=density, batch_size=score_batch_size, normalize=normalize, **retain_options
    )
    if include is not None or exclude is not None:
        scoring.update(include=include or [], exclude=["embed"] if exclude is None else exclude)
    score_options = ScoreOptions(seed=seed, **scoring) if scoring else None
    start = time.perf_counter()
    trained = train_checkpoint(
        model,
        data,
        output,
        config,
        mask_ref=mask,
        score_options=score_options,
        retain=retain or [],
        avoid=avoid or [],
        eval_data=eval_data,
        max_length=max_length,
        max_samples=max_samples,
        device=device,
        dtype=dtype,
        resume=resume,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        quiet=quiet,
        fsdp=fsdp,
        compact=compact,
    )
    report, lines = _train_report(trained, model, mask, output, time.perf_counter() - start)
    _emit("train", report, as_json, lines)


def _train_report(trained, model: str, mask: str | None, output: Path, seconds: float) -> tuple[dict, list]:
    delta, result, used_mask = trained
    first = result.history[0]["loss"] if result.history else None
    report = {
        "output": str(output),
        "model": model,
        "mask": mask,
        "method": used_mask.info.method,
        "density": used_mask.info.density,
        "mask_entries": used_mask.k,
        "entries": delta.count,
        "tensors": len(delta.tensors),
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "first_train_loss": first,
        "final_train_loss": result.train_loss,
        "final_eval_loss": result.eval_loss,
        "predicted_drift": result.predicted_drift,
        "stopped_by_drift_budget": result.stopped_by_drift_budget,
        "seconds": round(seconds, 3),
    }
    lines = [
        f"wrote {output}: {delta.count:,} changed entries of a {used_mask.k:,}-entry mask, "
        f"{result.steps} steps",
        f"train loss {first:.4f} -> {result.train_loss:.4f}" if first is not None else "no steps run",
    ]
    if result.eval_loss is not None:
        lines.append(f"eval loss {result.eval_loss:.4f}")
    if result.predicted_drift is not None:
        stop = "; stopped at the drift budget" if result.stopped_by_drift_budget else ""
        lines.append(f"predicted drift (1/2 sum F d^2, mean token KL) {result.predicted_drift:.4g}{stop}")
    return report, lines


@app.command("diff")
def diff_command(
    base: Annotated[str, typer.Argument(help="Base checkpoint folder or Hub repo id.")],
    tuned: Annotated[str, typer.Argument(help="Tuned checkpoint of the same architecture.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Delta folder to write.")],
    density: Annotated[
        float | None, typer.Option(help="Keep only this fraction of entries, largest |change| first.")
    ] = None,
    top_k: Annotated[
        int | None, typer.Option(help="Keep only the k entries with the largest |change|.")
    ] = None,
    base_model: Annotated[
        str | None, typer.Option(help="Hub repo id of the base, for the model card.")
    ] = None,
    compact: Compact = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """The sparse delta between two checkpoints (exact, or the largest changes only)."""
    from piece_surgery.delta import write_diff

    start = time.perf_counter()
    delta = write_diff(
        base,
        tuned,
        output,
        density=density,
        top_k=top_k,
        base_model=base_model,
        overwrite=overwrite,
        quiet=quiet,
        compact=compact,
    )
    fractions = delta.info.provenance.changed_fraction
    bytes_per_entry = delta.tensor_bytes / max(delta.count, 1)
    result = {
        "output": str(output),
        "base": base,
        "tuned": tuned,
        "entries": delta.count,
        "tensors": len(delta.tensors),
        "tensor_bytes": delta.tensor_bytes,
        "bytes_per_entry": bytes_per_entry,
        "changed_fraction": fractions,
        "seconds": round(time.perf_counter() - start, 3),
    }
    table = Table(title="changed entries per tensor")
    table.add_column("tensor")
    table.add_column("changed", justify="right")
    table.add_column("fraction", justify="right")
    for name, t in delta.tensors.items():
        table.add_row(name, f"{t.indices.numel():,}", f"{fractions[name]:.4%}")
    lines = [
        f"wrote {output}: {delta.count:,} entries in {len(delta.tensors)} tensors, "
        f"{delta.tensor_bytes:,} bytes ({bytes_per_entry:.1f} per entry)"
    ]
    _emit("diff", result, as_json, lines, None if quiet else table)


def parse_size(text: str | None) -> int | None:
    """`2GB`, `500MB`, `1.5GiB`, `123` (bytes) -> bytes; None stays None."""
    if text is None:
        return None
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            try:
                return int(float(upper[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(upper)
    except ValueError:
        raise PieceError(f"--shard-size '{text}' is not a size; write e.g. 2GB or 500MB") from None


@app.command("apply")
def apply_command(
    base: Annotated[
        str | None, typer.Argument(help="Base checkpoint folder or Hub repo id[@revision].")
    ] = None,
    deltas: Annotated[
        list[str] | None, typer.Argument(help="One or more delta folders or Hub repo ids.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Merged checkpoint folder to write.")
    ] = None,
    recipe: Annotated[
        Path | None,
        typer.Option(help="A YAML recipe: base, deltas, scales, policy, output (instead of the rest)."),
    ] = None,
    scale: Annotated[
        list[float] | None, typer.Option(help="Scale of each delta (once for all, or once per delta).")
    ] = None,
    on_conflict: Annotated[
        str | None,
        typer.Option(help="Entries changed by deltas made side by side: sum, mean, ties or error."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check and print the plan; write nothing.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Apply even where the base differs from the deltas' base.")
    ] = False,
    allow_duplicates: Annotated[
        bool, typer.Option("--allow-duplicates", help="Accept the same delta more than once.")
    ] = False,
    shard_size: Annotated[str | None, typer.Option(help="Re-shard the output, e.g. 2GB.")] = None,
    original_base: Annotated[
        str | None, typer.Option(help="The base compact deltas were made from (to apply them onto another).")
    ] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Merge deltas into a base: W = W_base + sum of scale_i x delta_i, streamed shard by shard."""
    from piece_surgery.merge import check_apply, execute_apply, plan_apply
    from piece_surgery.progress import Progress
    from piece_surgery.recipe import load_recipe

    given = {
        "BASE": base,
        "DELTAS": deltas,
        "--output": output,
        "--scale": scale,
        "--on-conflict": on_conflict,
    }
    given.update(
        {"--force": force or None, "--allow-duplicates": allow_duplicates or None, "--shard-size": shard_size}
    )
    given["--original-base"] = original_base
    if recipe is not None:
        mixed = [name for name, value in given.items() if value]
        if mixed:
            raise PieceError(f"--recipe says everything {mixed[0]} would; give one or the other")
        plan_recipe = load_recipe(recipe)
    else:
        plan_recipe = _recipe_of(
            base, deltas, output, scale, on_conflict, force, allow_duplicates, shard_size
        )
        plan_recipe = dataclasses.replace(plan_recipe, original_base=original_base)
    start = time.perf_counter()
    plan = plan_apply(
        plan_recipe.resolve(plan_recipe.base),
        [plan_recipe.resolve(path) for path, _ in plan_recipe.deltas],
        scales=[s for _, s in plan_recipe.deltas],
        on_conflict=plan_recipe.on_conflict,
        force=plan_recipe.force,
        shard_size=parse_size(plan_recipe.shard_size),
        output=None if dry_run else plan_recipe.folder / plan_recipe.output,
        overwrite=overwrite,
        allow_duplicates=plan_recipe.allow_duplicates,
        recipe=plan_recipe,
        original_base=plan_recipe.resolve(plan_recipe.original_base) if plan_recipe.original_base else None,
    )
    if dry_run:
        merged = check_apply(plan)
    else:
        with Progress(len(plan.shards), "writing", quiet=quiet, unit="shard") as bar:
            merged = execute_apply(plan, progress=bar.advance)
    report, lines = _apply_report(plan, merged, dry_run, time.perf_counter() - start)
    _emit("apply", report, as_json, lines)


def _recipe_of(base, deltas, output, scale, on_conflict, force, allow_duplicates, shard_size):
    """The recipe the command line amounts to (every merged folder carries one)."""
    from piece_surgery.merge import scales_for
    from piece_surgery.recipe import Recipe

    missing = [
        name for name, value in (("BASE", base), ("DELTAS", deltas), ("--output", output)) if not value
    ]
    if missing:
        raise PieceError(f"apply needs {', '.join(missing)} (or --recipe)")
    scales = scales_for(deltas, scale)
    return Recipe(
        base=base,
        deltas=list(zip(deltas, scales, strict=True)),
        output=str(output),
        on_conflict=on_conflict or "sum",
        force=force,
        allow_duplicates=allow_duplicates,
        shard_size=shard_size,
    )


def _apply_report(plan, merged, dry_run: bool, seconds: float) -> tuple[dict, list[str]]:
    o = merged.overlap
    recipe = plan.recipe
    report = {
        "output": None if dry_run else str(plan.output),
        "dry_run": dry_run,
        "base": recipe.base,
        "deltas": [
            {"path": path, "scale": d.scale, "entries": d.delta.count}
            for (path, _), d in zip(recipe.deltas, plan.deltas, strict=True)
        ],
        "entries": sum(merged.touched.values()),
        "tensors": len(merged.touched),
        "overlap": o.__dict__,
        "output_files": len(plan.shards),
        "output_bytes": plan.output_bytes,
        "seconds": round(seconds, 3),
    }
    lines = [
        f"{len(plan.deltas)} delta(s) onto {recipe.base}: {report['entries']:,} entries in "
        f"{report['tensors']} tensors; output {report['output_bytes']:,} bytes in "
        f"{report['output_files']} file(s)",
        f"overlap: {o.shared:,} shared entries ({o.chained:,} chained, {o.conflicts:,} conflicting, "
        f"{o.sign_disagreements:,} with opposite signs)",
        "dry run: nothing written" if dry_run else f"wrote {plan.output}",
    ]
    return report, lines


@app.command("push")
def push_command(
    path: Annotated[Path, typer.Argument(help="A delta folder (or a mask file) to upload.")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo id, user/name; created if missing.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
    revision: Annotated[str | None, typer.Option(help="Branch to push to (created if missing).")] = None,
    commit_message: Annotated[str | None, typer.Option(help="Commit message.")] = None,
    token: Annotated[str | None, typer.Option(help="Hub token (else HF_TOKEN or the stored login).")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead.")] = False,
    base_model: Annotated[
        str | None, typer.Option(help="Hub repo id of the base, for the card (when it was a local folder).")
    ] = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Share a delta (or a mask) on the Hugging Face Hub."""
    from piece_surgery.artifacts import push

    result = push(
        path,
        repo_id,
        private=private,
        revision=revision,
        commit_message=commit_message,
        token=token,
        create_pr=create_pr,
        base_model=base_model,
        quiet=quiet,
    )
    lines = [f"pushed {path} to {result['url']} ({result['revision']}, commit {result['commit'][:12]})"]
    if result["pr_url"]:
        lines.append(f"pull request: {result['pr_url']}")
    _emit("push", {"path": str(path), **result}, as_json, lines)


@app.command("inspect")
def inspect_command(
    path: Annotated[str, typer.Argument(help="A mask file or a delta folder (path or Hub repo id).")],
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Summarise a mask or a delta: per layer, per module kind, size."""
    from piece_surgery.artifacts import open_artifact, summarize

    summary = summarize(open_artifact(path))
    if as_json:
        _emit("inspect", {"path": path, **summary}, as_json)
        return
    if not quiet:
        out.print(_summary_table(summary, "by_kind", "module kind"))
        out.print(_summary_table(summary, "by_layer", "layer"))
    entries, tensors = summary["entries"], summary["tensors"]
    if summary["kind"] == "mask":
        lines = [
            f"mask {path}: {entries:,} of {summary['eligible']:,} eligible entries "
            f"({summary['method']}, density {summary['density']})",
            f"{tensors} tensors touched; norm weights hold {summary['norm_share']:.1%}",
            f"size on disk {summary['file_bytes']:,} bytes",
        ]
    else:
        lines = [
            f"delta {path}: {entries:,} changed entries in {tensors} tensors",
            f"{summary['tensor_bytes']:,} bytes of tensor data, "
            f"{summary['bytes_per_entry']:.2f} bytes per changed entry",
        ]
    _emit("inspect", summary, False, lines)


def _summary_table(summary: dict, key: str, title: str) -> Table:
    table = Table(title=f"{summary['kind']} by {title}")
    table.add_column(title)
    table.add_column("entries", justify="right")
    table.add_column("of", justify="right")
    table.add_column("fraction", justify="right")
    for name, row in summary[key].items():
        frac = row["entries"] / row["size"] if row["size"] else 0.0
        table.add_row(name, f"{row['entries']:,}", f"{row['size']:,}", f"{frac:.4%}")
    return table


@app.command("export")
def export_command(
    delta: Annotated[str, typer.Argument(help="A delta folder or Hub repo id.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Adapter folder to write.")],
    to: Annotated[str, typer.Option("--to", help="The format: peft (a SHiRA adapter).")] = "peft",
    base: Annotated[
        str | None, typer.Option(help="The delta's base (default: the Hub repo it records).")
    ] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Write a delta as an adapter other tools load: PEFT's PeftModel.from_pretrained."""
    from piece_surgery.peft_interop import export_peft

    if to != "peft":
        raise PieceError(f"unknown --to '{to}'; the one format is peft")
    start = time.perf_counter()
    exported = export_peft(delta, output, base_ref=base, overwrite=overwrite)
    result = {
        "output": str(output),
        "delta": delta,
        "to": to,
        "entries": exported.entries,
        "padding_entries": exported.padding,
        "r": exported.r,
        "linear_layers": exported.linear_layers,
        "saved_modules": exported.saved_modules,
        "adapter_bytes": exported.adapter_bytes,
        "seconds": round(time.perf_counter() - start, 3),
    }
    saved = exported.adapter_bytes
    lines = [
        f"wrote {output}: a SHiRA adapter (r={exported.r}) of {exported.entries:,} entries in "
        f"{exported.linear_layers} linear layers, padded with {exported.padding:,} unchanged ones",
        f"{saved:,} bytes ({saved / max(exported.entries, 1):.1f} per entry)"
        + (f"; norm gains saved whole: {len(exported.saved_modules)}" if exported.saved_modules else ""),
    ]
    _emit("export", result, as_json, lines)


@app.command("import")
def import_command(
    adapter: Annotated[str, typer.Argument(help="A PEFT adapter folder or Hub repo id (SHiRA, LoRA, ...).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Delta folder to write.")],
    base: Annotated[
        str | None, typer.Option(help="The adapter's base (default: the one its config names).")
    ] = None,
    compact: Compact = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """A delta from a PEFT adapter that merges into its base: every entry the merge changes."""
    from piece_surgery.peft_interop import import_peft

    start = time.perf_counter()
    delta = import_peft(adapter, output, base_ref=base, overwrite=overwrite, compact=compact)
    result = {
        "output": str(output),
        "adapter": adapter,
        "entries": delta.count,
        "tensors": len(delta.tensors),
        "seconds": round(time.perf_counter() - start, 3),
    }
    _emit(
        "import",
        result,
        as_json,
        [f"wrote {output}: {delta.count:,} entries in {len(delta.tensors)} tensors"],
    )


@app.command("tiny-model")
def tiny_model_command(
    output: Annotated[Path, typer.Argument(help="Folder to write the tiny random model to.")],
    arch: Annotated[str, typer.Option(help="llama, gpt2 or qwen2.")] = "llama",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Write a tiny random causal LM with a tokenizer (for trying the tool offline)."""
    from piece_surgery.testing import write_tiny_model

    start = time.perf_counter()
    write_tiny_model(output, arch, seed=seed, overwrite=overwrite)
    result = {
        "output": str(output),
        "arch": arch,
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 3),
    }
    _emit("tiny-model", result, as_json, [f"wrote tiny {arch} model to {output}"])


# ---------------------------------------------------------------- the entry point


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that temporaries are cleaned up as on Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def _warn(message, category, filename, lineno, file=None, line=None) -> None:
    err.print(f"warning: {message}", highlight=False, soft_wrap=True)


def _report(message: str, code: int, as_json: bool) -> int:
    import os

    err.print(f"error: {message}", highlight=False, soft_wrap=True)  # every rank says it
    if as_json and os.environ.get("RANK", "0") == "0":  # one JSON object, as on success
        print(json.dumps({"error": message, "exit_code": code}))
    return code


def _run(as_json: bool) -> int:
    """The command, with user errors, interrupts and termination reported as one line."""
    try:
        code = app(standalone_mode=False)
        return code if isinstance(code, int) else 0
    except PieceError as exc:
        return _report(str(exc), EXIT_USER_ERROR, as_json)
    except typer.TyperException as exc:  # a usage error: unknown option, missing argument, bad value
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `piece-surgery`: the help, as click does
            print(exc.format_message())
            return EXIT_USER_ERROR
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        return _report(f"{exc.format_message()}{hint}", EXIT_USER_ERROR, as_json)
    except (typer.Abort, KeyboardInterrupt):
        return _report("interrupted; nothing was written", EXIT_INTERRUPTED, as_json)
    except Terminated:
        return _report("terminated; nothing was written", EXIT_TERMINATED, as_json)


def main() -> None:
    import warnings

    from piece_surgery import distributed

    warnings.showwarning = _warn
    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = _run("--json" in sys.argv[1:])
    finally:
        # the command is over and reported: a launcher that stops the other ranks now may just end
        # this one, and every exit path leaves the process group
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        distributed.stop()
    sys.exit(code)


if __name__ == "__main__":
    main()
