"""Masks and deltas as artifacts a user names by path or Hub repo id: which kind a reference holds
(io.sniff), loaded and checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from piece_surgery.formats.delta import Delta
from piece_surgery.formats.delta_folder import load_delta
from piece_surgery.formats.mask import Mask, load_mask
from piece_surgery.io import hub
from piece_surgery.io.sniff import (
    ADAPTER,
    CHECKPOINT,
    DELTA,
    DELTA_DESCRIPTION,
    DELTA_WEIGHTS,
    MASK,
    MASK_FILE,
    sniff,
)
from piece_surgery.runtime.errors import PieceError

_ARTIFACT_FILES = ["*.safetensors", "*.json", "*.md"]


@dataclass
class Artifact:
    """A mask or a delta, loaded and checked, and where it came from."""

    ref: str  # as the user named it
    source: hub.Resolved
    path: Path  # the mask file, or the delta folder
    mask: Mask | None = None
    delta: Delta | None = None

    @property
    def kind(self) -> str:
        return "mask" if self.mask is not None else "delta"


def open_artifact(ref: str | Path, *, want: str | None = None) -> Artifact:
    """Resolve `ref` (path or Hub repo id), tell a mask from a delta, load and check it.

    `want` ("mask" or "delta") refuses the other kind with a message about the one asked for.
    """
    ref = str(ref)
    source = hub.resolve(ref, what=want or "mask or delta", patterns=_ARTIFACT_FILES)
    path = source.path
    found = sniff(path)
    kinds = [k for k in found if k in (DELTA, MASK) and want in (None, k)]
    if kinds and kinds[0] == DELTA:
        return Artifact(ref, source, path, delta=load_delta(path, name=f"delta '{ref}'"))
    if kinds:
        file = path / MASK_FILE if path.is_dir() else path
        return Artifact(ref, source, file, mask=load_mask(file))
    hint = _hint(ref, found) if want != "mask" else ""
    if want == "delta":
        raise PieceError(
            f"delta '{ref}' is not a delta folder (needs {DELTA_DESCRIPTION} and {DELTA_WEIGHTS}){hint}"
        )
    if want == "mask":
        raise PieceError(f"mask '{ref}' is not a mask file (.safetensors) or a folder with {MASK_FILE}{hint}")
    raise PieceError(
        f"'{ref}' is neither a mask (.safetensors) nor a delta folder (with {DELTA_DESCRIPTION}){hint}"
    )


def _hint(ref: str, found: list[str]) -> str:
    """What to do with the artifact found where a mask or delta was wanted (a PEFT adapter: a
    fine-tuner's everyday file, which eval and generate take but apply and inspect do not)."""
    if ADAPTER in found:
        return f"; it is a PEFT adapter: make a delta of it with `piece-surgery import {ref} -o DELTA`"
    if CHECKPOINT in found:
        return f"; it is a model checkpoint: `piece-surgery diff BASE {ref} -o DELTA` gives its delta"
    return ""


def open_mask(ref: str | Path) -> Mask:
    return open_artifact(ref, want="mask").mask


def open_delta(ref: str | Path) -> Delta:
    return open_artifact(ref, want="delta").delta


# ---------------------------------------------------------------- inspect


# ---------------------------------------------------------------- push
