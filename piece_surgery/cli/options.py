"""Options records as command-line flags: every field of a record (RunOptions, ScoreOptions,
TrainConfig, EvalOptions) becomes a flag of the commands that take the record, built from the field
alone: its name (`--max-length`), type, default, help and metavar (the field's metadata). The
command receives the record, made and so checked (cross-field rules included) before anything is
loaded. A new option is then one field of its record and the line that uses it.

Field metadata read here: `help`, `metavar`, `flag` (a boolean given as `--name` alone), `cli`
(False: not a flag), `cli_type` and `parse` (a flag typed otherwise than the field, e.g. the betas
given as "0.9,0.95"), `cli_default` (the flag's default when it differs from the field's: None,
so that the record can tell what was given).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import typer

_BY_TYPE = {int: "N", float: "NUMBER", str: "TEXT"}
# the options every command ends its --help with, after its own and its records' (the parameters'
# names: --overwrite, -q/--quiet, --json)
LAST = ("overwrite", "quiet", "as_json")


@dataclasses.dataclass(frozen=True)
class _Flag:
    field: dataclasses.Field
    param: str  # the command's parameter (and, dashed, the flag's name)
    annotation: Any
    default: Any


def _flags(
    record: type,
    only: Iterable[str] | None,
    skip: Iterable[str],
    rename: dict[str, str],
    given_only: bool,
    note: str | None,
) -> list[_Flag]:
    hints = typing.get_type_hints(record)
    chosen = []
    for f in dataclasses.fields(record):
        if (
            f.metadata.get("cli", True) is False
            or f.name in skip
            or (only is not None and f.name not in only)
        ):
            continue
        param = rename.get(f.name, f.name)
        kind = f.metadata.get("cli_type", hints[f.name])
        if f.metadata.get("cli_default", dataclasses.MISSING) is not dataclasses.MISSING:
            default = f.metadata["cli_default"]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = None  # a list: typer takes None for "not given"
        help_text = f.metadata.get("help", "")
        if given_only:  # the flag's default is None ("not given"): the record's, said in the help
            help_text = _with_default(help_text, default)
            default = None
        if note:
            help_text = f"{note}: {help_text[:1].lower() + help_text[1:]}"
        if default is None and not _is_optional(kind):
            kind = kind | None
        option = typer.Option(
            f"--{param.replace('_', '-')}",
            help=help_text,
            metavar=None if f.metadata.get("flag") else f.metadata.get("metavar") or _metavar(kind),
        )
        chosen.append(_Flag(f, param, Annotated[kind, option], default))
    return chosen


def _with_default(help_text: str, default: Any) -> str:
    """The help with the record's default at its end, as --help shows a flag's own default (a help
    that says its default already, or a default of nothing, is left as it is)."""
    if "[default" in help_text or default in (None, False) or default == []:
        return help_text
    return f"{help_text}  [default: {','.join(map(str, default)) if isinstance(default, list) else default}]"


def _is_optional(kind: Any) -> bool:
    return type(None) in typing.get_args(kind)


def _metavar(kind: Any) -> str:
    args = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
    inner = typing.get_args(args[0])
    return _BY_TYPE.get(inner[0] if inner else args[0], "VALUE")


def takes(
    record: type,
    param: str,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    rename: dict[str, str] | None = None,
    given_only: bool = False,
    note: str | None = None,
    fixed: Callable[[dict, dict], dict] | None = None,
):
    """Decorate a Typer command: give it a flag per field of `record` (those in `only`, less those
    in `skip`; `rename` maps a field to another flag name) and pass it the record as `param`.

    `given_only`: every flag defaults to None and the command gets None when none was given, else
    the record made of the given values (the others take the record's defaults); each flag's help
    says the record's default. `note` begins each flag's help (e.g. "Scoring without --mask").
    `fixed(values, arguments)` adds what the command's own arguments set (e.g. `quiet`): its result
    is the record's keyword arguments. --overwrite, -q and --json stay last in --help."""
    flags = _flags(record, only, skip, rename or {}, given_only, note)

    def decorate(command):
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != param]
        last = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.name in LAST]
        own = [p for p in own if p.name not in LAST]
        added = [
            inspect.Parameter(
                f.param, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.annotation
            )
            for f in flags
        ]

        @functools.wraps(command)
        def with_record(**kwargs):
            # a flag left at None was not given: the record's own default applies
            values = {f.field.name: _parsed(f.field, kwargs.pop(f.param)) for f in flags}
            values = {k: v for k, v in values.items() if v is not None}
            if fixed is not None:
                values = fixed(values, kwargs)
            made = record(**values) if values or not given_only else None
            return command(**{param: made}, **kwargs)

        with_record.__signature__ = inspect.Signature([*own, *added, *last])
        return with_record

    return decorate


def _parsed(field: dataclasses.Field, value: Any) -> Any:
    parse = field.metadata.get("parse")
    return parse(value) if parse is not None and value is not None else value
