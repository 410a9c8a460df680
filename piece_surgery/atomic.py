"""Write outputs under a temporary name and rename at the end, so failures leave nothing behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from piece_surgery.errors import PieceError


def check_output(path: Path, *, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse to write over an existing output (unless asked) or over one of the inputs."""
    resolved = path.resolve()
    for source in inputs:
        src = source.resolve()
        if resolved == src or src.is_relative_to(resolved):
            raise PieceError(f"output '{path}' overlaps input '{source}'; choose another output path")
    if path.exists() and not overwrite:
        raise PieceError(f"output '{path}' already exists; pass --overwrite to replace it")
    if not path.parent.exists():
        raise PieceError(f"output folder '{path.parent}' does not exist; create it first")


@contextmanager
def atomic_path(path: Path, *, is_dir: bool) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
