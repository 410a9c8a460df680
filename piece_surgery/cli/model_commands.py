"""Commands that load a model: `score` and `train`. Each parses its options, calls one library
recipe and prints the record it returns."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from piece_surgery.cli.common import (
    LOADING_OPTIONS,
    AsJson,
    Command,
    Compact,
    Overwrite,
    Quiet,
    app,
    avoid_line,
    delta_format,
    emit,
    printable,
    retain_line,
    takes_run_options,
)
from piece_surgery.cli.options import takes
from piece_surgery.evaluation.generation import GenerateOptions
from piece_surgery.evaluation.options import EvalOptions
from piece_surgery.runtime.options import RunOptions
from piece_surgery.scoring.options import ScoreOptions
from piece_surgery.training.config import TrainConfig

Model = Annotated[str, typer.Argument(help="Model folder or Hub repo id[@revision].")]
Avoid = Annotated[
    list[str] | None,
    typer.Option(help="A mask or delta whose entries to leave out; repeatable.", metavar="MASK|DELTA"),
]


@app.command("score", cls=Command, short_help="Score a model on domain data; write the top-k mask.")
@takes_run_options
@takes(ScoreOptions, "options", fixed=lambda values, own: {"retain": [], **values})
def score_command(
    model: Model,
    output: Annotated[Path, typer.Option("-o", "--output", help="Mask file to write (.safetensors).")],
    data: Annotated[
        Path | None,
        typer.Option(
            help="Data: .txt, .jsonl, .json, .parquet, .arrow or a datasets folder (README: Data formats). "
            "[required unless magnitude/random]"
        ),
    ] = None,
    avoid: Avoid = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
    options: ScoreOptions = None,
    run: RunOptions = None,
) -> None:
    """Estimate per-entry importance on a domain's data and write the top-density mask."""
    from piece_surgery.recipes.score import score_checkpoint

    start = time.perf_counter()
    scored = score_checkpoint(
        model, data, options, run, avoid=avoid or [], output=output, overwrite=overwrite
    )
    result = scored.to_json(model=model, output=output, seconds=time.perf_counter() - start)
    lines = [
        f"wrote {output}: {result['entries']:,} of {result['eligible']:,} eligible entries "
        f"({options.method}, density {options.density})",
        f"{result['tensors']} tensors touched; norm weights hold {result['norm_share']:.1%}",
    ]
    if scored.dataset is not None:
        skipped = scored.dataset.skipped
        lines.append(
            f"{result['examples']} examples, {result['tokens']:,} loss tokens, "
            f"mean loss {result['mean_loss']:.4f}"
            + (f"; skipped {skipped} with no loss-bearing token" if skipped else "")
        )
    if result["retain"]:
        lines.append(retain_line(result["retain"]))
    if result.get("avoid"):
        lines.append(avoid_line(result["avoid"]))
    emit("score", result, as_json, lines)


# train scores with these when no --mask is given; its own --seed, --batch-size and
# --gradient-checkpointing are the training's (scoring takes the seed too)
TRAIN_SCORING = {
    "skip": ("seed", "offload_accumulators", "gradient_checkpointing"),
    "rename": {"batch_size": "score_batch_size"},
    "note": "Scoring without --mask",
}


@app.command("train", cls=Command, short_help="Fine-tune only the masked entries; write a delta.")
@takes_run_options
@takes(TrainConfig, "config")
@takes(ScoreOptions, "scoring", given_only=True, **TRAIN_SCORING)
def train_command(
    model: Model,
    data: Annotated[
        Path,
        typer.Option(help="Training data: .txt, .jsonl, .json, .parquet, .arrow or a datasets folder."),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Delta folder to write.")],
    mask: Annotated[
        str | None, typer.Option(help="Mask from `score` (else: score first on --data).", metavar="MASK")
    ] = None,
    avoid: Avoid = None,
    eval_data: Annotated[Path | None, typer.Option(help="Held-out data for eval loss.")] = None,
    eval_general: Annotated[
        str | None,
        typer.Option(
            help="General text to measure the drift on (KL from the base) every --eval-every steps and "
            "at the end: a data file, self or general. [default: general with --drift-budget]",
            metavar="FILE|self|general",
        ),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the saved state.")] = False,
    report_to: Annotated[
        str,
        typer.Option(
            help="Log every step to TensorBoard and/or W&B (comma-separated; pip install "
            "'piece-surgery[tensorboard]' or '[wandb]').",
            metavar="tensorboard|wandb|none",
        ),
    ] = "none",
    logging_dir: Annotated[
        Path | None,
        typer.Option(help="Where --report-to writes. [default: OUT.logs beside the delta]", metavar="FOLDER"),
    ] = None,
    compact: Compact = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
    config: TrainConfig = None,
    scoring: ScoreOptions | None = None,
    run: RunOptions = None,
) -> None:
    """Fine-tune only the masked entries and write a sparse delta."""
    from dataclasses import replace

    from piece_surgery.recipes.train import train_checkpoint

    start = time.perf_counter()
    trained = train_checkpoint(
        model,
        data,
        output,
        config,
        run,
        mask_ref=mask,
        score_options=replace(scoring, seed=config.seed) if scoring is not None else None,
        avoid=avoid or [],
        eval_data=eval_data,
        eval_general=eval_general,
        resume=resume,
        overwrite=overwrite,
        delta_format=delta_format(compact),
        report_to=report_to,
        logging_dir=logging_dir,
    )
    report = trained.to_json(model=model, mask_ref=mask, output=output, seconds=time.perf_counter() - start)
    emit("train", report, as_json, _train_lines(report))


def _train_lines(report: dict) -> list[str]:
    first = report["first_train_loss"]
    lines = [
        f"wrote {report['output']}: {report['entries']:,} changed entries of a "
        f"{report['mask_entries']:,}-entry mask, {report['steps']} steps "
        + (f"on {report['ranks']} processes" if report["ranks"] > 1 else "in one process"),
        f"train loss {first:.4f} -> {report['final_train_loss']:.4f}"
        if first is not None
        else "no steps run",
    ]
    if report["skipped_examples"]:
        lines.append(
            f"trained on {report['examples']} examples; skipped {report['skipped_examples']} "
            "with no loss-bearing token"
        )
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
@takes(EvalOptions, "options")
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
    options: EvalOptions = None,
    run: RunOptions = None,
) -> None:
    """Measure each candidate against the base: gain on --data, drift (mean token KL from the base),
    the candidate's loss and the top-1 changes on general text."""
    from piece_surgery.recipes.evaluate import evaluate_command_recipe

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


@app.command("generate", cls=Command, short_help="Ask the base and candidates the same prompts.")
@takes_run_options(only=LOADING_OPTIONS)
@takes(GenerateOptions, "options")
def generate_command(
    base: Annotated[str, typer.Argument(help="The base: model folder or Hub repo id[@revision].")],
    candidates: Annotated[
        list[str] | None, typer.Argument(help="Deltas, PEFT adapters or merged checkpoints to ask too.")
    ] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="A prompt; repeatable.", metavar="TEXT")] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(help="Prompts: a .txt line each, or data records' prompts (README: generate)."),
    ] = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
    options: GenerateOptions = None,
    run: RunOptions = None,
) -> None:
    """The base and each candidate answer the same prompts, side by side: greedy unless --sample;
    --prompt through the chat template where the model has one, --prompts records as train reads them."""
    from piece_surgery.recipes.generate import generate_answers

    generated = generate_answers(
        base, candidates or [], prompt or [], prompts_file=prompts, options=options, run=run
    )
    result = generated.to_json()
    emit("generate", result, as_json, [], _generate_table(result))


def _generate_table(result: dict):
    """A row per prompt, a column per model; every text with its unprintable characters escaped
    (printable: a prompt or an answer may hold terminal control codes), --json keeps them exact."""
    from rich.table import Table
    from rich.text import Text

    how = f"sampled, seed {result['seed']}" if result["sample"] else "greedy"
    templated = {row["chat_template"] for row in result["prompts"]}
    template = "chats through the chat template, texts as given"
    if len(templated) == 1:
        template = "through the chat template" if templated.pop() else "as given"
    table = Table(title=f"answers ({how}; prompts {template})", show_lines=True)
    table.add_column("prompt", overflow="fold")
    for answer in result["prompts"][0]["answers"]:
        table.add_column(Text(printable(answer["model"], keep_lines=False)), overflow="fold")
    for row in result["prompts"]:
        prompt = row["prompt"]
        chat = " / ".join(f"{m['role']}: {m['content']}" for m in prompt) if isinstance(prompt, list) else ""
        shown = prompt if isinstance(prompt, str) else chat
        table.add_row(Text(printable(shown)), *(Text(printable(a["text"])) for a in row["answers"]))
    return table


def _eval_table(result: dict):
    """A row per candidate and set: the gain on --data, then the drift on each --general set, each
    with its own tokens; names whole (folded, never cut) so that candidates stay told apart."""
    from rich.table import Table
    from rich.text import Text

    domain = result["data"]["file"] if result["data"] else None
    sets = [domain or "", *(g["file"] for g in result["general"])]
    table = Table(title=Text(printable(f"against {result['base']}", keep_lines=False)))
    table.add_column("candidate", overflow="fold", ratio=2)
    table.add_column("set", overflow="fold", min_width=min(max(map(len, sets)), 24))
    for column in ("gain", "drift (KL)", "top-1 changed", "tokens", "seconds"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in result["candidates"]:  # one identical to the base too: its zeros on every set
        name, seconds = Text(printable(row["candidate"], keep_lines=False)), f"{row['seconds']:.1f}"
        if domain is not None:
            domain_tokens = row["tokens"] - sum(g["tokens"] for g in row["general"])
            table.add_row(
                name,
                Text(printable(domain, keep_lines=False)),
                f"{row['gain']:.4f}",
                "",
                "",
                f"{domain_tokens:,}",
                seconds,
            )
            name, seconds = Text(""), ""
        for g in row["general"]:
            drift, top1 = f"{g['kl']:.4g}", f"{g['top1_changed']:.2%}"
            table.add_row(
                name,
                Text(printable(g["set"], keep_lines=False)),
                "",
                drift,
                top1,
                f"{g['tokens']:,}",
                seconds,
            )
            name, seconds = Text(""), ""
    return table


def _eval_lines(result: dict) -> list[str]:
    lines = []
    for row in result["candidates"]:
        if not row["changes_outputs"]:
            lines.append(
                f"{row['candidate']}: identical to the base on every token measured (nothing applied?)"
            )
    if result["recorded"]:
        lines.append(f"recorded the figures in delta.json and README.md of {', '.join(result['recorded'])}")
    if result["plot"]:
        lines.append(f"plot: {result['plot']}")
    for candidate, tasks in (result["tasks"] or {}).items():
        for task, metrics in tasks.items():
            shown = [f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, int | float)]
            lines.append(f"{candidate} on {task}: {', '.join(shown) or '-'}")
    return lines
