"""What scoring reads besides the domain data, checked before the model is loaded: the retain sets
piece-r keeps the model's behaviour on, the entries of earlier tasks to leave alone (--avoid),
and whether the options can select anything at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from piece_surgery.data.examples import Dataset
from piece_surgery.formats.delta import Delta
from piece_surgery.formats.mask import Mask, k_for_density
from piece_surgery.merging.naming import as_stored_in
from piece_surgery.models.checkpoint import Checkpoint
from piece_surgery.models.eligible import eligible_parameters
from piece_surgery.models.fused import fused_slices
from piece_surgery.models.loading import check_weights_match
from piece_surgery.models.pairing import parameter_keys
from piece_surgery.runtime.errors import PieceError, quote
from piece_surgery.runtime.records import AvoidRecord
from piece_surgery.scoring.methods import method_named
from piece_surgery.scoring.options import CHAT, GENERAL, SELF, ScoreOptions
from piece_surgery.scoring.retain import Avoided, ScoringInputs, general_text

# an earlier task to leave alone: (its reference as given, its name in records, the mask or delta)
Avoid = tuple[str, str, Mask | Delta]


def avoided_entries(avoid: Avoid, checkpoint: Checkpoint) -> tuple[dict[str, torch.Tensor], AvoidRecord]:
    """The entries a mask selects or a delta changes, checked against this model's tensors."""
    ref, name, artifact = avoid
    if isinstance(artifact, Mask):
        entries = artifact.indices
        shapes = {n: artifact.shapes[n] for n in entries}
    else:  # names as this model's files spell them
        delta = as_stored_in(artifact, checkpoint.layout, checkpoint.skeleton)
        entries = {n: t.indices for n, t in delta.tensors.items()}
        shapes = {n: t.shape for n, t in delta.tensors.items()}
    for tensor in entries:
        if tensor not in checkpoint.layout:
            raise PieceError(f"--avoid '{ref}' names tensor '{tensor}', which this model does not have")
        if tuple(checkpoint.layout[tensor].shape) != tuple(shapes[tensor]):
            raise PieceError(
                f"--avoid '{ref}': tensor '{tensor}' is {list(shapes[tensor])} there but "
                f"{list(checkpoint.layout[tensor].shape)} in this model"
            )
    count = sum(int(i.numel()) for i in entries.values())
    return dict(entries), AvoidRecord(name, "mask" if isinstance(artifact, Mask) else "delta", count)


def check_data(method: str, data: Any, *, flag: str = "--data") -> None:
    """Data is given exactly when the method reads some (`flag`: how the caller names it)."""
    chosen = method_named(method)
    if chosen.needs_data and data is None:
        raise PieceError(f"{flag} is required for method {method}")
    if not chosen.needs_data and data is not None:
        raise PieceError(f"method {method} reads no data; leave out {flag}")


def check_selectable(checkpoint: Checkpoint, options: ScoreOptions, avoid: Avoided) -> None:
    """Before the model is loaded (on its meta-device skeleton): some parameter is eligible, the
    density selects at least one entry, and --avoid leaves enough of them to select."""
    skeleton = checkpoint.skeleton()
    check_weights_match(skeleton, checkpoint.layout, checkpoint.folder)
    keys = parameter_keys(skeleton, checkpoint.layout)
    slices = fused_slices(skeleton, checkpoint.layout)
    params = eligible_parameters(
        skeleton, keys, include=options.include, exclude=options.exclude, slices=slices
    )
    eligible = sum(p.numel() for p in params.values())
    k = k_for_density(options.density, eligible)
    avoided = sum(int(torch.unique(idx).numel()) for name, idx in avoid.entries.items() if name in params)
    if k > eligible - avoided:
        raise PieceError(
            f"--avoid leaves {eligible - avoided:,} of the {eligible:,} eligible entries, fewer than the "
            f"{k:,} density {options.density} selects: lower --density, or avoid fewer masks"
        )


def check_each_set_once(retain: Sequence[Any], *, flag: str) -> None:
    """PieceError for a retain set given twice (it would count twice in the retain Fisher): a named
    set, the same file however spelled (the shipped set by name or by path), the same object."""
    seen: dict = {}
    for ref in retain:
        if isinstance(ref, str) and ref in (SELF, CHAT):
            same = ref
        elif isinstance(ref, str | Path):
            same = general_text().resolve() if str(ref) == GENERAL else Path(ref).resolve()
        else:  # records in memory
            same = id(ref)
        if same in seen:
            raise PieceError(
                f"{flag} '{quote(ref)}' is the same set as {flag} '{quote(seen[same])}': give each set once"
            )
        seen[same] = ref


def read_scoring_inputs(
    checkpoint: Checkpoint,
    retain: Sequence[str | Path],
    avoid: Sequence[Avoid],
    read: Callable[[Path, str | None], Dataset],
) -> ScoringInputs:
    """Read the retain files (`read(path, name)` tokenizes one, as the run says) and the entries to
    avoid (masks and deltas, opened: formats.artifacts.open_artifact)."""
    inputs = ScoringInputs()
    check_each_set_once(retain, flag="--retain")
    for ref in retain:
        if str(ref) in (SELF, CHAT):  # written by the model once it is loaded
            inputs.retain.append(str(ref))
        elif str(ref) == GENERAL:
            inputs.retain.append(read(general_text(), GENERAL))
        else:
            inputs.retain.append(read(Path(ref), None))
    for item in avoid:
        entries, record = avoided_entries(item, checkpoint)
        for name, idx in entries.items():
            known = inputs.avoid.entries.get(name)
            inputs.avoid.entries[name] = idx if known is None else torch.unique(torch.cat([known, idx]))
        inputs.avoid.records.append(record)
    return inputs
