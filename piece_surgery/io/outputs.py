"""Outputs: checked before any work, written under a temporary name and renamed at the end, so a
failed, interrupted or killed command never leaves a half-written output at its final path, and
never writes into, over or around an input, however either is spelled.

One rule for every command (`check_output`): the output may not be, contain or lie inside any input,
and may not be or contain a protected folder (a recipe's own folder, whose outputs normally lie
inside it), with or without --overwrite. Paths are compared as the command opens them: `~`
expanded, `..` and symlinks resolved. --overwrite replaces a folder only when it holds what the
command writes (a delta, a checkpoint, an adapter) or nothing: never a home folder, the current
folder or one above it, a mount point, a git repository, or a folder of other files, since
replacing a folder removes everything in it.

Temporaries are folders `.NAME.PID.RANDOM.tmp` (and `.old` for an output being replaced) beside the
output, each holding a marker that names the output it belongs to. A later run for the same output
removes only those whose marker says so and whose process is gone, and puts back an output a killed
run had moved aside before its replacement was in place.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from piece_surgery.io.sniff import ADAPTER, CHECKPOINT, DELTA, sniff
from piece_surgery.runtime import leftovers
from piece_surgery.runtime.errors import PieceError, first_line, quote
from piece_surgery.runtime.paths import followable, is_present, real_path, what_is

_DISK_ERRORS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
MARKER = ".piece-surgery-temporary"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]*\.(?P<kind>tmp|old)$")
# Outputs check_output found absent with no leave to replace (as given, and the flag that would give
# it): one there by the rename was written by another command meanwhile, not this one's to replace.
_ABSENT_WHEN_CHECKED: dict[Path, tuple[str, str]] = {}


def input_path(ref: str | Path) -> Path | None:
    """Where a command reads `ref` from, as it opens it (`~` expanded, `..` and symlinks resolved);
    None for what is not a local path (a Hub repo id, `self`, `general`). PieceError for a path the
    system cannot follow (a link loop, a name too long)."""
    path = Path(ref).expanduser()
    return real_path(path, "input") if is_present(path) else None


def output_path(ref: str | Path) -> Path:
    """Where a command writes `ref`: its folder resolved (`~`, `..`, symlinks), its own name kept.
    PieceError for a path that names no file or folder of its own (`.`, `..`, `/`), and for one the
    system cannot follow (a link loop, a NUL character, a name too long)."""
    path = Path(ref).expanduser()
    if path.name in ("", ".", ".."):
        raise PieceError(f"output '{ref}' names no file or folder of its own; give a name, e.g. {ref}/out")
    target = real_path(path.parent, "output folder") / path.name
    if followable(target) is None:
        raise PieceError(f"output '{quote(ref)}' is {what_is(target)}; choose another path")
    return target


def overlaps(output: Path, source: Path, *, inside_ok: bool = False) -> bool:
    """Whether writing `output` could touch `source`: the same, one inside the other (an output
    inside `source` is fine with `inside_ok`: a recipe's folder holds its outputs)."""
    if output == source or source.is_relative_to(output):
        return True
    return not inside_ok and output.is_relative_to(source)


def check_output(
    path: str | Path,
    *,
    overwrite: bool,
    inputs: Iterable[str | Path | None] = (),
    protected: Iterable[str | Path] = (),
    kind: str = "folder",
    reads: ReadsThrough | None = None,
    flag: str = "--overwrite",
) -> Path:
    """Check an output before any work and return the path to write it at (output_path).

    `kind`: "file", or the folder the command writes: DELTA, CHECKPOINT or ADAPTER (io/sniff), or
    "folder" for any of them. Refused, in one line: an output that overlaps an input or a protected
    folder (refuse_overlap; `reads` names what reading an input file reads besides it); one that
    exists (unless `overwrite`); a file where a folder is written or the reverse; an existing folder
    that holds anything but what `kind` names (refuse_replacing); a missing or read-only folder.
    `flag`: how the caller grants replacing, as messages name it (a library's `overwrite=True`).
    Removes what killed runs left for this output."""
    target = output_path(path)
    refuse_overlap(path, inputs, protected, reads=reads)
    _ABSENT_WHEN_CHECKED.pop(target, None)
    if not overwrite and not (target.exists() or target.is_symlink()):
        _ABSENT_WHEN_CHECKED[target] = (str(path), flag)
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise PieceError(f"output '{path}' already exists; pass {flag} to replace it")
        if kind != "file" and not target.is_dir():
            raise PieceError(
                f"output '{path}' is a file and this command writes a folder; choose another path"
            )
        if kind == "file" and target.is_dir():
            raise PieceError(
                f"output '{path}' is a folder and this command writes a file; choose another path"
            )
        if kind != "file":
            refuse_replacing(target, path, kind, flag)
    if not target.parent.is_dir():
        raise PieceError(f"output folder '{target.parent}' does not exist; create it first")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise PieceError(f"output folder '{target.parent}' is not writable; choose another output path")
    remove_stale_temporaries(target)
    return target


_FOLDER_KINDS = {DELTA: "a delta", CHECKPOINT: "a checkpoint", ADAPTER: "a PEFT adapter"}


def refuse_replacing(
    target: Path, shown: str | Path, kind: str = "folder", flag: str = "--overwrite"
) -> None:
    """PieceError unless --overwrite may replace the existing folder `target` (`shown` as the user
    gave it): it must hold `kind` (DELTA, CHECKPOINT or ADAPTER; "folder": any of them) or nothing,
    and be no place a user keeps other work in (the home folder, the current folder or a folder
    above it, a mount point, a git repository). Replacing a folder removes all it holds. `flag`
    as check_output's."""
    real = target.resolve()
    cwd = Path.cwd().resolve()
    places = {p: "a folder above the current one" for p in cwd.parents}
    places.update({cwd: "the current folder", Path.home().resolve(): "your home folder"})
    place = places.get(real) or ("a mount point" if os.path.ismount(real) else None)
    if place is not None:
        raise PieceError(
            f"output '{shown}' is {place}, which {flag} never replaces; name a new folder, e.g. {shown}/out"
        )
    entries = sorted(p.name for p in real.iterdir())
    if not entries:
        return
    wanted = list(_FOLDER_KINDS) if kind == "folder" else [kind]
    found = [k for k in sniff(real) if k in _FOLDER_KINDS]
    if ".git" in entries:
        problem = "is a git repository"
    elif any(k in wanted for k in found):
        return
    elif found:
        problem = f"holds {_FOLDER_KINDS[found[0]]}"
    else:
        problem = f"holds other files (such as '{entries[0]}')"
    wants = " or ".join(_FOLDER_KINDS[k] for k in wanted)
    raise PieceError(
        f"output '{shown}' {problem}; {flag} only replaces {wants} (it removes the whole folder): "
        "remove it yourself or choose another output"
    )


# What reading an input file also reads, given the path as the command names it (a data file's
# images, say: data/files.py); each path as the reader opens it.
ReadsThrough = Callable[[Path], list[Path]]


def refuse_overlap(
    output: str | Path,
    inputs: Iterable[str | Path | None],
    protected: Iterable[str | Path] = (),
    *,
    reads: ReadsThrough | None = None,
) -> None:
    """The output may not be, contain or lie inside any input (None entries are options left out,
    and what is not a local path, a Hub repo id, is no file of the user's), nor anything an input
    reads through (the files a folder's links point to; what `reads` says a file reads), and may
    not be or contain a protected folder. Called again for inputs a command finds on its own (a
    base named inside an adapter's config) once it knows them."""
    real = real_path(output_path(output))  # an output that is itself a symlink: where it points
    for source in inputs:
        resolved = input_path(source) if source is not None else None
        if resolved is None:
            continue
        also = reads(Path(source).expanduser()) if reads is not None and resolved.is_file() else []
        # a path the system cannot follow (a loop, a NUL character) reads nothing: its reader says so
        followed = [p for p in map(followable, also) if p is not None]
        for read in (resolved, *_read_through(resolved), *followed):
            if overlaps(real, read):
                shown = "" if read == resolved else f" (it reads '{read}')"
                raise PieceError(
                    f"output '{output}' overlaps input '{source}'{shown}; choose an output outside the inputs"
                )
    for folder in protected:
        resolved = input_path(folder)
        if resolved is not None and overlaps(real, resolved, inside_ok=True):
            raise PieceError(
                f"output '{output}' would replace '{folder}', which holds an input; choose another output"
            )


def _read_through(source: Path) -> list[Path]:
    """What reading a folder also reads: where its files that are links point (a Hub cache
    snapshot's files point into its blobs)."""
    if source.is_dir():
        links = [followable(child) for child in source.iterdir() if child.is_symlink()]
        return [link for link in links if link is not None]  # a loop reads nothing
    return []


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Clean up what killed runs left for the output `path`: temporaries whose marker names `path`
    and whose process is gone. A replaced output a run had moved aside (`.old`) is put back when
    nothing took its place; anything without our marker, or of a live process, is left alone."""
    path = Path(path)
    handled = []
    if not path.parent.is_dir():
        return handled
    for sibling in sorted(path.parent.iterdir()):
        match = _TEMPORARY.match(sibling.name)
        if not match or match["name"] != path.name or _alive(int(match["pid"])):
            continue
        if not _marked_for(sibling, path):
            continue
        saved = sibling / path.name
        if match["kind"] == "old" and saved.exists() and not (path.exists() or path.is_symlink()):
            saved.rename(path)  # the replacement never arrived: the output as it was comes back
        shutil.rmtree(sibling, ignore_errors=True)
        handled.append(sibling)
    return handled


def _marked_for(folder: Path, output: Path) -> bool:
    """Whether `folder` is a temporary this tool made for `output` (its marker says so)."""
    marker = folder / MARKER
    if folder.is_symlink() or not folder.is_dir() or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("output") == str(output)
    except (ValueError, OSError, AttributeError):
        return False


def _mark(folder: Path, output: Path) -> None:
    (folder / MARKER).write_text(json.dumps({"output": str(output), "pid": os.getpid()}))


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


def _temporary_folder(path: Path, kind: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=f".{kind}", dir=path.parent))
    _mark(folder, path)
    return folder


@contextmanager
def atomic_path(path: Path, *, is_dir: bool) -> Iterator[Path]:
    """Yield a temporary path to write `path` at; on success it replaces `path` (with the
    permissions a plain open() under the umask gives), on any failure or interrupt it is removed.
    `path` should come from check_output (output_path). A full disk becomes a one-line error. What
    killed runs left for `path` is removed first (a file edited in place, delta.json by eval
    --record, has no check_output to do it), and a replaced output is noted as written
    (runtime/leftovers: an interrupted command then says so). An output check_output found absent,
    without leave to replace it, that another command wrote meanwhile is refused, not replaced."""
    path = output_path(path)
    remove_stale_temporaries(path)
    work = _temporary_folder(path, "tmp")
    tmp = work / "output" if is_dir else work / path.name
    if is_dir:
        tmp.mkdir()
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
        _refuse_newcomer(path)
        # a link is replaced, never followed (the output keeps its own name); os.replace puts a file
        # over a link, but no folder over anything
        if (path.is_dir() and not path.is_symlink()) or (is_dir and path.is_symlink()):
            old = _temporary_folder(path, "old")
            path.rename(old / path.name)  # out of the way in one rename, then deleted
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        leftovers.note(path, f"'{path}' is written")
    finally:
        _ABSENT_WHEN_CHECKED.pop(path, None)
        shutil.rmtree(work, ignore_errors=True)


def _refuse_newcomer(path: Path) -> None:
    """PieceError if `path`, absent when check_output saw it and not to be replaced, is there now:
    another command (the same one run twice at once) wrote it while this one worked."""
    checked = _ABSENT_WHEN_CHECKED.get(path)
    if checked is not None and (path.exists() or path.is_symlink()):
        shown, flag = checked
        raise PieceError(
            f"output '{quote(shown)}' was written by another command while this one ran; nothing was "
            f"written: pass {flag} to replace it, or choose another output"
        )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    match = re.search(r"I/O error: ([^(]+)", str(exc))
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
