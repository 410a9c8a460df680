"""The `piece-surgery` command line: parse options, call one library recipe, print. No logic here.

Every command takes --json (its schema is in docs/cli.md) and -q/--quiet. A user error prints one
line `error: ...` on stderr (and, under --json, {"error": ...} on stdout) and exits with code 2.
The commands live in model_commands (score, train, eval, generate) and artifact_commands (diff,
apply, inspect, push, export, import, tiny-model); this module is the entry point.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
from typing import Annotated

import typer

from piece_surgery.cli import artifact_commands, model_commands  # noqa: F401 - register the commands
from piece_surgery.cli.common import app, err
from piece_surgery.runtime import leftovers
from piece_surgery.runtime.errors import PieceError

# the pipeline's order in `piece-surgery --help`
ORDER = (
    "score",
    "train",
    "eval",
    "generate",
    "diff",
    "apply",
    "inspect",
    "push",
    "export",
    "import",
    "tiny-model",
)
app.registered_commands.sort(key=lambda command: ORDER.index(command.name))

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def _version(value: bool) -> None:
    if value:
        from piece_surgery.runtime.version import __version__

        print(f"piece-surgery {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """PIECE importance masks, sparse fine-tuning and exact sparse deltas for HF checkpoints."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that temporaries are cleaned up as on Ctrl-C."""


class Interrupted(BaseException):
    """Ctrl-C (SIGINT), raised as our own exception: click turns a KeyboardInterrupt into a silent
    exit 130 before a handler of ours could report it."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def _interrupt(signum, frame) -> None:
    raise Interrupted()


def _warn(message, category, filename, lineno, file=None, line=None) -> None:
    err.print(f"warning: {message}", markup=False)


def _report(message: str, code: int, as_json: bool) -> int:
    err.print(f"error: {message}", markup=False)  # every rank says it
    if as_json and _speaks_for_all():  # one JSON object, as on success
        print(json.dumps({"error": message, "exit_code": code}))
    return code


def _speaks_for_all() -> bool:
    """Whether this process prints the JSON object: rank 0 of a process group, or, before one is
    joined, of a launcher's ranks (WORLD_SIZE > 1); a process on its own always (a RANK left in the
    environment is no launch)."""
    distributed = sys.modules.get("piece_surgery.runtime.distributed")  # --help never imports torch
    world = distributed.current() if distributed is not None else None
    if world is not None:
        return world.is_main
    try:
        launched = int(os.environ.get("WORLD_SIZE") or 1) > 1
        return not launched or int(os.environ.get("RANK") or 0) == 0
    except ValueError:  # malformed: the launch itself reports it, in one line
        return True


def _stopped(what: str) -> str:
    """The line an interrupted or terminated command ends with: what it left on disk, if anything."""
    return f"{what}; {leftovers.described() or 'nothing was written'}"


def _run(as_json: bool) -> int:
    """The command, with user errors, interrupts and termination reported as one line."""
    leftovers.clear()
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
    except (typer.Abort, KeyboardInterrupt, Interrupted):
        return _report(_stopped("interrupted"), EXIT_INTERRUPTED, as_json)
    except Terminated:
        return _report(_stopped("terminated"), EXIT_TERMINATED, as_json)
    except (OSError, RuntimeError) as exc:
        # a path the system cannot follow, met where no check named it: the user's, not a bug
        unfollowable = getattr(exc, "errno", None) in (errno.ELOOP, errno.ENAMETOOLONG)
        if not (unfollowable or str(exc).startswith("Symlink loop from")):
            raise
        where = getattr(exc, "filename", None) or str(exc).removeprefix("Symlink loop from ")
        why = exc.strerror.lower() if unfollowable and exc.strerror else "a symbolic link loop"
        return _report(f"{where}: {why}; fix the path", EXIT_USER_ERROR, as_json)


def main() -> None:
    import warnings

    warnings.showwarning = _warn
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _interrupt)
    left_group = False
    try:
        code = _run("--json" in sys.argv[1:])
    finally:
        # the command is over and reported: a launcher that stops the other ranks now may just end
        # this one, and every exit path leaves the process group
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if "piece_surgery.runtime.distributed" in sys.modules:  # (--help never imports torch)
            left_group = sys.modules["piece_surgery.runtime.distributed"].stop()
    if left_group:
        # A rank's work is written and reported, and the group is left; what remains is the
        # interpreter's finalization, where gloo's threads can still meet objects being destroyed
        # and abort the process ("terminate called without an active exception"), failing a run
        # that finished. So a rank leaves without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


__all__ = ["app", "main"]
