"""Candidates measured or asked against one base (`eval`, `generate`): what a reference holds (a
delta, a PEFT adapter, a merged checkpoint), an adapter read as the delta its merge makes, and a
merged checkpoint loaded beside the base (checked to be the base's architecture)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from piece_surgery.formats.artifacts import open_artifact
from piece_surgery.formats.delta import Delta
from piece_surgery.io.hub import resolve
from piece_surgery.io.sniff import ADAPTER, CHECKPOINT, DELTA, sniff
from piece_surgery.merging.adapters import adapter_as_delta
from piece_surgery.models.checkpoint import Checkpoint
from piece_surgery.recipes.run import Run, load_base
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.options import RunOptions


def identify(ref: str) -> tuple[str, Path, Delta | None]:
    """(kind: "delta", "adapter" or "checkpoint"; where it lies; the delta, for a delta)."""
    source = resolve(
        ref, what="candidate", patterns=["*.safetensors", "*.json", "*.md", "*.txt", "*.model", "*.jinja"]
    )
    path = source.path
    kinds = [k for k in sniff(path) if k in (DELTA, ADAPTER, CHECKPOINT)]
    if kinds and kinds[0] == DELTA:
        return "delta", path, open_artifact(ref, want="delta").delta
    if kinds:
        return kinds[0], path, None
    raise PieceError(
        f"candidate '{ref}' is neither a delta folder, a PEFT adapter nor a model checkpoint folder"
    )


def adapter_delta(ref: str, base_ref: str, run: RunOptions) -> Delta:
    """A PEFT adapter as the delta its merge into the base makes. The run's --max-length and
    --max-samples say how its data is read, not how a base is loaded."""
    loading = replace(run, max_length=RunOptions().max_length, max_samples=None)
    return adapter_as_delta(ref, base_ref=base_ref, load_base=lambda r: load_base(r, loading))


def load_beside(ref: str, base: Checkpoint, session: Run) -> torch.nn.Module:
    """A merged checkpoint, checked to be the base's architecture (names and shapes), in eval mode."""
    other = session.open(ref, what="candidate")
    for name, info in base.layout.items():
        if name not in other.layout or other.layout[name].shape != info.shape:
            raise PieceError(
                f"candidate '{ref}' is not a checkpoint of the base's model: tensor '{name}' "
                + (
                    "is missing"
                    if name not in other.layout
                    else f"is {list(other.layout[name].shape)}, not {list(info.shape)}"
                )
            )
    return session.load_model(other).module.eval()
