"""The sparse delta: format, read/write, diff of two checkpoints, apply (merge, stack), in place.

A delta is a folder:
- `delta.safetensors`: for every touched tensor NAME, three 1-D tensors of equal length:
  `NAME::indices` (sorted unique flat indices; int32, int64 for tensors of 2^31+ entries),
  `NAME::base` and `NAME::tuned` (the base and tuned values at those entries, in the checkpoint's
  dtype, stored as their raw bit patterns in a signed integer of the same width so that numpy,
  which has no bfloat16, reads them). The change is `tuned - base`.
- `delta.json`: format, version, per-tensor shape/dtype/count, the base's identity, provenance and
  the sha256 of `delta.safetensors` (a delta checks itself on load).
- `README.md`: a model card.

Why base and tuned values rather than one change tensor: for bf16/fp16 it costs the same 4 bytes per
entry as an fp32 change (8 with the index), yet applying onto the own base is bit-exact by
construction (the tuned value is written as is), the base check is exact per entry rather than a
digest, and task arithmetic onto another base still has the exact change `tuned - base`.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from piece_surgery import __version__
from piece_surgery.atomic import atomic_path, check_output
from piece_surgery.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    ShardReader,
    TensorInfo,
    copy_with_patches,
    identity,
    read_layout,
    save_shard,
    weight_files,
    write_index,
)
from piece_surgery.data import file_sha256
from piece_surgery.errors import PieceError
from piece_surgery.hub import Resolved, resolve
from piece_surgery.mask import index_dtype, select_top_k, summarize, validate_indices

FORMAT = "piece-surgery/delta"
FORMAT_VERSION = 1
WEIGHTS = "delta.safetensors"
DESCRIPTION = "delta.json"
CONFLICT_POLICIES = ("sum", "mean", "error")
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_FLOATS = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass
class TensorDelta:
    indices: torch.Tensor  # int64, sorted unique flat indices
    base: torch.Tensor  # base values at those indices (checkpoint dtype)
    tuned: torch.Tensor  # tuned values at those indices (checkpoint dtype)
    shape: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    def change(self) -> torch.Tensor:
        """tuned - base, in float64 (exact for bf16, fp16 and fp32 values)."""
        return self.tuned.double() - self.base.double()


@dataclass
class Delta:
    tensors: dict[str, TensorDelta]
    info: dict = field(default_factory=dict)  # base identity, provenance, ...

    @property
    def count(self) -> int:
        return sum(int(t.indices.numel()) for t in self.tensors.values())


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bit-for-bit equality (NaN == NaN with the same payload; -0.0 != +0.0)."""
    bits = _BITS[a.element_size()]
    return a.contiguous().view(bits) == b.contiguous().view(bits)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ---------------------------------------------------------------- building and saving


def delta_from_values(
    entries: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    shapes: dict[str, tuple[int, ...]],
    info: dict | None = None,
) -> Delta:
    """Build a delta from (indices, base values, tuned values); entries that did not change are dropped."""
    tensors = {}
    for name in sorted(entries):
        idx, base, tuned = entries[name]
        tuned = tuned.to(base.dtype)
        changed = ~same_bits(base, tuned)
        if bool(changed.any()):
            tensors[name] = TensorDelta(
                idx[changed].to(torch.int64).cpu(),
                base[changed].cpu(),
                tuned[changed].cpu(),
                tuple(shapes[name]),
            )
    return Delta(tensors, dict(info or {}))


def save_delta(delta: Delta, folder: Path, *, overwrite: bool = False, card: str | None = None) -> Path:
    """Write the delta folder atomically (temporary folder renamed at the end)."""
    folder = Path(folder)
    check_output(folder, overwrite=overwrite)
    tensors: dict[str, torch.Tensor] = {}
    described = {}
    for name, t in sorted(delta.tensors.items()):
        tensors[f"{name}::indices"] = t.indices.to(index_dtype(_numel(t.shape)))
        tensors[f"{name}::base"] = t.base.view(_BITS[t.base.element_size()])
        tensors[f"{name}::tuned"] = t.tuned.view(_BITS[t.tuned.element_size()])
        described[name] = {
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "count": int(t.indices.numel()),
        }
    with atomic_path(folder, is_dir=True) as tmp:
        save_shard(tensors, tmp / WEIGHTS, {"format": FORMAT})
        description = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tool_version": __version__,
            "count": delta.count,
            "tensor_bytes": sum(v.numel() * v.element_size() for v in tensors.values()),
            "weights_sha256": file_sha256(tmp / WEIGHTS),
            **{k: v for k, v in delta.info.items() if k not in ("tensors",)},
            "tensors": described,
        }
        (tmp / DESCRIPTION).write_text(json.dumps(description, indent=2, default=str) + "\n")
        if card is None:
            from piece_surgery.card import delta_card

            card = delta_card(description)
        (tmp / "README.md").write_text(card)
    return folder


def load_delta(ref: str | Path) -> Delta:
    """Read a delta folder (or Hub repo id) and check it: digest, dtypes, lengths, indices."""
    source = resolve(str(ref), what="delta", patterns=[WEIGHTS, DESCRIPTION, "README.md"])
    folder = source.path
    where = f"delta '{ref}'"
    if not (folder / DESCRIPTION).is_file() or not (folder / WEIGHTS).is_file():
        raise PieceError(f"{where} is not a delta folder (needs {DESCRIPTION} and {WEIGHTS})")
    try:
        info = json.loads((folder / DESCRIPTION).read_text())
    except ValueError as exc:
        raise PieceError(f"{where}: {DESCRIPTION} is not valid JSON") from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise PieceError(f"{where}: {DESCRIPTION} does not describe a piece-surgery delta")
    if info.get("format_version") != FORMAT_VERSION:
        raise PieceError(
            f"{where} has format version {info.get('format_version')}; this piece-surgery reads "
            f"{FORMAT_VERSION}: upgrade piece-surgery"
        )
    if file_sha256(folder / WEIGHTS) != info.get("weights_sha256"):
        raise PieceError(f"{where}: {WEIGHTS} does not match its recorded sha256 (corrupt or truncated)")
    tensors = {}
    try:
        with safe_open(str(folder / WEIGHTS), "pt") as f:
            keys = set(f.keys())
            for name, meta in info["tensors"].items():
                parts = [f"{name}::indices", f"{name}::base", f"{name}::tuned"]
                if not all(p in keys for p in parts):
                    raise PieceError(f"{where}: tensor '{name}' lacks its indices/base/tuned arrays")
                idx, base, tuned = (f.get_tensor(p) for p in parts)
                dtype = _FLOATS.get(meta["dtype"])
                if dtype is None or base.element_size() != dtype.itemsize or base.dtype != tuned.dtype:
                    raise PieceError(f"{where}: tensor '{name}' has inconsistent dtypes")
                base, tuned = base.view(dtype), tuned.view(dtype)
                shape = tuple(meta["shape"])
                validate_indices(idx, _numel(shape), f"{where}, tensor '{name}'")
                if not (idx.numel() == base.numel() == tuned.numel() == meta["count"]):
                    raise PieceError(f"{where}: tensor '{name}' has arrays of different lengths")
                tensors[name] = TensorDelta(idx.to(torch.int64), base, tuned, shape)
    except (SafetensorError, OSError, KeyError, TypeError) as exc:
        raise PieceError(f"{where}: cannot read its files (corrupt or truncated)") from exc
    info["source"] = {"name": source.name, "repo_id": source.repo_id, "revision": source.revision}
    return Delta(tensors, info)


def delta_summary(delta: Delta) -> dict:
    counts = {n: int(t.indices.numel()) for n, t in delta.tensors.items()}
    sizes = {n: _numel(t.shape) for n, t in delta.tensors.items()}
    tensor_bytes = sum(
        t.indices.numel() * index_dtype(_numel(t.shape)).itemsize + t.base.numel() * t.base.element_size() * 2
        for t in delta.tensors.values()
    )
    return {
        "kind": "delta",
        "base": delta.info.get("base"),
        "provenance": delta.info.get("provenance"),
        "tensor_bytes": int(tensor_bytes),
        "bytes_per_entry": tensor_bytes / max(delta.count, 1),
        **summarize(counts, sizes),
    }


# ---------------------------------------------------------------- diff


def diff(
    base_ref: str,
    tuned_ref: str,
    *,
    density: float | None = None,
    top_k: int | None = None,
) -> Delta:
    """The sparse delta between two checkpoints of one architecture, streamed tensor by tensor.

    Without density/top_k every changed entry is kept (exact). With them, only the entries with the
    largest |tuned - base| over all tensors together (turning a dense fine-tune into a sparse delta).
    """
    base_src, tuned_src = resolve(base_ref, what="base"), resolve(tuned_ref, what="tuned checkpoint")
    base_layout, tuned_layout = read_layout(base_src.path), read_layout(tuned_src.path)
    _check_same_architecture(base_layout, tuned_layout)
    limit = _entry_limit(density, top_k, base_layout)
    entries: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    base_reader, tuned_reader = (
        ShardReader(base_src.path, base_layout),
        ShardReader(tuned_src.path, tuned_layout),
    )
    for name in sorted(base_layout):
        b = base_reader.get(name).reshape(-1)
        t = tuned_reader.get(name).reshape(-1)
        idx = torch.nonzero(~same_bits(b, t)).flatten()
        if idx.numel() == 0:
            continue
        b_vals, t_vals = b[idx].clone(), t[idx].clone()
        if limit is not None:
            size = (t_vals.double() - b_vals.double()).abs().float()
            if idx.numel() > limit:  # only the tensor's own top `limit` can make it
                keep = torch.topk(size, limit, sorted=False).indices.sort().values
                idx, b_vals, t_vals, size = idx[keep], b_vals[keep], t_vals[keep], size[keep]
            magnitudes[name] = size
        entries[name] = (idx, b_vals, t_vals)
        del b, t
    base_reader.close()
    tuned_reader.close()
    if limit is not None and sum(m.numel() for m in magnitudes.values()) > limit:
        chosen = select_top_k(magnitudes, limit)  # positions within each tensor's candidates
        entries = {n: tuple(a[chosen[n]] for a in entries[n]) for n in chosen}
    shapes = {n: base_layout[n].shape for n in entries}
    info = {
        "base": identity(base_src, base_layout),
        "provenance": {
            "made_by": "diff",
            "tuned": tuned_src.name,
            "density": density,
            "top_k": top_k,
            "changed_fraction": {
                n: float(entries[n][0].numel()) / base_layout[n].numel for n in sorted(entries)
            },
        },
    }
    return delta_from_values(entries, shapes, info)


def _entry_limit(density: float | None, top_k: int | None, layout: dict[str, TensorInfo]) -> int | None:
    if density is not None and top_k is not None:
        raise PieceError("give --density or --top-k, not both")
    if density is not None:
        if not 0 < density <= 1:
            raise PieceError(f"density {density} is outside (0, 1]")
        return max(1, int(density * sum(i.numel for i in layout.values() if i.dtype.is_floating_point)))
    if top_k is not None and top_k < 1:
        raise PieceError("--top-k must be at least 1")
    return top_k


def _check_same_architecture(base: dict[str, TensorInfo], tuned: dict[str, TensorInfo]) -> None:
    for name in sorted(set(base) | set(tuned)):
        if name not in tuned:
            raise PieceError(f"tensor '{name}' is in the base but not in the tuned checkpoint")
        if name not in base:
            raise PieceError(f"tensor '{name}' is in the tuned checkpoint but not in the base")
        if base[name].shape != tuned[name].shape or base[name].dtype != tuned[name].dtype:
            raise PieceError(
                f"tensor '{name}' differs: base {list(base[name].shape)} {base[name].dtype}, "
                f"tuned {list(tuned[name].shape)} {tuned[name].dtype}"
            )


# ---------------------------------------------------------------- combining deltas on one tensor


@dataclass
class Overlap:
    shared: int = 0  # entries touched by more than one delta
    chained: int = 0  # ... where a later delta was made on top of an earlier one (sequential)
    conflicts: int = 0  # ... where deltas made from the same base both change the entry
    sign_disagreements: int = 0  # ... conflicts whose changes point in opposite directions
    mismatched: int = 0  # entries whose base matched neither the base nor the stack so far

    def add(self, other: Overlap) -> None:
        for key in self.__dataclass_fields__:
            setattr(self, key, getattr(self, key) + getattr(other, key))


def combine(
    name: str,
    base_flat: torch.Tensor,
    parts: list[tuple[TensorDelta, float, str]],
    *,
    on_conflict: str = "sum",
    force: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, Overlap]:
    """New values at the union of the deltas' indices: W = W_base + sum_i scale_i * delta_i.

    Each delta's recorded base values are checked per entry against the weights it meets: the stack
    so far (the first delta, or a delta trained on top of the earlier ones) or the original base (a
    delta trained side by side from the same base). At scale 1 on matching weights the tuned value
    is written as is, so apply reproduces a tuned checkpoint bit for bit.
    """
    if len(parts) == 1 and parts[0][0].dtype == base_flat.dtype:
        return _combine_one(name, base_flat, *parts[0], force=force)
    union = torch.unique(torch.cat([d.indices for d, _, _ in parts]))
    base_u = base_flat[union]
    current = base_u.clone()
    total = torch.zeros(union.numel(), dtype=torch.float64)
    touched = torch.zeros(union.numel(), dtype=torch.int32)
    conflicted = torch.zeros(union.numel(), dtype=torch.bool)
    positive = torch.zeros(union.numel(), dtype=torch.bool)
    negative = torch.zeros(union.numel(), dtype=torch.bool)
    overlap = Overlap()
    for delta, scale, label in parts:
        if delta.dtype != base_flat.dtype and not force:
            raise PieceError(
                f"{label}: tensor '{name}' is {delta.dtype} in the delta but {base_flat.dtype} in the base; "
                "pass --force to apply it anyway"
            )
        pos = torch.searchsorted(union, delta.indices)
        recorded = delta.base.to(base_flat.dtype)
        on_current = same_bits(current[pos], recorded)
        on_base = same_bits(base_u[pos], recorded)
        conflict = ~on_current & on_base
        mismatch = ~on_current & ~on_base
        previously = touched[pos] > 0
        overlap.chained += int((previously & on_current).sum())
        overlap.mismatched += int(mismatch.sum())
        if bool(mismatch.any()) and not force:
            raise PieceError(
                f"{label} was not made from this base: tensor '{name}' differs at "
                f"{int(mismatch.sum())} of its {delta.indices.numel()} entries; "
                "pass --force to apply it anyway (task arithmetic)"
            )
        if bool(conflict.any()) and on_conflict == "error":
            raise PieceError(
                f"{label} changes {int(conflict.sum())} entries of '{name}' that an earlier delta also "
                "changes; choose --on-conflict sum or mean"
            )
        change = scale * delta.change()
        total[pos] += change
        touched[pos] += 1
        conflicted[pos] |= conflict
        positive[pos] |= change > 0
        negative[pos] |= change < 0
        stacked = (current[pos].double() + change).to(base_flat.dtype)
        exact = on_current & (scale == 1.0) & (delta.dtype == base_flat.dtype)
        new = torch.where(exact, delta.tuned.to(base_flat.dtype), stacked)
        if bool(conflict.any()):
            divisor = touched[pos].double() if on_conflict == "mean" else 1.0
            merged = (base_u[pos].double() + total[pos] / divisor).to(base_flat.dtype)
            new = torch.where(conflict, merged, new)
        current[pos] = new
    overlap.shared = int((touched > 1).sum())
    overlap.conflicts = int(conflicted.sum())
    overlap.sign_disagreements = int((conflicted & positive & negative).sum())
    return union, current, overlap


def _combine_one(
    name: str, base_flat: torch.Tensor, delta: TensorDelta, scale: float, label: str, *, force: bool
) -> tuple[torch.Tensor, torch.Tensor, Overlap]:
    """combine() for the common case of one delta: no union to build, the same result."""
    current = base_flat[delta.indices]
    matches = same_bits(current, delta.base)
    mismatched = int((~matches).sum())
    if mismatched and not force:
        raise PieceError(
            f"{label} was not made from this base: tensor '{name}' differs at {mismatched} of its "
            f"{delta.indices.numel()} entries; pass --force to apply it anyway (task arithmetic)"
        )
    if scale == 1.0 and not mismatched:
        return delta.indices, delta.tuned, Overlap()
    stacked = (current.double() + scale * delta.change()).to(base_flat.dtype)
    if scale == 1.0:
        stacked = torch.where(matches, delta.tuned, stacked)
    return delta.indices, stacked, Overlap(mismatched=mismatched)


# ---------------------------------------------------------------- apply to checkpoint folders


@dataclass
class ApplyPlan:
    base: Resolved
    layout: dict[str, TensorInfo]
    deltas: list[tuple[Delta, float, str]]
    shards: dict[str, list[str]]  # output file -> tensor names, in order
    touched: dict[str, int]  # tensor -> entries changed by any delta
    overlap: Overlap
    output_bytes: int
    resharded: bool = False  # True: tensors are regrouped (--shard-size), not patched in their files

    def describe(self) -> dict:
        return {
            "base": self.base.name,
            "deltas": [
                {"delta": label, "scale": scale, "entries": d.count} for d, scale, label in self.deltas
            ],
            "tensors_touched": len(self.touched),
            "entries_touched": sum(self.touched.values()),
            "overlap": self.overlap.__dict__,
            "output_files": len(self.shards),
            "output_bytes": self.output_bytes,
        }


def plan_apply(
    base_ref: str,
    delta_refs: list[str],
    *,
    scales: list[float] | None = None,
    on_conflict: str = "sum",
    force: bool = False,
    shard_size: int | None = None,
    check_values: bool = True,
) -> ApplyPlan:
    """Check the deltas against the base and plan the output shards.

    Names, shapes and dtypes are always checked here; the per-entry base values too when
    `check_values` (a dry run), else while writing, before the output folder is renamed into place.
    """
    if on_conflict not in CONFLICT_POLICIES:
        raise PieceError(f"unknown --on-conflict '{on_conflict}'; use sum, mean or error")
    if not delta_refs:
        raise PieceError("give at least one delta to apply")
    scales = list(scales or [])
    if len(scales) == 1 and len(delta_refs) > 1:
        scales = scales * len(delta_refs)
    if not scales:
        scales = [1.0] * len(delta_refs)
    if len(scales) != len(delta_refs):
        raise PieceError(
            f"got {len(scales)} --scale values for {len(delta_refs)} deltas; give one or one each"
        )
    base = resolve(base_ref, what="base")
    layout = read_layout(base.path)
    deltas = [
        (load_delta(ref), float(s), f"delta '{ref}'") for ref, s in zip(delta_refs, scales, strict=True)
    ]
    for delta, _, label in deltas:
        for name, t in delta.tensors.items():
            if name not in layout:
                raise PieceError(f"{label} changes tensor '{name}', which the base does not have")
            if tuple(layout[name].shape) != tuple(t.shape):
                raise PieceError(
                    f"{label}: tensor '{name}' has shape {list(t.shape)} in the delta but "
                    f"{list(layout[name].shape)} in the base"
                )
    overlap = Overlap()
    touched: dict[str, int] = {}
    if check_values:  # a dry run reads the touched tensors now; a real run checks them as it writes
        reader = ShardReader(base.path, layout)
        for name in sorted({n for d, _, _ in deltas for n in d.tensors}):
            parts = [(d.tensors[name], s, label) for d, s, label in deltas if name in d.tensors]
            flat = reader.get(name).reshape(-1)
            union, _, o = combine(name, flat, parts, on_conflict=on_conflict, force=force)
            touched[name] = int(union.numel())
            overlap.add(o)
        reader.close()
        _warn_mismatch(overlap)
    shards = _shard_plan(base.path, layout, shard_size)
    size = sum(layout[n].numel * layout[n].dtype.itemsize for n in layout)
    return ApplyPlan(base, layout, deltas, shards, touched, overlap, size, resharded=shard_size is not None)


def _warn_mismatch(overlap: Overlap) -> None:
    if overlap.mismatched:
        warnings.warn(
            f"{overlap.mismatched} entries did not match the deltas' recorded base values; "
            "applied with --force",
            stacklevel=3,
        )


def _shard_plan(folder: Path, layout: dict[str, TensorInfo], shard_size: int | None) -> dict[str, list[str]]:
    if shard_size is None:
        files = weight_files(folder)
        plan: dict[str, list[str]] = {}
        for name in sorted(layout, key=lambda n: (files[n], n)):
            plan.setdefault(files[name], []).append(name)
        return plan
    if shard_size < 1:
        raise PieceError("--shard-size must be positive")
    groups: list[list[str]] = [[]]
    used = 0
    for name in sorted(layout, key=lambda n: (layout[n].file, n)):
        nbytes = layout[name].numel * layout[name].dtype.itemsize
        if groups[-1] and used + nbytes > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += nbytes
    if len(groups) == 1:
        return {SINGLE_FILE: groups[0]}
    n = len(groups)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


def execute_apply(
    plan: ApplyPlan,
    out: Path,
    *,
    on_conflict: str = "sum",
    force: bool = False,
    overwrite: bool = False,
    progress=None,
) -> Path:
    """Write the merged checkpoint shard by shard into a temporary folder, then rename it to `out`."""
    out = Path(out)
    check_output(out, overwrite=overwrite, inputs=(plan.base.path,))
    from piece_surgery.checkpoint import shard_metadata

    metadata = shard_metadata(plan.base.path) or {"format": "pt"}
    reader = ShardReader(plan.base.path, plan.layout)
    with atomic_path(out, is_dir=True) as tmp:
        for item in plan.base.path.iterdir():  # config, tokenizer, generation config, ...
            if item.is_file() and not item.name.endswith(".safetensors") and item.name != INDEX_FILE:
                shutil.copy2(item, tmp / item.name)
        weight_map: dict[str, str] = {}
        overlap, touched = Overlap(), {}

        def merged(name: str, flat: torch.Tensor) -> None:
            parts = [(d.tensors[name], s, label) for d, s, label in plan.deltas if name in d.tensors]
            union, values, o = combine(name, flat, parts, on_conflict=on_conflict, force=force)
            flat[union] = values
            touched[name] = int(union.numel())
            overlap.add(o)

        for file, names in plan.shards.items():
            weight_map.update(dict.fromkeys(names, file))
            changed = [n for n in names if any(n in d.tensors for d, _, _ in plan.deltas)]
            if not plan.resharded:
                # The output file is the input file with some entries changed: untouched bytes are
                # copied by the kernel, changed tensors read, merged and written back in place.
                patches = {name: (_union_indices(plan, name), partial(merged, name)) for name in changed}
                if copy_with_patches(plan.base.path / file, tmp / file, patches):
                    if progress:
                        progress(1)
                    continue
            tensors: dict[str, torch.Tensor] = {}
            for name in names:
                tensor = reader.get(name)
                if name in changed:
                    # a private copy: writing into the memory-mapped tensor would fault page by page
                    tensor = tensor.clone()
                    merged(name, tensor.view(-1))
                tensors[name] = tensor
            save_shard(tensors, tmp / file, metadata)
            del tensors
            if progress:
                progress(1)
        if len(plan.shards) > 1:
            if not plan.resharded and (plan.base.path / INDEX_FILE).is_file():
                shutil.copy2(plan.base.path / INDEX_FILE, tmp / INDEX_FILE)
            else:
                write_index(tmp, weight_map, plan.output_bytes)
    reader.close()
    plan.overlap, plan.touched = overlap, touched
    _warn_mismatch(overlap)
    return out


def _union_indices(plan: ApplyPlan, name: str) -> torch.Tensor:
    """The sorted flat indices of `name` that any of the plan's deltas changes."""
    parts = [d.tensors[name].indices for d, _, _ in plan.deltas if name in d.tensors]
    return parts[0] if len(parts) == 1 else torch.unique(torch.cat(parts))


def apply(
    base_ref: str,
    delta_refs: list[str],
    out: Path,
    *,
    scales: list[float] | None = None,
    on_conflict: str = "sum",
    force: bool = False,
    shard_size: int | None = None,
    overwrite: bool = False,
) -> ApplyPlan:
    """Merge deltas into a base checkpoint folder: plan (checks), then stream shard by shard."""
    plan = plan_apply(
        base_ref,
        delta_refs,
        scales=scales,
        on_conflict=on_conflict,
        force=force,
        shard_size=shard_size,
        check_values=False,
    )
    execute_apply(plan, out, on_conflict=on_conflict, force=force, overwrite=overwrite)
    return plan


# ---------------------------------------------------------------- in place on a loaded model


@dataclass
class AppliedDelta:
    """What apply_to_model changed, to restore it bit for bit with revert()."""

    model: torch.nn.Module
    saved: dict[str, tuple[torch.Tensor, torch.Tensor]]  # param name -> (indices, original values)

    def revert(self) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for pname, (idx, values) in self.saved.items():
                params[pname].view(-1)[idx.to(params[pname].device)] = values.to(params[pname].device)


def _model_tensors(model: torch.nn.Module, delta: Delta) -> dict[str, torch.nn.Parameter]:
    params = dict(model.named_parameters())
    prefix = getattr(model, "base_model_prefix", "") or ""
    found = {}
    for name in delta.tensors:
        for candidate in (name, f"{prefix}.{name}", name.removeprefix(prefix + ".")):
            if candidate in params:
                found[name] = (candidate, params[candidate])
                break
        else:
            raise PieceError(f"the delta changes '{name}', which the model does not have")
    return found


def apply_to_model(
    model: torch.nn.Module, delta: Delta, *, scale: float = 1.0, force: bool = False
) -> AppliedDelta:
    """Apply a delta to a loaded model in place; returns a handle whose revert() restores it exactly."""
    saved = {}
    with torch.no_grad():
        for name, (pname, param) in _model_tensors(model, delta).items():
            t = delta.tensors[name]
            if tuple(param.shape) != tuple(t.shape):
                raise PieceError(
                    f"tensor '{name}' has shape {list(param.shape)} in the model, "
                    f"{list(t.shape)} in the delta"
                )
            flat = param.view(-1)
            idx = t.indices.to(param.device)
            original = flat[idx].detach().clone()
            cpu_values = original.cpu().to(t.dtype)
            mismatch = ~same_bits(cpu_values, t.base)
            if bool(mismatch.any()) and not force:
                raise PieceError(
                    f"the model is not the delta's base: '{name}' differs at {int(mismatch.sum())} entries; "
                    "pass force=True to apply anyway"
                )
            if scale == 1.0 and param.dtype == t.dtype and not bool(mismatch.any()):
                new = t.tuned
            else:
                new = (original.cpu().double() + scale * t.change()).to(param.dtype)
            flat[idx] = new.to(param.device, param.dtype)
            saved[pname] = (t.indices, original)
    return AppliedDelta(model, saved)


def revert_delta(model: torch.nn.Module, delta: Delta) -> None:
    """Put back the delta's recorded base values (for a model that holds the delta at scale 1)."""
    with torch.no_grad():
        for name, (_, param) in _model_tensors(model, delta).items():
            t = delta.tensors[name]
            param.view(-1)[t.indices.to(param.device)] = t.base.to(param.device, param.dtype)
