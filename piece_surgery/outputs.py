"""Outputs: checked before any work, written under a temporary name and renamed at the end, so a
failed, interrupted or killed command never leaves a half-written output at its final path."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from piece_surgery.errors import PieceError, first_line

_DISK_ERRORS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def check_output(path: Path, *, overwrite: bool, inputs: tuple[Path, ...] = (), kind: str = "folder") -> None:
    """Refuse an output that is, contains or lies inside an input (even with --overwrite), that
    exists (unless --overwrite), that is a file where a folder is written (or the reverse), or whose
    folder is missing or read-only. Removes temporaries that killed runs left for this output."""
    path = Path(path)
    resolved = path.resolve()
    for source in inputs:
        src = Path(source).resolve()
        if resolved == src or src.is_relative_to(resolved) or resolved.is_relative_to(src):
            raise PieceError(
                f"output '{path}' overlaps input '{source}'; choose an output outside the inputs"
            )
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise PieceError(f"output '{path}' already exists; pass --overwrite to replace it")
        if kind == "folder" and not path.is_dir():
            raise PieceError(
                f"output '{path}' is a file and this command writes a folder; choose another path"
            )
        if kind == "file" and path.is_dir():
            raise PieceError(
                f"output '{path}' is a folder and this command writes a file; choose another path"
            )
    parent = path.parent
    if not parent.is_dir():
        raise PieceError(f"output folder '{parent}' does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PieceError(f"output folder '{parent}' is not writable; choose another output path")
    remove_stale_temporaries(path)


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]*\.(tmp|old)$")


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove `.NAME.PID.*.tmp` / `.old` siblings of `path` whose process is gone (a run that was
    killed before it could clean up); those of live processes are left alone."""
    removed = []
    path = Path(path)
    if not path.parent.is_dir():
        return removed
    for sibling in path.parent.iterdir():
        match = _TEMPORARY.match(sibling.name)
        if not match or match["name"] != path.name or _alive(int(match["pid"])):
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)
        removed.append(sibling)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextmanager
def atomic_path(path: Path, *, is_dir: bool) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success it replaces `path` (with the permissions a
    plain open() under the umask gives), on any failure or interrupt it is removed. A full disk
    becomes a one-line error."""
    path = Path(path)
    prefix = f".{path.name}.{os.getpid()}."
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        try:
            yield tmp
            _default_permissions(tmp)
        except (OSError, SafetensorError) as exc:
            if isinstance(exc, SafetensorError) or getattr(exc, "errno", None) in _DISK_ERRORS:
                raise PieceError(
                    f"cannot write '{path}': {_reason(exc)}; free some space or choose another path"
                ) from exc
            raise
        if path.is_dir() and not path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=prefix, suffix=".old", dir=path.parent))
            path.rename(old / path.name)  # out of the way in one rename, then deleted
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc)
    match = re.search(r"I/O error: ([^(]+)", text)
    return match[1].strip().lower() if match else first_line(exc)


def _default_permissions(tmp: Path) -> None:
    """mkstemp/mkdtemp make 0600 files and 0700 folders; an output gets what open() would give."""
    umask = os.umask(0)
    os.umask(umask)
    if tmp.is_dir():
        for root, dirs, files in os.walk(tmp):
            os.chmod(root, 0o777 & ~umask)
            for d in dirs:
                os.chmod(Path(root) / d, 0o777 & ~umask)
            for f in files:
                os.chmod(Path(root) / f, 0o666 & ~umask)
    else:
        os.chmod(tmp, 0o666 & ~umask)
