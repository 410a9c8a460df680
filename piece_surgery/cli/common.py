"""What every command shares: the Typer app, the output consoles, the options several commands take
(their help text comes from the library's records), and printing a result once, from rank 0."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.text import printable

app = typer.Typer(
    help="PIECE importance masks, sparse fine-tuning and exact sparse deltas for HF checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: readable at 80 columns, option names never clipped
)
# What each option's value is, as --help shows it (instead of the Python type).
METAVARS = {
    "model": "MODEL",
    "base": "BASE",
    "tuned": "TUNED",
    "deltas": "DELTA",
    "delta": "DELTA",
    "adapter": "ADAPTER",
    "path": "PATH",
    "repo_id": "USER/NAME",
    "output": "PATH",
    "data": "FILE",
    "eval_data": "FILE",
    "prompts": "FILE",
    "recipe": "FILE",
    "on_conflict": "sum|mean|ties|error",
    "shard_size": "SIZE",
    "original_base": "BASE",
    "base_model": "USER/NAME",
    "revision": "BRANCH",
    "commit_message": "TEXT",
    "token": "TOKEN",
    "to": "peft",
    "arch": "llama|gpt2|qwen2|gemma3|...",
    "scale": "SCALE",
    "candidates": "CANDIDATE",
    "general": "FILE|self|general",
    "plot": "FILE.png",
    "tasks": "TASK,...",
    "tasks_path": "FOLDER",
}
_BY_TYPE = {int: "N", float: "NUMBER", str: "TEXT", Path: "PATH"}


class Command(typer.core.TyperCommand):
    """A command whose --help names values by what they are (METAVARS), not by Python type."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.metavar is None and not getattr(param, "is_flag", False):
                annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
                param.metavar = METAVARS.get(param.name) or _BY_TYPE.get(annotation, "VALUE")
            if isinstance(param, typer.core.TyperArgument):  # its metavar says it: no `<str>` beside
                param.display_type_rich = lambda ctx: None

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        """An empty value is refused by name before any conversion: as a path it would read as '.'
        (the folder the command runs in), and no option of ours means anything by ''."""
        takes_value = {
            name: param
            for param in self.params
            if isinstance(param, typer.core.TyperOption) and not param.is_flag
            for name in param.opts
        }
        for i, arg in enumerate(args):
            option, equals, value = arg.partition("=")
            if equals and option in takes_value and not value.strip():
                raise PieceError(f"{option} is empty: give a value")
            if not arg.strip() and i and args[i - 1] in takes_value:
                raise PieceError(f"{args[i - 1]} is empty: give a value")
            if not arg.strip() and not (i and args[i - 1] in takes_value):
                position = _position(args, i, takes_value)
                raise PieceError(f"argument {position} is empty: give a path or a name")
        return super().parse_args(ctx, args)


def _position(args: list[str], index: int, takes_value: dict) -> int:
    """Which positional argument args[index] is (1-based), skipping options and their values."""
    position, i = 0, 0
    while i <= index:
        arg = args[i]
        if arg.startswith("-") and arg.strip() != "-":
            i += 2 if arg in takes_value else 1
            continue
        position += 1
        i += 1
    return position


out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


# Where stdout is no terminal (a log, CI) and COLUMNS is not set, a table is printed as wide as it
# needs to fold nothing, up to this: rich would fold it at 80 columns and break candidate names.
WIDEST_TABLE = 1000


def show_table(table: Table) -> None:
    """Print a table to stdout: at the terminal's width on a terminal; elsewhere at COLUMNS where it
    is set (read now, not at import), else as wide as the table needs (at most WIDEST_TABLE)."""
    import os

    from rich.measure import Measurement

    if not out.is_terminal:
        columns = os.environ.get("COLUMNS", "").strip()
        if columns.isdigit() and int(columns) > 0:
            out.width = int(columns)
        else:
            out.width = WIDEST_TABLE
            out.width = max(80, min(Measurement.get(out, out.options, table).maximum, WIDEST_TABLE))
    out.print(table)


def _silence_libraries(quiet: bool) -> bool:
    """-q silences the libraries' own progress bars too (huggingface_hub's downloads)."""
    if quiet:
        import os
        import sys

        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub is imported
        if "huggingface_hub" in sys.modules:
            sys.modules["huggingface_hub"].utils.disable_progress_bars()
    return quiet


Quiet = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress output.", callback=_silence_libraries)
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
Compact = Annotated[
    bool, typer.Option("--compact", help="Write format 2: index gaps and tuned values, ~half the bytes.")
]


def delta_format(compact: bool) -> int:
    """The delta format version a command writes: --compact's, or the default."""
    from piece_surgery.formats.delta_folder import COMPACT_FORMAT, DEFAULT_FORMAT

    return COMPACT_FORMAT if compact else DEFAULT_FORMAT


def say(line: str) -> None:
    """Print a line as it is: user text (paths, names) may hold `[...]`, which is never markup, and
    control codes from a file's names or fields, which are escaped (`printable`)."""
    out.print(printable(line, keep_lines=False), markup=False)


def emit(
    command: str, result: dict, as_json: bool, lines: list[str] = (), table: Table | None = None
) -> None:
    """Print a command's result: one JSON object with --json, else the table and the lines. Under
    a launcher, rank 0 speaks for every rank."""
    from piece_surgery.runtime import distributed

    world = distributed.current()
    if world is not None and not world.is_main:
        return
    if as_json:
        print(json.dumps({"command": command, **result}, indent=2, default=str))
        return
    if table is not None:
        show_table(table)
    for line in lines:
        say(line)


def given(**options) -> dict:
    """The options the user gave (those left at None take the library's defaults)."""
    return {k: v for k, v in options.items() if v is not None}


def option_help(record: type, name: str) -> str:
    """An option's help text, as the library's record declares it on the field."""
    from piece_surgery.runtime.records import help_of

    return help_of(record, name)


def takes_run_options(command=None, *, only: tuple[str, ...] | None = None):
    """Give a command every field of RunOptions (or those in `only`) as a flag (--device, --dtype,
    --max-length, ...), passed to it as one `run` argument (cli/options.py); -q makes it quiet. A new
    run option is then one field of RunOptions and nothing here."""
    from piece_surgery.cli.options import takes
    from piece_surgery.runtime.options import RunOptions

    decorate = takes(
        RunOptions, "run", only=only, fixed=lambda values, own: {**values, "quiet": own.get("quiet", False)}
    )
    return decorate if command is None else decorate(command)


# the run options of a command that loads a model but reads no data (export, import)
LOADING_OPTIONS = ("device", "dtype", "attn_implementation", "trust_remote_code")


def summary_table(summary: dict, key: str, title: str) -> Table:
    table = Table(title=f"{summary['kind']} by {title}")
    table.add_column(title)
    table.add_column("entries", justify="right")
    table.add_column("of", justify="right")
    table.add_column("fraction", justify="right")
    for name, row in summary[key].items():
        frac = row["entries"] / row["size"] if row["size"] else 0.0
        table.add_row(
            Text(printable(name, keep_lines=False)), f"{row['entries']:,}", f"{row['size']:,}", f"{frac:.4%}"
        )
    return table


def avoid_line(avoid: list[dict]) -> str:
    """The earlier tasks' masks and deltas whose entries a mask left alone, in a line."""
    shown = ", ".join(f"{a['name']} ({a['kind']}, {a['entries']:,} entries)" for a in avoid)
    return f"avoided: {shown}"


def retain_line(retain: dict) -> str:
    """The retain sets a piece-r mask kept in mind, in a line: each by name and examples (`self`
    by its samples and length), the labels and the damping."""
    shown = []
    for source in retain.get("sources") or []:
        if source.get("file") == "self" and retain.get("self_sampling"):
            sampling = retain["self_sampling"]
            shown.append(f"self ({sampling.get('samples')} texts of up to {sampling.get('length')} tokens)")
        else:
            shown.append(f"{source.get('file')} ({source.get('examples')} examples)")
    return (
        f"retain: {', '.join(shown) or '-'}; {retain.get('labels')} labels, damping q{retain.get('damping')}"
    )


OutputFolder = Annotated[Path, typer.Option("-o", "--output", help="Delta folder to write.")]
