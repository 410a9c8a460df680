"""The `piece-surgery` command line: parse options, call the library, print. No logic lives here."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from piece_surgery.errors import PieceError

app = typer.Typer(
    help="PIECE importance masks, sparse fine-tuning and exact sparse deltas for HF checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
Device = Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda or mps.")]
Dtype = Annotated[str, typer.Option(help="auto (the checkpoint's), float32, bfloat16 or float16.")]
TrustRemote = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow model code from the checkpoint (off by default).")
]


def _emit(result: dict, as_json: bool, table: Table | None = None, lines: list[str] = ()) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    if table is not None:
        out.print(table)
    for line in lines:
        out.print(line, highlight=False)


@app.command()
def score(
    model: Annotated[str, typer.Argument(help="Model folder or Hub repo id[@revision].")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Mask file to write (.safetensors).")],
    data: Annotated[Path | None, typer.Option(help=".txt (one example per line) or .jsonl.")] = None,
    method: Annotated[str, typer.Option(help="piece-s, piece-f, gradient, magnitude or random.")] = "piece-s",
    density: Annotated[float, typer.Option(help="Fraction of eligible entries to select.")] = 0.001,
    batch_size: Annotated[int, typer.Option(help="Micro-batch size: one gradient g_b per micro-batch.")] = 1,
    max_samples: Annotated[int | None, typer.Option(help="Use at most this many examples.")] = None,
    max_length: Annotated[int, typer.Option(help="Truncate examples to this many tokens.")] = 512,
    include: Annotated[
        list[str] | None, typer.Option(help="Regex: only matching tensors are eligible.")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Regex: matching tensors are not eligible. [default: embed]")
    ] = None,
    offload_accumulators: Annotated[
        bool, typer.Option(help="Keep the fp32 accumulators in host memory (large models on a GPU).")
    ] = False,
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Trade compute for activation memory.")
    ] = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    seed: Annotated[int, typer.Option(help="Seed for the random method.")] = 0,
    trust_remote_code: TrustRemote = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Estimate per-entry importance on a domain's data and write the top-density mask."""
    from piece_surgery.atomic import check_output
    from piece_surgery.mask import mask_summary, save_mask
    from piece_surgery.score import ScoreOptions, score_checkpoint

    check_output(output, overwrite=overwrite, inputs=tuple(p for p in (data, Path(model)) if p))
    options = ScoreOptions(
        method=method,
        density=density,
        batch_size=batch_size,
        max_samples=max_samples,
        max_length=max_length,
        include=include or [],
        exclude=["embed"] if exclude is None else exclude,
        seed=seed,
        offload_accumulators=offload_accumulators,
        gradient_checkpointing=gradient_checkpointing,
    )
    start = time.perf_counter()
    mask, stats, dataset = score_checkpoint(
        model, data, options, device=device, dtype=dtype, trust_remote_code=trust_remote_code, quiet=quiet
    )
    save_mask(mask, output)
    summary = mask_summary(mask)
    result = {
        "output": str(output),
        "method": method,
        "k": mask.k,
        "eligible": mask.eligible,
        "density": density,
        "tensors_touched": summary["tensors_touched"],
        "norm_share": summary["norm_share"],
        "seconds": round(time.perf_counter() - start, 3),
        "examples": stats.examples,
        "skipped_examples": dataset.skipped if dataset else 0,
        "tokens": stats.tokens,
        "mean_loss": stats.mean_loss if stats.batches else None,
    }
    lines = [
        f"wrote {output}: {mask.k:,} of {mask.eligible:,} eligible entries ({method}, density {density})",
        f"{summary['tensors_touched']} tensors touched; norm weights hold {summary['norm_share']:.1%}",
    ]
    if dataset is not None:
        lines.append(
            f"{stats.examples} examples, {stats.tokens:,} loss tokens, mean loss {stats.mean_loss:.4f}"
            + (f"; skipped {dataset.skipped} with no loss-bearing token" if dataset.skipped else "")
        )
    _emit(result, as_json, lines=lines)


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="A mask file or a delta folder (path or Hub repo id).")],
    as_json: AsJson = False,
) -> None:
    """Summarise a mask or a delta: per layer, per module kind, size."""
    from piece_surgery.inspection import describe

    summary = describe(path)
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return
    out.print(_summary_table(summary, "by_kind", "module kind"))
    out.print(_summary_table(summary, "by_layer", "layer"))
    for line in summary["headline"]:
        out.print(line, highlight=False)


def _summary_table(summary: dict, key: str, title: str) -> Table:
    table = Table(title=f"{summary['kind']} by {title}")
    table.add_column(title)
    table.add_column("selected", justify="right")
    table.add_column("of", justify="right")
    table.add_column("fraction", justify="right")
    for name, row in summary[key].items():
        frac = row["selected"] / row["size"] if row["size"] else 0.0
        table.add_row(name, f"{row['selected']:,}", f"{row['size']:,}", f"{frac:.4%}")
    return table


@app.command("tiny-model", hidden=False)
def tiny_model(
    output: Annotated[Path, typer.Argument(help="Folder to write the tiny random model to.")],
    arch: Annotated[str, typer.Option(help="llama, gpt2 or qwen2.")] = "llama",
    seed: int = 0,
    overwrite: Overwrite = False,
) -> None:
    """Write a tiny random causal LM with a tokenizer (for trying the tool offline)."""
    from piece_surgery.atomic import atomic_path, check_output
    from piece_surgery.testing import make_tiny_checkpoint

    check_output(output, overwrite=overwrite)
    with atomic_path(output, is_dir=True) as tmp:
        make_tiny_checkpoint(tmp, arch, seed=seed)
    out.print(f"wrote tiny {arch} model to {output}", highlight=False)


def main() -> None:
    try:
        app()
    except PieceError as exc:
        err.print(f"error: {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
