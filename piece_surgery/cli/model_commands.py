"""Commands that load a model: `score` and `train`. Each parses its options, calls one library
recipe and prints the record it returns."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from piece_surgery.cli.common import (
    AsJson,
    Command,
    Compact,
    Overwrite,
    Quiet,
    app,
    delta_format,
    emit,
    given,
    option_help,
    takes_run_options,
)
from piece_surgery.evaluation.options import EvalOptions
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.options import RunOptions
from piece_surgery.scoring.methods import DEFAULT_METHOD
from piece_surgery.scoring.options import ScoreOptions
from piece_surgery.training.config import TrainConfig

Model = Annotated[str, typer.Argument(help="Model folder or Hub repo id[@revision].")]
Patterns = Annotated[list[str] | None, typer.Option(help=option_help(ScoreOptions, "include"))]
Exclude = Annotated[list[str] | None, typer.Option(help=option_help(ScoreOptions, "exclude"))]
Retain = Annotated[
    list[str] | None,
    typer.Option(
        help="piece-r: text whose behaviour to keep: a data file, general (the shipped set) or self; "
        "repeatable. [default: general]"
    ),
]
RetainLabels = Annotated[
    str | None, typer.Option(help=option_help(ScoreOptions, "retain_labels") + " [default: empirical]")
]
RetainDamping = Annotated[
    float | None, typer.Option(help=option_help(ScoreOptions, "retain_damping") + " [default: 0.01]")
]
SelfSamples = Annotated[
    int | None, typer.Option(help=option_help(ScoreOptions, "self_samples") + " [default: 64]")
]
SelfLength = Annotated[
    int | None, typer.Option(help=option_help(ScoreOptions, "self_length") + " [default: 128]")
]
Avoid = Annotated[
    list[str] | None, typer.Option(help="A mask or delta whose entries to leave out; repeatable.")
]


def _flag(record: type, name: str):
    return typer.Option(f"--{name.replace('_', '-')}", help=option_help(record, name))


@app.command("score", cls=Command, short_help="Score a model on domain data; write the top-k mask.")
@takes_run_options
def score_command(
    model: Model,
    output: Annotated[Path, typer.Option("-o", "--output", help="Mask file to write (.safetensors).")],
    data: Annotated[
        Path | None,
        typer.Option(help=".txt (one example per line) or .jsonl. [required unless magnitude/random]"),
    ] = None,
    method: Annotated[str, typer.Option(help=option_help(ScoreOptions, "method"))] = DEFAULT_METHOD,
    normalize: Annotated[str, typer.Option(help=option_help(ScoreOptions, "normalize"))] = "none",
    density: Annotated[float, typer.Option(help=option_help(ScoreOptions, "density"))] = 0.001,
    batch_size: Annotated[int, typer.Option(help=option_help(ScoreOptions, "batch_size"))] = 1,
    include: Patterns = None,
    exclude: Exclude = None,
    offload_accumulators: Annotated[bool, _flag(ScoreOptions, "offload_accumulators")] = False,
    gradient_checkpointing: Annotated[bool, _flag(ScoreOptions, "gradient_checkpointing")] = False,
    retain: Retain = None,
    retain_labels: RetainLabels = None,
    retain_damping: RetainDamping = None,
    self_samples: SelfSamples = None,
    self_length: SelfLength = None,
    avoid: Avoid = None,
    seed: Annotated[int, typer.Option(help=option_help(ScoreOptions, "seed"))] = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
    run: RunOptions = None,
) -> None:
    """Estimate per-entry importance on a domain's data and write the top-density mask."""
    from piece_surgery.recipes.score import score_checkpoint
    from piece_surgery.scoring.inputs import check_retain

    retain_options = given(
        retain_labels=retain_labels,
        retain_damping=retain_damping,
        self_samples=self_samples,
        self_length=self_length,
    )
    check_retain(method, retain or [], list(retain_options))
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
    start = time.perf_counter()
    scored = score_checkpoint(
        model, data, options, run, retain=retain or [], avoid=avoid or [], output=output, overwrite=overwrite
    )
    result = scored.to_json(model=model, output=output, seconds=time.perf_counter() - start)
    lines = [
        f"wrote {output}: {result['entries']:,} of {result['eligible']:,} eligible entries "
        f"({method}, density {density})",
        f"{result['tensors']} tensors touched; norm weights hold {result['norm_share']:.1%}",
    ]
    if scored.dataset is not None:
        skipped = scored.dataset.skipped
        lines.append(
            f"{result['examples']} examples, {result['tokens']:,} loss tokens, "
            f"mean loss {result['mean_loss']:.4f}"
            + (f"; skipped {skipped} with no loss-bearing token" if skipped else "")
        )
    emit("score", result, as_json, lines)


def _parse_betas(text: str) -> tuple[float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 2:
        raise PieceError(f"--betas '{text}' must be two numbers, e.g. 0.9,0.95")
    return parts


def _train_option(name: str, default_note: str = ""):
    return typer.Option(help=option_help(TrainConfig, name) + default_note)


@app.command("train", cls=Command, short_help="Fine-tune only the masked entries; write a delta.")
@takes_run_options
def train_command(
    model: Model,
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
    normalize: Annotated[
        str | None, typer.Option(help="Score normalisation: none or tensor. [default: none]")
    ] = None,
    include: Patterns = None,
    exclude: Exclude = None,
    retain: Retain = None,
    retain_labels: RetainLabels = None,
    retain_damping: RetainDamping = None,
    self_samples: SelfSamples = None,
    self_length: SelfLength = None,
    avoid: Avoid = None,
    drift_budget: Annotated[float | None, _train_option("drift_budget")] = None,
    retain_weight: Annotated[float | None, _train_option("retain_weight")] = None,
    norm_lr_scale: Annotated[float, _train_option("norm_lr_scale")] = 1.0,
    lr: Annotated[float | None, _train_option("lr")] = None,
    epochs: Annotated[int, _train_option("epochs")] = 1,
    max_steps: Annotated[int | None, _train_option("max_steps")] = None,
    batch_size: Annotated[int, _train_option("batch_size")] = 4,
    grad_accum: Annotated[int, _train_option("grad_accum")] = 1,
    schedule: Annotated[str, _train_option("schedule")] = "constant",
    warmup_steps: Annotated[int, _train_option("warmup_steps")] = 0,
    weight_decay: Annotated[float, _train_option("weight_decay")] = 0.0,
    betas: Annotated[str, _train_option("betas")] = "0.9,0.95",
    clip: Annotated[float, _train_option("clip")] = 1.0,
    eval_data: Annotated[Path | None, typer.Option(help="Held-out data for eval loss.")] = None,
    eval_general: Annotated[
        str | None,
        typer.Option(
            help="General text to measure the drift on (KL from the base) every --eval-every steps and "
            "at the end: a data file, self or general. [default: general with --drift-budget]"
        ),
    ] = None,
    budget_on: Annotated[str | None, _train_option("budget_on")] = None,
    eval_every: Annotated[int | None, _train_option("eval_every")] = None,
    save_every: Annotated[int | None, _train_option("save_every")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the saved state.")] = False,
    gradient_checkpointing: Annotated[bool, _flag(TrainConfig, "gradient_checkpointing")] = False,
    compact: Compact = False,
    seed: Annotated[int, _train_option("seed")] = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
    run: RunOptions = None,
) -> None:
    """Fine-tune only the masked entries and write a sparse delta."""
    from piece_surgery.recipes.train import train_checkpoint
    from piece_surgery.scoring.inputs import check_retain

    if budget_on is not None and drift_budget is None:
        raise PieceError(
            "--budget-on says what --drift-budget stops on; give --drift-budget too, or leave it out"
        )
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
        budget_on=budget_on or "measured",
    )
    retain_options = given(
        retain_labels=retain_labels,
        retain_damping=retain_damping,
        self_samples=self_samples,
        self_length=self_length,
    )
    check_retain(method or DEFAULT_METHOD, retain or [], list(retain_options))
    scoring = given(
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
        run,
        mask_ref=mask,
        score_options=score_options,
        retain=retain or [],
        avoid=avoid or [],
        eval_data=eval_data,
        eval_general=eval_general,
        resume=resume,
        overwrite=overwrite,
        delta_format=delta_format(compact),
    )
    report = trained.to_json(model=model, mask_ref=mask, output=output, seconds=time.perf_counter() - start)
    emit("train", report, as_json, _train_lines(report))


def _train_lines(report: dict) -> list[str]:
    first = report["first_train_loss"]
    lines = [
        f"wrote {report['output']}: {report['entries']:,} changed entries of a "
        f"{report['mask_entries']:,}-entry mask, {report['steps']} steps",
        f"train loss {first:.4f} -> {report['final_train_loss']:.4f}"
        if first is not None
        else "no steps run",
    ]
    if report["final_eval_loss"] is not None:
        lines.append(f"eval loss {report['final_eval_loss']:.4f}")
    if report["measured_drift"] is not None:
        lines.append(
            f"measured drift (mean token KL from the base on {report['eval_general']}) "
            f"{report['measured_drift']:.4g}"
        )
    if report["predicted_drift"] is not None:
        lines.append(f"predicted drift (1/2 sum F d^2, mean token KL) {report['predicted_drift']:.4g}")
    if report["unchanged_reason"]:
        lines.append(f"warning: {report['unchanged_reason']}")
    passed = report["drift_budget_passed"]
    if passed is not None:
        lines.append(
            f"stopped: the {passed['on']} drift at step {passed['step']} ({passed['drift']:.4g}) passed "
            f"--drift-budget {passed['budget']:g}; kept step {report['steps']}"
        )
    return lines


EVAL_RUN_OPTIONS = (
    "device",
    "dtype",
    "max_length",
    "max_samples",
    "attn_implementation",
    "trust_remote_code",
)


@app.command("eval", cls=Command, short_help="Measure what deltas learned and forgot.")
@takes_run_options(only=EVAL_RUN_OPTIONS)
def eval_command(
    base: Annotated[str, typer.Argument(help="The base: model folder or Hub repo id[@revision].")],
    candidates: Annotated[
        list[str], typer.Argument(help="Deltas, PEFT adapters or merged checkpoints to measure.")
    ],
    data: Annotated[
        Path | None, typer.Option(help="Domain data: loss of base and candidate, the gain.")
    ] = None,
    general: Annotated[
        list[str] | None,
        typer.Option(
            help="General text the drift is measured on: a data file, self or general; repeatable. "
            "[default: self]"
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help=option_help(EvalOptions, "batch_size"))] = 4,
    seed: Annotated[int, typer.Option(help=option_help(EvalOptions, "seed"))] = 0,
    self_samples: Annotated[int, typer.Option(help=option_help(EvalOptions, "self_samples"))] = 64,
    self_length: Annotated[int, typer.Option(help=option_help(EvalOptions, "self_length"))] = 128,
    record: Annotated[
        bool, typer.Option("--record", help="Write the figures into each delta's delta.json and card.")
    ] = False,
    plot: Annotated[
        Path | None, typer.Option(help="Draw gain against drift to this .png (matplotlib).")
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(
            help="lm-evaluation-harness tasks, comma-separated (pip install 'piece-surgery[lm-eval]')."
        ),
    ] = None,
    tasks_path: Annotated[
        Path | None, typer.Option(help="A folder of task definitions of your own (lm-eval's include_path).")
    ] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
    run: RunOptions = None,
) -> None:
    """Measure each candidate against the base: gain on --data, drift (mean token KL from the base),
    the candidate's loss and the top-1 changes on general text."""
    from piece_surgery.recipes.evaluate import evaluate_command_recipe

    options = EvalOptions(
        batch_size=batch_size, seed=seed, self_samples=self_samples, self_length=self_length
    )
    evaluated = evaluate_command_recipe(
        base,
        candidates,
        run,
        data=data,
        general=general or ["self"],
        options=options,
        record=record,
        plot=plot,
        tasks=tasks,
        tasks_path=tasks_path,
        overwrite=overwrite,
    )
    result = evaluated.to_json()
    emit("eval", result, as_json, _eval_lines(result), _eval_table(result))  # -q: progress only


def _eval_table(result: dict):
    from rich.table import Table
    from rich.text import Text

    general = result["general"][0]["file"] if result["general"] else "-"
    table = Table(title=f"against {result['base']}; drift on {general}")
    for column in ("candidate", "gain", "drift (KL)", "top-1 changed", "tokens", "seconds"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for row in result["candidates"]:
        if not row["changes_outputs"]:
            table.add_row(Text(row["candidate"]), "identical to the base", "", "", f"{row['tokens']:,}", "")
            continue
        gain = "-" if row["gain"] is None else f"{row['gain']:.4f}"
        table.add_row(
            Text(row["candidate"]),
            gain,
            f"{row['drift']:.4g}",
            f"{row['top1_changed']:.2%}",
            f"{row['tokens']:,}",
            f"{row['seconds']:.1f}",
        )
    return table


def _eval_lines(result: dict) -> list[str]:
    lines = []
    for row in result["candidates"]:
        if not row["changes_outputs"]:
            lines.append(
                f"{row['candidate']}: identical to the base on every token measured (nothing applied?)"
            )
    for extra in ("recorded", "plot", "tasks"):
        if result.get(extra):
            lines.append(f"{extra}: {result[extra]}")
    return lines
