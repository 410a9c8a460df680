"""Paths as a command opens them: resolved (`~`, `..` and every symbolic link), with one line
instead of a traceback where the system cannot follow one (a link loop, a NUL character, a name
longer than the file system allows), and what is at a path that is not a plain file or folder,
said in words (a FIFO is not "not found", a loop is not "a folder")."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from piece_surgery.runtime.errors import PieceError, quote

NOTHING = "nothing"
_UNFOLLOWABLE = (errno.ELOOP, errno.ENAMETOOLONG)


def what_is(path: str | Path) -> str:
    """What is at `path`, in words, following links: "a file", "a folder", `NOTHING`, "a link to
    nothing", "a symbolic link loop", "a FIFO (named pipe)", "a device", "a socket", or why it
    cannot be a path at all. Never opens anything (a FIFO would block) and never raises."""
    try:
        mode = os.stat(path).st_mode
    except ValueError:
        return "not a path (it contains a NUL character)"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop"
        if exc.errno == errno.ENAMETOOLONG:
            return "a name longer than the file system allows"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return "a link to nothing" if os.path.islink(path) else NOTHING
        return f"unreadable ({(exc.strerror or type(exc).__name__).lower()})"
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a file or folder"


def not_there(path: str | Path) -> str:
    """Why `path` is not the file or folder a command wanted, as a message goes on after the path:
    "not found", or "is a folder", "is a FIFO (named pipe)", "is a symbolic link loop", ..."""
    found = what_is(path)
    return "not found" if found == NOTHING else f"is {found}"


def is_present(path: str | Path) -> bool:
    """Whether anything is at `path`, a link that loops or leads nowhere included (Path.exists
    says False for those, and raises for a name too long)."""
    try:
        os.lstat(path)
    except (OSError, ValueError):
        return False
    return True


def real_path(path: str | Path, what: str = "path") -> Path:
    """`path` as the system opens it: `~` expanded, `..` and every symbolic link resolved, as far
    as they exist. PieceError, in one line naming `what`, for a path the system cannot follow (a
    link loop on the way, a NUL character, a name too long)."""
    followed = followable(path)
    if followed is None:
        why = _why(Path(path).expanduser())
        raise PieceError(f"{what} '{quote(path)}' cannot be followed: {quote(why)}; fix the path")
    return followed


def followable(path: str | Path) -> Path | None:
    """real_path(path), or None where the system cannot follow it (such a path reads nothing)."""
    try:
        resolved = Path(path).expanduser().resolve()
        os.stat(resolved)  # a loop Python left unresolved, a name too long for the system
    except (RuntimeError, ValueError):  # RuntimeError: a link loop, before Python 3.13
        return None
    except OSError as exc:
        return None if exc.errno in _UNFOLLOWABLE else resolved
    return resolved


def _why(path: Path) -> str:
    """Why the system cannot follow `path`: the first part of it that cannot be followed."""
    for part in (*reversed(path.parents), path):
        found = what_is(part)
        if found in ("a symbolic link loop", "a name longer than the file system allows"):
            return f"'{part}' is {found}" if part != path else f"it is {found}"
        if found.startswith("not a path"):
            return "it contains a NUL character"
    return "too many levels of symbolic links"
