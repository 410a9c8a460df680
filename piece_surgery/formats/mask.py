"""Masks: which entries of which tensors are selected; global top-k selection; the mask file.

The file format is specified in docs/formats.md ("Mask file").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from piece_surgery.formats.card import GENERATED_MARK, front_matter
from piece_surgery.formats.codec import is_shape, validate_indices
from piece_surgery.io.outputs import atomic_path
from piece_surgery.models.layout import save_shard
from piece_surgery.models.naming import selection_breakdown
from piece_surgery.runtime.distributed import World
from piece_surgery.runtime.dtypes import index_dtype, numel
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.json_files import parse_json
from piece_surgery.runtime.options import check_density
from piece_surgery.runtime.paths import not_there, what_is
from piece_surgery.runtime.records import (
    AvoidRecord,
    CheckpointIdentity,
    DataRecord,
    JsonRecord,
    RetainRecord,
)
from piece_surgery.runtime.version import __version__

FORMAT = "piece-surgery/mask"
FORMAT_VERSION = 1
FISHER = "::fisher"  # optional per-tensor extra: keys with "::" are extras, not tensor names


@dataclass
class MaskInfo(JsonRecord):
    """How a mask was made: the file's header metadata besides the indices and shapes."""

    method: str
    density: float
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # the scoring and run options
    # batches, tokens and mean loss seen (header key `pass`)
    data_pass: dict[str, Any] = field(default_factory=dict, metadata={"json": "pass"})
    model: CheckpointIdentity | None = None  # the checkpoint it was scored on
    data: DataRecord | None = None  # the data it was scored with (None: a data-free method)
    dtype: str | None = None  # the dtype the model was scored in
    retain: RetainRecord | None = None  # piece-r: the text it was told to keep, and the damping
    avoid: list[AvoidRecord] = field(default_factory=list)  # earlier tasks' entries left out
    tool_version: str = __version__

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> MaskInfo:
        """From the header's decoded values; ValueError for values of the wrong type."""
        meta = {k: v for k, v in meta.items() if v is not None or k in ("model", "data", "retain", "dtype")}
        return cls.from_json(meta)


@dataclass
class Mask:
    indices: dict[str, torch.Tensor]  # tensor name -> sorted unique flat indices (int64 in memory)
    shapes: dict[str, tuple[int, ...]]  # every eligible tensor's shape
    info: MaskInfo
    # piece-r: the per-token retain Fisher at the selected entries (fp32, aligned with indices), from
    # which training predicts its drift; None for other methods
    fisher: dict[str, torch.Tensor] | None = None

    @property
    def k(self) -> int:
        return sum(int(i.numel()) for i in self.indices.values())

    @property
    def eligible(self) -> int:
        return sum(numel(s) for s in self.shapes.values())

    def digest(self) -> str:
        """sha256 of the selected entries (names and indices), e.g. to tie a training state to it."""
        digest = hashlib.sha256()
        for name in sorted(self.indices):
            digest.update(name.encode())
            digest.update(self.indices[name].to(torch.int64).numpy().tobytes())
        return digest.hexdigest()


def check_scored_on(mask: Mask, identity: CheckpointIdentity | None, where: str) -> None:
    """The mask was scored on the checkpoint `identity` names (by its weights' fingerprint), where
    both say; PieceError naming the model it was scored on otherwise. `where` names the mask."""
    scored_on = mask.info.model
    known = identity is not None and identity.fingerprint and scored_on and scored_on.fingerprint
    if known and scored_on.fingerprint != identity.fingerprint:
        raise PieceError(f"{where} was scored on another model ({scored_on.name}); score this model first")


def k_for_density(density: float, eligible: int) -> int:
    check_density(density)
    k = int(density * eligible)
    if k < 1:
        raise PieceError(f"density {density} of {eligible} eligible entries selects nothing; raise --density")
    return k


def select_top_k(
    scores: dict[str, torch.Tensor],
    k: int,
    *,
    avoid: dict[str, torch.Tensor] | None = None,
    world: World | None = None,
    offsets: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """The k largest entries over all tensors together; ties broken by tensor name, then index.

    `scores` maps tensor names to non-negative fp32 (or castable) scores of any shape, on any
    device; entries in `avoid` (tensor name -> flat indices) are never chosen. Returns tensor name
    -> sorted unique int64 flat indices on the CPU, for the tensors with a chosen entry. Raises
    PieceError if fewer than k entries can be chosen, ValueError for a negative or NaN score.

    Scores are non-negative floats, whose IEEE bit patterns sort like the values, so the k-th
    largest value is found by bisection over those integers: 31 counting passes, no concatenated
    or sorted copy of the scores (which would not fit beside a large model). With `offsets`, each
    rank of `world` holds the flat entries [offset, offset + numel) of every tensor (FSDP shards):
    counts are summed over the ranks, and every rank returns the same whole selection.
    """
    names = sorted(scores)
    total_of = world.sum if offsets is not None else float
    local = {n: _local_indices(avoid, n, offsets, scores[n].numel()) for n in names}
    local = {n: e for n, e in local.items() if e is not None}
    size = sum(int(scores[n].numel()) for n in names) - sum(int(e.numel()) for e in local.values())
    total = int(total_of(size))
    if not 0 < k <= total:
        raise PieceError(f"cannot select {k} of {total} entries")
    keys = {n: _score_bits(n, scores[n]) for n in names}

    def count_at_least(t: int) -> int:
        counted = sum(int((keys[n] >= t).sum()) for n in names)
        counted -= sum(int((keys[n][e] >= t).sum()) for n, e in local.items())
        return int(total_of(counted))

    lo, hi = 0, 0x7F800000  # the threshold lies in [0, +inf]
    while lo < hi:  # largest t with count(>= t) >= k
        mid = (lo + hi + 1) // 2
        if count_at_least(mid) >= k:
            lo = mid
        else:
            hi = mid - 1
    threshold = lo
    ties_left = k - count_at_least(threshold + 1)
    chosen: dict[str, torch.Tensor] = {}
    for n in names:
        idx_above = _without(torch.nonzero(keys[n] > threshold).flatten(), local.get(n))
        idx_tie = _without(torch.nonzero(keys[n] == threshold).flatten(), local.get(n))
        if offsets is None:
            take = max(ties_left, 0)
            ties_left -= min(int(idx_tie.numel()), take)
        else:  # ties go to lower flat indices first: to lower ranks first
            counts = world.gather(int(idx_tie.numel()))
            take = min(max(ties_left - sum(counts[: world.rank]), 0), counts[world.rank])
            ties_left -= min(sum(counts), max(ties_left, 0))
        idx = torch.cat([idx_above, idx_tie[:take]]).sort().values.cpu()
        if offsets is not None:
            idx = idx + offsets[n]
        if idx.numel():
            chosen[n] = idx
    return _gathered(chosen, world) if offsets is not None else chosen


def _local_indices(avoid, name: str, offsets, size: int) -> torch.Tensor | None:
    """The avoided flat indices of `name` that lie in this rank's part, made local."""
    if not avoid or name not in avoid:
        return None
    idx = torch.unique(avoid[name].to(torch.int64))
    if offsets is None:
        return idx
    idx = idx - offsets[name]
    return idx[(idx >= 0) & (idx < size)]


def _gathered(chosen: dict[str, torch.Tensor], world: World) -> dict[str, torch.Tensor]:
    merged: dict[str, list[torch.Tensor]] = {}
    for part in world.gather(chosen):
        for name, idx in part.items():
            merged.setdefault(name, []).append(idx)
    return {n: torch.cat(merged[n]).sort().values for n in sorted(merged)}


def _score_bits(name: str, score: torch.Tensor) -> torch.Tensor:
    """The scores' fp32 bit patterns as int32 (a view when they already are fp32: no copy)."""
    s = score.detach().reshape(-1).float()
    if bool(torch.isnan(s).any()) or bool((s < 0).any()):
        raise ValueError(f"scores of {name} must be non-negative numbers")
    bits = s.view(torch.int32)
    if bool((bits < 0).any()):  # -0.0 has the sign bit set: make it +0.0 (in a copy)
        bits = (s + 0.0).view(torch.int32)
    return bits


def _without(indices: torch.Tensor, avoided: torch.Tensor | None) -> torch.Tensor:
    if avoided is None or indices.numel() == 0:
        return indices
    return indices[~torch.isin(indices, avoided.to(indices.device))]


def save_mask(mask: Mask, path: Path) -> None:
    """Write atomically: a temporary file renamed into place."""
    tensors = {n: i.to(index_dtype(numel(mask.shapes[n]))) for n, i in mask.indices.items()}
    for name, values in (mask.fisher or {}).items():
        tensors[f"{name}{FISHER}"] = values.float().contiguous()
    meta = {
        "format": FORMAT,
        "format_version": json.dumps(FORMAT_VERSION),
        "k": json.dumps(mask.k),
        "eligible": json.dumps(mask.eligible),
        "shapes": json.dumps({n: list(s) for n, s in sorted(mask.shapes.items())}),
    }
    for key, value in mask.info.to_json().items():
        meta[key] = json.dumps(value, sort_keys=True)
    with atomic_path(Path(path), is_dir=False) as tmp:
        save_shard(tensors, tmp, meta)


def load_mask(path: Path) -> Mask:
    """Read and validate a mask file: its header against the format, and sorted, unique, in-range
    integer indices of tensors whose shapes it lists."""
    path = Path(path)
    where = f"mask '{path}'"
    if what_is(path) != "a file":
        raise PieceError(f"{where} {not_there(path)}: give a mask file (.safetensors)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != FORMAT:
                raise PieceError(f"'{path}' is not a piece-surgery mask (no '{FORMAT}' header)")
            if str(meta.get("format_version")) != str(FORMAT_VERSION):
                raise PieceError(
                    f"{where} has format version {meta.get('format_version')!r}; "
                    f"this piece-surgery reads {FORMAT_VERSION}: upgrade piece-surgery"
                )
            values = {
                k: parse_json(v, f"{where}: header value '{k}'")
                for k, v in meta.items()
                if k not in ("format", "format_version")
            }
            indices = {name: f.get_tensor(name) for name in f.keys() if "::" not in name}
            extras = {name: f.get_tensor(name) for name in f.keys() if name.endswith(FISHER)}
    except (SafetensorError, OSError, ValueError) as exc:
        if isinstance(exc, PieceError):
            raise
        raise PieceError(f"cannot read {where}: corrupt or truncated file") from exc
    shapes = _shapes(values.get("shapes"), where)
    for name, idx in indices.items():
        if name not in shapes:
            raise PieceError(f"{where} selects '{name}' but lists no shape for it: corrupt mask")
        if idx.dtype not in (torch.int32, torch.int64) or idx.numel() == 0:
            raise PieceError(f"{where}, tensor '{name}': indices must be a non-empty int32/int64 array")
        validate_indices(idx, numel(shapes[name]), f"{where}, tensor '{name}'")
    try:
        info = MaskInfo.from_metadata(values)
    except (ValueError, TypeError) as exc:
        raise PieceError(f"{where}: malformed header metadata ({exc})") from exc
    fisher = _fisher(extras, indices, where)
    return Mask({n: i.to(torch.int64) for n, i in indices.items()}, shapes, info, fisher)


def _fisher(extras: dict[str, torch.Tensor], indices: dict[str, torch.Tensor], where: str):
    """The optional `NAME::fisher` arrays: all or none, each fp32, finite, >= 0, one per index."""
    if not extras:
        return None
    fisher = {name[: -len(FISHER)]: values for name, values in extras.items()}
    if fisher.keys() != indices.keys():
        raise PieceError(f"{where}: '::fisher' arrays must come with every selected tensor or none")
    for name, values in fisher.items():
        ok = values.dtype == torch.float32 and values.shape == indices[name].shape
        if not ok or not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
            raise PieceError(f"{where}: '{name}{FISHER}' must hold one finite value >= 0 per index")
    return fisher


def _shapes(value, where: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(value, dict) or not value:
        raise PieceError(f"{where}: header 'shapes' must map tensor names to shapes: corrupt mask")
    shapes = {}
    for name, shape in value.items():
        if not is_shape(shape):
            raise PieceError(f"{where}: the shape of '{name}' is not a list of sizes: corrupt mask")
        shapes[name] = tuple(shape)
    return shapes


def mask_breakdown(mask: Mask) -> dict:
    """Entries, tensors and norm share of a mask, and per layer, module kind and expert
    (naming.breakdown)."""
    return selection_breakdown(mask.indices, mask.shapes)


def mask_card(mask: Mask, *, base_model: str | None = None, repo_id: str | None = None) -> str:
    """A card for a pushed mask file."""
    info = mask.info
    base_model = base_model or (info.model.repo_id if info.model else None)
    body = [
        "",
        GENERATED_MARK,
        "",
        "# Importance mask (piece-surgery)",
        "",
        f"{mask.k:,} of {mask.eligible:,} entries ({info.method}, density {info.density}), scored on "
        f"data with sha256 `{info.data.sha256 if info.data else None}`.",
        "",
        "```bash",
        f"piece-surgery train {base_model or 'BASE_MODEL'} --mask {repo_id or 'THIS_MASK'} "
        "--data DATA -o delta",
        "```",
        "",
    ]
    tags = ["piece-surgery", "importance-mask", info.method]
    return "\n".join(front_matter(base_model, tags) + body)
