"""Commands over masks and deltas: `diff`, `apply`, `inspect`, `push`, `export`, `import`, and
`tiny-model` for trying the tool offline. Each parses its options, calls one library recipe and
prints the record it returns."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from piece_surgery.cli.common import (
    LOADING_OPTIONS,
    AsJson,
    Command,
    Compact,
    OutputFolder,
    Overwrite,
    Quiet,
    app,
    avoid_line,
    delta_format,
    emit,
    printable,
    retain_line,
    show_table,
    summary_table,
    takes_run_options,
)
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.options import RunOptions


@app.command("diff", cls=Command, short_help="The sparse delta between two checkpoints.")
def diff_command(
    base: Annotated[str, typer.Argument(help="Base checkpoint folder or Hub repo id.")],
    tuned: Annotated[str, typer.Argument(help="Tuned checkpoint of the same architecture.")],
    output: OutputFolder,
    density: Annotated[
        float | None,
        typer.Option(
            help="Keep only this fraction of the eligible entries (as score counts them: every weight "
            "but the embedding tables), largest |change| first.",
            metavar="FRACTION",
        ),
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
    from piece_surgery.recipes.diff import write_diff

    start = time.perf_counter()
    written = write_diff(
        base,
        tuned,
        output,
        density=density,
        top_k=top_k,
        base_model=base_model,
        overwrite=overwrite,
        quiet=quiet,
        delta_format=delta_format(compact),
    )
    result = written.to_json(base=base, tuned=tuned, output=output, seconds=time.perf_counter() - start)
    table = Table(title="changed entries per tensor")
    table.add_column("tensor")
    table.add_column("changed", justify="right")
    table.add_column("fraction", justify="right")
    for name, t in written.delta.tensors.items():
        changed = f"{result['changed_fraction'][name]:.4%}"
        table.add_row(Text(printable(name, keep_lines=False)), f"{t.indices.numel():,}", changed)
    lines = [
        f"wrote {output}: {result['entries']:,} entries in {result['tensors']} tensors, "
        f"{result['tensor_bytes']:,} bytes ({result['bytes_per_entry']:.1f} per entry)"
    ]
    emit("diff", result, as_json, lines, None if quiet else table)


@app.command("apply", cls=Command, short_help="Merge deltas into a base checkpoint.")
def apply_command(
    base: Annotated[
        str | None, typer.Argument(help="Base checkpoint folder or Hub repo id[@revision].")
    ] = None,
    deltas: Annotated[
        list[str] | None, typer.Argument(help="One or more delta folders or Hub repo ids.")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Merged checkpoint folder to write. [required unless --recipe; with it: its output]",
        ),
    ] = None,
    recipe: Annotated[
        Path | None,
        typer.Option(help="A YAML recipe: base, deltas, scales, policy, output (instead of the rest)."),
    ] = None,
    scale: Annotated[
        list[float] | None,
        typer.Option(help="Scale of each delta (once for all, or once per delta). [default: 1]"),
    ] = None,
    on_conflict: Annotated[
        str | None,
        typer.Option(
            help="Entries changed by deltas made side by side: sum, mean, ties or error. [default: sum]"
        ),
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
    from piece_surgery.formats.merge_recipe import Recipe, load_recipe
    from piece_surgery.recipes.apply import apply_recipe

    if recipe is not None:
        arguments = {
            "BASE": base,
            "DELTAS": deltas,
            "--scale": scale,
            "--on-conflict": on_conflict,
            "--force": force,
            "--allow-duplicates": allow_duplicates,
            "--shard-size": shard_size,
            "--original-base": original_base,
        }
        mixed = [name for name, value in arguments.items() if value]
        if mixed:
            raise PieceError(f"--recipe says everything {mixed[0]} would; give one or the other")
        plan_recipe = load_recipe(recipe)
        if output is not None:  # the recipe's stack, written elsewhere (rebuilding a merged folder)
            plan_recipe = plan_recipe.with_output(output)
    else:
        plan_recipe = Recipe.from_arguments(
            base,
            deltas,
            output,
            scales=scale,
            on_conflict=on_conflict,
            force=force,
            allow_duplicates=allow_duplicates,
            shard_size=shard_size,
            original_base=original_base,
        )
    merged = apply_recipe(plan_recipe, dry_run=dry_run, overwrite=overwrite, quiet=quiet)
    report = merged.to_json()
    if output is not None and report["output"] is not None:
        report["output"] = str(output)  # as given, as every command reports its output
    o = merged.overlap
    lines = [
        f"{len(report['deltas'])} delta(s) onto {report['base']}: {report['entries']:,} entries in "
        f"{report['tensors']} tensors; output {report['output_bytes']:,} bytes in "
        f"{report['output_files']} file(s)",
        f"overlap: {o.shared:,} shared entries ({o.chained:,} chained, {o.conflicts:,} conflicting, "
        f"{o.sign_disagreements:,} with opposite signs)",
        "dry run: nothing written" if dry_run else f"wrote {report['output']}",
    ]
    emit("apply", report, as_json, lines)


@app.command("push", cls=Command, short_help="Share a delta or a mask on the Hub.")
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
    from piece_surgery.recipes.push import push

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
    emit("push", {"path": str(path), **result}, as_json, lines)


@app.command("inspect", cls=Command, short_help="Summarise a mask or a delta.")
def inspect_command(
    path: Annotated[str, typer.Argument(help="A mask file or a delta folder (path or Hub repo id).")],
    plot: Annotated[
        Path | None,
        typer.Option(
            help="Draw a trained delta's loss and drift against its steps to this .png "
            "(pip install 'piece-surgery[plot]')."
        ),
    ] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Summarise a mask or a delta: per layer, per module kind, per part (vision-language), per
    expert (mixture-of-experts), size, what it was made from; --plot draws a trained delta's log."""
    from piece_surgery.formats.artifacts import open_artifact
    from piece_surgery.recipes.inspect import plot_log, summarize, training_log

    artifact = open_artifact(path)
    if plot is not None:
        training_log(artifact, path)  # before the summary: a mask or an untrained delta has none
    summary = summarize(artifact)
    if plot is not None:
        plot_log(artifact, path, plot, overwrite=overwrite)
    summary["plot"] = str(plot) if plot is not None else None
    if as_json:
        emit("inspect", {"path": path, **summary}, as_json)
        return
    if not quiet:
        show_table(summary_table(summary, "by_kind", "module kind"))
        show_table(summary_table(summary, "by_layer", "layer"))
        if summary["by_part"] is not None:
            show_table(summary_table(summary, "by_part", "part"))
        if summary["by_expert"] is not None:
            show_table(summary_table(summary, "by_expert", "expert"))
    entries, tensors = summary["entries"], summary["tensors"]
    if summary["kind"] == "mask":
        lines = [
            f"mask {path}: {entries:,} of {summary['eligible']:,} eligible entries "
            f"({summary['method']}, density {summary['density']})",
            f"{tensors} tensors touched; norm weights hold {summary['norm_share']:.1%}",
            f"size on disk {summary['file_bytes']:,} bytes",
        ]
        if summary["retain"]:
            lines.append(retain_line(summary["retain"]))
        if summary.get("avoid"):
            lines.append(avoid_line(summary["avoid"]))
    else:
        lines = [
            f"delta {path}: {entries:,} changed entries in {tensors} tensors",
            f"{summary['tensor_bytes']:,} bytes of tensor data, "
            f"{summary['bytes_per_entry']:.2f} bytes per changed entry",
        ]
        for e in summary["evaluations"]:
            data = (e.get("data") or {}).get("file", "-")
            gain = "-" if e.get("gain") is None else f"{e['gain']:.4f}"
            drift = ", ".join(f"{g['set']} {g['kl']:.4g}" for g in e.get("general") or [])
            lines.append(f"measured: gain {gain} on {data}; drift (KL) {drift}")
        lines += log_lines(summary["provenance"])
    if summary["plot"]:
        lines.append(f"plot: {summary['plot']}")
    emit("inspect", summary, False, lines)


def log_lines(provenance: dict | None) -> list[str]:
    """A trained delta's run in a line: steps, processes, the loss's first and last values."""
    if not provenance or provenance.get("made_by") != "train":
        return []
    log, ranks = provenance.get("log"), provenance.get("ranks")
    where = "" if ranks is None else (" in one process" if ranks == 1 else f" on {ranks} processes")
    line = f"trained {provenance['steps']} steps{where}"
    if log and log["loss"]:
        line += f"; train loss {log['loss'][0]:.4f} -> {log['loss'][-1]:.4f} (inspect --plot draws it)"
    return [line]


@app.command("export", cls=Command, short_help="Write a delta as a PEFT adapter.")
@takes_run_options(only=LOADING_OPTIONS)
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
    run: RunOptions = None,
) -> None:
    """Write a delta as an adapter other tools load: PEFT's PeftModel.from_pretrained."""
    from piece_surgery.recipes.export import export_peft

    if to != "peft":
        raise PieceError(f"unknown --to '{to}'; the one format is peft")
    start = time.perf_counter()
    exported = export_peft(delta, output, base_ref=base, overwrite=overwrite, run=run)
    result = exported.to_json(delta=delta, output=output, seconds=time.perf_counter() - start)
    saved = exported.adapter_bytes
    lines = [
        f"wrote {output}: a SHiRA adapter (r={exported.r}) of {exported.entries:,} entries in "
        f"{exported.linear_layers} linear layers, padded with {exported.padding:,} unchanged ones",
        f"{saved:,} bytes ({saved / max(exported.entries, 1):.1f} per entry)"
        + (f"; norm gains saved whole: {len(exported.saved_modules)}" if exported.saved_modules else ""),
    ]
    emit("export", result, as_json, lines)


@app.command("import", cls=Command, short_help="Turn a PEFT adapter into a delta.")
@takes_run_options(only=LOADING_OPTIONS)
def import_command(
    adapter: Annotated[str, typer.Argument(help="A PEFT adapter folder or Hub repo id (SHiRA, LoRA, ...).")],
    output: OutputFolder,
    base: Annotated[
        str | None, typer.Option(help="The adapter's base (default: the one its config names).")
    ] = None,
    compact: Compact = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
    run: RunOptions = None,
) -> None:
    """A delta from a PEFT adapter that merges into its base: every entry the merge changes."""
    from piece_surgery.recipes.import_adapter import import_peft

    start = time.perf_counter()
    imported = import_peft(
        adapter, output, base_ref=base, overwrite=overwrite, delta_format=delta_format(compact), run=run
    )
    result = imported.to_json(adapter=adapter, output=output, seconds=time.perf_counter() - start)
    emit(
        "import",
        result,
        as_json,
        [f"wrote {output}: {result['entries']:,} entries in {result['tensors']} tensors"],
    )


@app.command("tiny-model", cls=Command, short_help="Write a tiny random model (offline).")
def tiny_model_command(
    output: Annotated[Path, typer.Argument(help="Folder to write the tiny random model to.")],
    arch: Annotated[
        str,
        typer.Option(
            help="llama, gpt2, qwen2, gemma3, mistral, qwen3, gemma2, phi3, olmo2, gpt_neox, falcon; "
            "mixture-of-experts: mixtral, qwen3_moe, qwen2_moe, olmoe, deepseek_v3, gpt_oss; "
            "vision-language: llava, gemma3_vl, qwen2_vl, qwen2_5_vl, qwen3_vl, idefics3, smolvlm."
        ),
    ] = "llama",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    experts: Annotated[
        str | None,
        typer.Option(
            help="How a mixture-of-experts model stores its experts: per-expert (one tensor per expert) "
            "or fused (as the model holds them).  [default: the family's Hub layout: fused for gpt_oss, "
            "else per-expert]",
            metavar="per-expert|fused",
            show_default=False,
        ),
    ] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Write a tiny random causal LM, or vision-language model, with a tokenizer (for trying the
    tool offline)."""
    from piece_surgery.models.tiny import (
        NEEDS_TORCHVISION,
        VISION_LANGUAGE_ARCHITECTURES,
        expert_layout,
        write_tiny_model,
    )

    start = time.perf_counter()
    write_tiny_model(output, arch, seed=seed, overwrite=overwrite, experts=experts)
    layout = expert_layout(arch, experts)
    processor = (Path(output).expanduser() / "processor_config.json").is_file()
    result = {
        "output": str(output),
        "arch": arch,
        "seed": seed,
        "experts": layout,
        "processor": processor,
        "seconds": round(time.perf_counter() - start, 3),
    }
    lines = [f"wrote tiny {arch} model to {output}" + (f" (experts stored {layout})" if layout else "")]
    if arch in VISION_LANGUAGE_ARCHITECTURES and not processor:
        why = "needs torchvision" if arch in NEEDS_TORCHVISION else "is not built for tests"
        lines.append(f"no processor written (the {arch} processor {why} here): text records only")
    emit("tiny-model", result, as_json, lines)
