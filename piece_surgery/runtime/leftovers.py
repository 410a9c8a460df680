"""What a command has left on disk that outlives its interruption (a resumable state saved with
--save-every; a record written into a delta's delta.json but not yet into its card), so that the
line an interrupted or terminated command ends with names it instead of "nothing was written"."""

from __future__ import annotations

import os
from pathlib import Path

_left: dict[str, str] = {}  # path -> what is there, as the closing line says it


def note(path: str | Path, what: str) -> None:
    """`what` (a clause: "a resumable state (step 4) is in 'out.state' ...") is left at `path`; a
    later note for the same path, however spelled, replaces it."""
    _left[_key(path)] = what


def forget(path: str | Path) -> None:
    """Nothing is left at `path` any more (the state was removed; the record is whole)."""
    _left.pop(_key(path), None)


def _key(path: str | Path) -> str:
    try:
        return os.path.realpath(path)
    except (ValueError, OSError):
        return os.path.abspath(path)


def described() -> str | None:
    """What this process has left on disk, one clause each, or None."""
    return "; ".join(_left.values()) or None


def clear() -> None:
    _left.clear()
