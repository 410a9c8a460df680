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

from piece_surgery import __version__
from piece_surgery.checkpoint import Checkpoint, save_shard
from piece_surgery.dtypes import index_dtype, numel
from piece_surgery.errors import PieceError
from piece_surgery.outputs import atomic_path
from piece_surgery.records import CheckpointIdentity, DataRecord

FORMAT = "piece-surgery/mask"
FORMAT_VERSION = 1


@dataclass
class MaskInfo:
    """How a mask was made: the file's header metadata besides the indices and shapes."""

    method: str
    density: float
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # the scoring options as given
    data_pass: dict[str, Any] = field(default_factory=dict)  # batches, tokens and mean loss seen
    model: CheckpointIdentity | None = None  # the checkpoint it was scored on
    data: DataRecord | None = None  # the data it was scored with (None: a data-free method)
    dtype: str | None = None  # the dtype the model was scored in
    tool_version: str = __version__

    def to_metadata(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "density": self.density,
            "seed": self.seed,
            "options": self.options,
            "pass": self.data_pass,
            "model": self.model.to_json() if self.model else None,
            "data": self.data.to_json() if self.data else None,
            "dtype": self.dtype,
            "tool_version": self.tool_version,
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> MaskInfo:
        """ValueError for values of the wrong type."""
        for key, kind in (("method", str), ("density", (int, float)), ("seed", int)):
            if key in meta and not isinstance(meta[key], kind):
                raise ValueError(f"'{key}' has the wrong type")
        for key in ("options", "pass"):
            if meta.get(key) is not None and not isinstance(meta[key], dict):
                raise ValueError(f"'{key}' must be an object")
        return cls(
            method=str(meta.get("method")),
            density=meta.get("density"),
            seed=meta.get("seed", 0),
            options=meta.get("options") or {},
            data_pass=meta.get("pass") or {},
            model=CheckpointIdentity.from_json(meta.get("model")),
            data=DataRecord.from_json(meta.get("data")),
            dtype=meta.get("dtype"),
            tool_version=meta.get("tool_version", "unknown"),
        )


@dataclass
class Mask:
    indices: dict[str, torch.Tensor]  # tensor name -> sorted unique flat indices (int64 in memory)
    shapes: dict[str, tuple[int, ...]]  # every eligible tensor's shape
    info: MaskInfo

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


def check_density(density: float) -> None:
    if not (0.0 < density <= 1.0):
        raise PieceError(f"density {density} is outside (0, 1]; the paper uses 0.001")


def k_for_density(density: float, eligible: int) -> int:
    check_density(density)
    k = int(density * eligible)
    if k < 1:
        raise PieceError(f"density {density} of {eligible} eligible entries selects nothing; raise --density")
    return k


def select_top_k(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The k largest entries over all tensors together; ties broken by tensor name, then index.

    Scores are non-negative floats, whose IEEE bit patterns sort like the values, so the k-th
    largest value is found by bisection over those integers: 31 counting passes, no concatenated
    copy of all scores (which would not fit beside a large model).
    """
    names = sorted(scores)
    total = sum(int(scores[n].numel()) for n in names)
    if not 0 < k <= total:
        raise PieceError(f"cannot select {k} of {total} entries")
    keys = {}
    for n in names:
        s = scores[n].detach().reshape(-1).float()
        if bool(torch.isnan(s).any()) or bool((s < 0).any()):
            raise ValueError(f"scores of {n} must be non-negative numbers")
        keys[n] = (s + 0.0).view(torch.int32)  # +0.0 turns -0.0 into +0.0

    def count_at_least(t: int) -> int:
        return sum(int((keys[n] >= t).sum()) for n in names)

    lo, hi = 0, 0x7F800000  # the threshold lies in [0, +inf]
    while lo < hi:  # largest t with count(>= t) >= k
        mid = (lo + hi + 1) // 2
        if count_at_least(mid) >= k:
            lo = mid
        else:
            hi = mid - 1
    threshold = lo
    above = sum(int((keys[n] > threshold).sum()) for n in names)
    ties_left = k - above
    chosen: dict[str, torch.Tensor] = {}
    for n in names:
        idx_above = torch.nonzero(keys[n] > threshold).flatten()
        idx_tie = torch.nonzero(keys[n] == threshold).flatten()[: max(ties_left, 0)]
        ties_left -= int(idx_tie.numel())
        idx = torch.cat([idx_above, idx_tie]).sort().values.cpu()
        if idx.numel():
            chosen[n] = idx
    return chosen


def save_mask(mask: Mask, path: Path) -> None:
    """Write atomically: a temporary file renamed into place."""
    tensors = {n: i.to(index_dtype(numel(mask.shapes[n]))) for n, i in mask.indices.items()}
    meta = {
        "format": FORMAT,
        "format_version": json.dumps(FORMAT_VERSION),
        "k": json.dumps(mask.k),
        "eligible": json.dumps(mask.eligible),
        "shapes": json.dumps({n: list(s) for n, s in sorted(mask.shapes.items())}),
    }
    for key, value in mask.info.to_metadata().items():
        meta[key] = json.dumps(value, sort_keys=True)
    with atomic_path(Path(path), is_dir=False) as tmp:
        save_shard(tensors, tmp, meta)


def load_mask(path: Path) -> Mask:
    """Read and validate a mask file: its header against the format, and sorted, unique, in-range
    integer indices of tensors whose shapes it lists."""
    path = Path(path)
    where = f"mask '{path}'"
    if not path.is_file():
        raise PieceError(f"{where} not found")
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
            values = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "format_version")}
            indices = {name: f.get_tensor(name) for name in f.keys()}
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
    return Mask({n: i.to(torch.int64) for n, i in indices.items()}, shapes, info)


def _shapes(value, where: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(value, dict) or not value:
        raise PieceError(f"{where}: header 'shapes' must map tensor names to shapes: corrupt mask")
    shapes = {}
    for name, shape in value.items():
        if not is_shape(shape):
            raise PieceError(f"{where}: the shape of '{name}' is not a list of sizes: corrupt mask")
        shapes[name] = tuple(shape)
    return shapes


def is_shape(value) -> bool:
    """A JSON shape: a list of non-negative integers (booleans are not sizes)."""
    return isinstance(value, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in value
    )


def validate_indices(idx: torch.Tensor, size: int, where: str) -> None:
    if idx.dim() != 1:
        raise PieceError(f"{where}: indices must be 1-D")
    if idx.numel() == 0:
        return
    if int(idx.min()) < 0 or int(idx.max()) >= size:
        raise PieceError(f"{where}: index out of range for a tensor of {size} entries")
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise PieceError(f"{where}: indices are not sorted and unique")


def check_mask_fits(mask: Mask, checkpoint: Checkpoint, where: str) -> None:
    """A mask must name tensors of this checkpoint, with their shapes, scored on these very weights."""
    for name in mask.indices:
        if name not in checkpoint.layout:
            raise PieceError(f"{where} selects tensor '{name}', which this model does not have")
        if tuple(checkpoint.layout[name].shape) != tuple(mask.shapes[name]):
            raise PieceError(
                f"{where}: tensor '{name}' is {list(mask.shapes[name])} in the mask but "
                f"{list(checkpoint.layout[name].shape)} in this model"
            )
    scored_on = mask.info.model
    if scored_on and scored_on.fingerprint and scored_on.fingerprint != checkpoint.identity.fingerprint:
        raise PieceError(f"{where} was scored on another model ({scored_on.name}); score this model first")
