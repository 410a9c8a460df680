"""The library's writers of masks and deltas (`piece_surgery.save_mask`, `piece_surgery.save_delta`):
the format writers behind the rules every command's output follows (io/outputs.check_output), so a
call from Python never replaces what the path holds unless asked, and never replaces a folder of
other files, a home folder or the working folder even then."""

from __future__ import annotations

from pathlib import Path

from piece_surgery.formats import delta_folder
from piece_surgery.formats import mask as mask_format
from piece_surgery.formats.delta import Delta
from piece_surgery.formats.mask import Mask
from piece_surgery.io.outputs import check_output
from piece_surgery.io.sniff import DELTA
from piece_surgery.runtime.errors import PieceError

FLAG = "overwrite=True"  # how messages name the permission to replace, for a Python caller


def save_mask(mask: Mask, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write `mask` as a mask file (docs/formats.md) at `path`, atomically; returns the path
    written. PieceError for something other than a Mask or a path, or an existing file without
    `overwrite` (or a folder there, even with it)."""
    if not isinstance(mask, Mask):
        raise PieceError(f"mask must be a Mask (from score or load_mask), got {type(mask).__name__}")
    target = check_output(_path(path, "path"), overwrite=overwrite, kind="file", flag=FLAG)
    mask_format.save_mask(mask, target)
    return target


def save_delta(
    delta: Delta,
    folder: str | Path,
    *,
    overwrite: bool = False,
    format_version: int = delta_folder.DEFAULT_FORMAT,
    card: str | None = None,
) -> int:
    """Write `delta` as a delta folder at `folder`, atomically, in format `format_version`;
    `card` is its README.md (default: a generated model card). Returns the bytes of tensor data
    written. PieceError for something other than a Delta or a path, an existing folder without
    `overwrite`, or one that holds anything but a delta (or a home, working or git folder) even
    with it."""
    if not isinstance(delta, Delta):
        raise PieceError(
            f"delta must be a Delta (from load_delta, diff or to_delta), got {type(delta).__name__}"
        )
    target = check_output(_path(folder, "folder"), overwrite=overwrite, kind=DELTA, flag=FLAG)
    return delta_folder.save_delta(delta, target, format_version=format_version, card=card)


def _path(value: object, name: str) -> str | Path:
    if not isinstance(value, str | Path) or not str(value).strip():
        raise PieceError(f"{name} must be a path (str or Path), got {type(value).__name__}")
    return value
