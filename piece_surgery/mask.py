"""Masks: global top-k selection, the mask file (safetensors + JSON metadata), and summaries.

File format (version 1): one safetensors file. Each selected tensor `NAME` is stored under the key
`NAME` as a 1-D int32 (int64 when the tensor has 2^31 entries or more) array of sorted, unique
flat (row-major) indices. The header metadata holds `format` = "piece-surgery/mask",
`format_version` = "1", and JSON strings: `method`, `density`, `k`, `eligible`, `shapes`
(every eligible tensor's shape), `model`, `data`, `seed`, `tool_version`, `options`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from piece_surgery import __version__
from piece_surgery.atomic import atomic_path
from piece_surgery.checkpoint import save_shard
from piece_surgery.errors import PieceError
from piece_surgery.naming import is_norm, layer_of, module_kind

FORMAT = "piece-surgery/mask"
FORMAT_VERSION = "1"


@dataclass
class Mask:
    indices: dict[str, torch.Tensor]  # tensor name -> sorted unique flat indices (int64 in memory)
    shapes: dict[str, tuple[int, ...]]  # every eligible tensor's shape
    info: dict = field(default_factory=dict)  # method, density, k, eligible, model, data, seed, ...

    @property
    def k(self) -> int:
        return sum(int(i.numel()) for i in self.indices.values())

    @property
    def eligible(self) -> int:
        return sum(_numel(s) for s in self.shapes.values())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def k_for_density(density: float, eligible: int) -> int:
    if not (0.0 < density <= 1.0):
        raise PieceError(f"density {density} is outside (0, 1]; the paper uses 0.001")
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


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def save_mask(mask: Mask, path: Path) -> None:
    """Write atomically: a temporary file renamed into place."""
    tensors = {n: i.to(index_dtype(_numel(mask.shapes[n]))) for n, i in mask.indices.items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool_version": json.dumps(__version__),
        "k": json.dumps(mask.k),
        "eligible": json.dumps(mask.eligible),
        "shapes": json.dumps({n: list(s) for n, s in sorted(mask.shapes.items())}),
    }
    for key, value in mask.info.items():
        if key not in meta:
            meta[key] = json.dumps(value, sort_keys=True)
    with atomic_path(Path(path), is_dir=False) as tmp:
        save_shard(tensors, tmp, meta)


def load_mask(path: Path) -> Mask:
    """Read and validate a mask file: sorted, unique, in-range indices of known tensors."""
    path = Path(path)
    if not path.is_file():
        raise PieceError(f"mask '{path}' not found")
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != FORMAT:
                raise PieceError(f"'{path}' is not a piece-surgery mask (no '{FORMAT}' header)")
            if meta.get("format_version") != FORMAT_VERSION:
                raise PieceError(
                    f"mask '{path}' has format version {meta.get('format_version')}; "
                    f"this piece-surgery reads {FORMAT_VERSION}: upgrade piece-surgery"
                )
            info = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "format_version")}
            indices = {name: f.get_tensor(name).to(torch.int64) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        if isinstance(exc, PieceError):
            raise
        raise PieceError(f"cannot read mask '{path}': corrupt or truncated file") from exc
    shapes = {n: tuple(s) for n, s in info.pop("shapes").items()}
    for name, idx in indices.items():
        if name not in shapes:
            raise PieceError(f"mask '{path}' selects '{name}' but lists no shape for it: corrupt mask")
        validate_indices(idx, _numel(shapes[name]), f"mask '{path}', tensor '{name}'")
    return Mask(indices, shapes, info)


def validate_indices(idx: torch.Tensor, numel: int, where: str) -> None:
    if idx.dim() != 1:
        raise PieceError(f"{where}: indices must be 1-D")
    if idx.numel() == 0:
        return
    if int(idx.min()) < 0 or int(idx.max()) >= numel:
        raise PieceError(f"{where}: index out of range for a tensor of {numel} entries")
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise PieceError(f"{where}: indices are not sorted and unique")


def summarize(counts: dict[str, int], sizes: dict[str, int]) -> dict:
    """Per-layer and per-module-kind totals of selected entries, plus the norm-weight share."""
    by_layer: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, size in sizes.items():
        selected = counts.get(name, 0)
        layer = layer_of(name)
        for table, key in ((by_layer, "-" if layer is None else str(layer)), (by_kind, module_kind(name))):
            table[key][0] += selected
            table[key][1] += size
    total = sum(counts.values())
    norms = sum(c for n, c in counts.items() if is_norm(n))
    layer_order = sorted(by_layer, key=lambda s: (s == "-", int(s) if s.isdigit() else 0))
    return {
        "selected": total,
        "tensors_touched": sum(1 for c in counts.values() if c),
        "norm_share": norms / total if total else 0.0,
        "by_layer": {k: {"selected": by_layer[k][0], "size": by_layer[k][1]} for k in layer_order},
        "by_kind": {k: {"selected": v[0], "size": v[1]} for k, v in sorted(by_kind.items())},
    }


def mask_summary(mask: Mask) -> dict:
    counts = {n: int(i.numel()) for n, i in mask.indices.items()}
    sizes = {n: _numel(s) for n, s in mask.shapes.items()}
    return {
        "kind": "mask",
        **{k: mask.info.get(k) for k in ("method", "density", "model", "data")},
        "k": mask.k,
        "eligible": mask.eligible,
        **summarize(counts, sizes),
    }
