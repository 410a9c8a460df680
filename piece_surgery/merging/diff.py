"""The sparse delta between two checkpoints of one architecture, streamed tensor by tensor: their
stored tensors paired as loading pairs them, every changed entry (or the largest changes only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from piece_surgery.formats.delta import Delta, DeltaInfo, DiffProvenance, delta_from_values
from piece_surgery.formats.mask import select_top_k
from piece_surgery.models.checkpoint import Checkpoint, open_checkpoint
from piece_surgery.models.eligible import eligible_parameters
from piece_surgery.models.fused import fused_slices, stored_places
from piece_surgery.runtime.dtypes import same_bits
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.options import check_density
from piece_surgery.runtime.progress import Progress
from piece_surgery.runtime.records import CheckpointIdentity


def diff(
    base_ref: str,
    tuned_ref: str,
    *,
    density: float | None = None,
    top_k: int | None = None,
    base_model: str | None = None,
    quiet: bool = True,
) -> Delta:
    """The sparse delta between two checkpoints of one architecture, streamed tensor by tensor.

    Without density/top_k every changed entry is kept (exact). With them, only the entries with the
    largest |tuned - base| over all tensors together (turning a dense fine-tune into a sparse delta).
    `base_model` names the base's Hub repo id when it was given as a local folder (for the card).
    """
    base, tuned = open_checkpoint(base_ref, what="base"), open_checkpoint(tuned_ref, what="tuned checkpoint")
    pairs = paired_tensors(base, tuned)
    if density is not None and top_k is not None:
        raise PieceError("give --density or --top-k, not both")
    limit = None
    if density is not None or top_k is not None:
        # the largest changes of the entries score and train may select (embedding tables are not)
        eligible = eligible_sizes(base)
        pairs = {name: other for name, other in pairs.items() if name in eligible}
        limit = _entry_limit(density, top_k, sum(eligible.values()))
    with Progress(len(pairs), "comparing", quiet=quiet, unit="tensor") as bar:
        entries = _changed_entries(base, tuned, pairs, limit, bar.advance)
    if limit is not None:
        magnitudes = {n: (t.double() - b.double()).abs().float() for n, (_, b, t) in entries.items()}
        if sum(m.numel() for m in magnitudes.values()) > limit:
            chosen = select_top_k(magnitudes, limit)  # positions within each tensor's candidates
            entries = {n: tuple(a[chosen[n]] for a in entries[n]) for n in chosen}
    identity = base.identity
    if base_model:
        identity = CheckpointIdentity(base_model, base_model, None, identity.fingerprint)
    provenance = DiffProvenance(
        tuned=tuned.identity.name,
        density=density,
        top_k=top_k,
        changed_fraction={n: float(entries[n][0].numel()) / base.layout[n].numel for n in sorted(entries)},
    )
    shapes = {n: base.layout[n].shape for n in entries}
    return delta_from_values(entries, shapes, DeltaInfo(identity, provenance), base.twins())


def _changed_entries(
    base: Checkpoint, tuned: Checkpoint, pairs: dict[str, str], limit: int | None, advance
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(indices, base values, tuned values) of every changed entry, tensor by tensor (under the
    base's names); with a limit, only each tensor's `limit` largest changes (no others can make
    the global top)."""
    entries = {}
    with base.reader() as base_reader, tuned.reader() as tuned_reader:
        regions = _RegionReader(tuned_reader)
        for name in sorted(pairs, key=lambda n: _reading_order(pairs[n], n)):
            b = base_reader.get(name).reshape(-1)
            other = pairs[name]
            t = tuned_reader.get(other).reshape(-1) if isinstance(other, str) else regions.read(other)
            idx = torch.nonzero(~same_bits(b, t)).flatten()
            advance(1)
            if idx.numel() == 0:
                continue
            b_vals, t_vals = b[idx].clone(), t[idx].clone()
            if limit is not None and idx.numel() > limit:
                size = (t_vals.double() - b_vals.double()).abs()
                keep = torch.topk(size, limit, sorted=False).indices.sort().values
                idx, b_vals, t_vals = idx[keep], b_vals[keep], t_vals[keep]
            entries[name] = (idx, b_vals, t_vals)
    return entries


def _loads_as_stored(checkpoint: Checkpoint) -> dict[str, str]:
    """Model name of a tied weight the files do not store -> the stored name it loads as."""
    return {twin: stored for stored, twins in checkpoint.twins().items() for twin in twins}


def _check_unpaired_tuned(base: Checkpoint, tuned: Checkpoint, pairs: dict, used: dict[str, str]):
    """A tensor only the tuned files store must be one loading ignores, or a tied copy of one the
    base stores once with the same values as the tuned model's own (a delta cannot untie them)."""
    base_loads = _loads_as_stored(base)
    paired = {n for other in pairs.values() for n in _tuned_names(other)}
    for name in sorted(set(tuned.layout) - paired):
        if name not in used:
            continue
        twin = base_loads.get(used[name])
        if twin is None or twin not in pairs:
            raise PieceError(f"tensor '{name}' is in the tuned checkpoint but not in the base")
        with tuned.reader() as reader:
            same = bool(same_bits(reader.get(name), reader.get(pairs[twin])).all())
        if not same:
            raise PieceError(
                f"the tuned checkpoint stores '{name}' apart from '{pairs[twin]}' with other values, but the "
                f"base ties them and stores one ('{twin}'): a delta changes stored tensors, so it cannot "
                "untie them; diff against a base whose files store both"
            )


def eligible_sizes(checkpoint: Checkpoint) -> dict[str, int]:
    """Stored tensor name -> entries, of the tensors `score` may select by default (every weight
    but the embedding tables), found on the model's meta-device skeleton."""
    from piece_surgery.models.pairing import parameter_keys

    skeleton = checkpoint.skeleton()
    layout = checkpoint.layout
    params = eligible_parameters(
        skeleton, parameter_keys(skeleton, layout), slices=fused_slices(skeleton, layout)
    )
    return {name: p.numel() for name, p in params.items()}


def _entry_limit(density: float | None, top_k: int | None, eligible: int) -> int:
    if density is not None:
        check_density(density)
        return max(1, int(density * eligible))
    if top_k < 1:
        raise PieceError("--top-k must be at least 1")
    return top_k


def paired_tensors(base: Checkpoint, tuned: Checkpoint) -> dict[str, str | Region]:
    """Which stored tensor of `tuned` is which of `base`: base name -> tuned name, matched as loading
    matches them. The same name, or the same model weight under another spelling (one file with
    the base-model prefix, one without, as older files are written); a tied weight one side stores
    twice and the other once pairs with what the other loads it as; a tensor only one side stores
    that the model never uses (a buffer older files keep beside the weights) is left out. Experts
    one side stores one tensor per expert and the other fused (models.fused) pair by their place
    in the parameter loading makes: base name -> the Region of the tuned files that holds it.
    Anything else, and a shape or dtype that differs, is a PieceError naming the tensor."""
    pairs: dict[str, str | Region] = {name: name for name in base.layout if name in tuned.layout}
    if len(pairs) < max(len(base.layout), len(tuned.layout)):
        pairs.update(_paired_by_place(base, tuned, [n for n in base.layout if n not in pairs]))
        used_base, used_tuned = base.used_names(), tuned.used_names()
        by_model_name = {model_name: stored for stored, model_name in used_tuned.items()}
        tuned_loads = _loads_as_stored(tuned)
        for name in sorted(set(base.layout) - set(pairs)):
            model_name = used_base.get(name, "")
            other = by_model_name.get(model_name)
            if other is not None and other not in pairs.values():
                pairs[name] = other
            elif model_name in tuned_loads:  # the tuned files store it once: it loads as its twin
                pairs[name] = tuned_loads[model_name]
            elif name in used_base:
                raise PieceError(f"tensor '{name}' is in the base but not in the tuned checkpoint")
        # an expert only the tuned files store is a tensor loading uses too
        parts = fused_slices(tuned.skeleton(), tuned.layout)
        _check_unpaired_tuned(base, tuned, pairs, {**used_tuned, **{n: s.param for n, s in parts.items()}})
    for name, other in sorted(pairs.items()):
        b = base.layout[name]
        if isinstance(other, Region):
            dtypes = {tuned.layout[n].dtype for n, _ in other.stored}
            if dtypes != {b.dtype}:
                raise PieceError(f"tensor '{name}' differs: base {b.dtype}, tuned {sorted(map(str, dtypes))}")
            continue
        t = tuned.layout[other]
        if b.shape != t.shape or b.dtype != t.dtype:
            raise PieceError(
                f"tensor '{name}' differs: base {list(b.shape)} {b.dtype}, tuned {list(t.shape)} {t.dtype}"
            )
    return pairs


@dataclass(frozen=True)
class Region:
    """Flat entries [start, stop) of the model's parameter `param`, which the tuned files hold in
    `stored`: (name, first flat entry in the parameter) of each of their tensors that make up the
    parameter, in order (one, whole, or its experts, one tensor each)."""

    param: str
    start: int
    stop: int
    stored: tuple[tuple[str, int], ...]


def _paired_by_place(base: Checkpoint, tuned: Checkpoint, names: list[str]) -> dict[str, Region]:
    """Base tensors whose names the tuned files lack, where those store the same parameter in
    another layout (experts one tensor per expert on one side, fused on the other): base name ->
    the tuned Region with its entries (models.fused.stored_places, on each side's skeleton)."""
    if not names:
        return {}
    base_model, tuned_model = base.skeleton(), tuned.skeleton()
    parts = fused_slices(base_model, base.layout)
    if not (parts or fused_slices(tuned_model, tuned.layout)):
        return {}  # neither side stores a parameter in parts: names pair as they are (or not at all)
    base_places = stored_places(base_model, base.layout)
    by_param: dict[str, list[tuple[int, int, str]]] = {}
    for key, (param, start, size) in stored_places(tuned_model, tuned.layout).items():
        by_param.setdefault(param, []).append((start, size, key))
    sizes = {n: p.numel() for n, p in tuned_model.named_parameters()}
    pairs = {}
    for name in names:
        param, start, size = base_places.get(name, ("", 0, 0))
        pieces = sorted(by_param.get(param, []))
        whole = len(pieces) == 1 and size == pieces[0][1]
        if pieces and not whole:
            _check_complete(param, pieces, sizes.get(param, 0), base_places)
            pairs[name] = Region(param, start, start + size, tuple((key, first) for first, _, key in pieces))
        elif name in parts:  # an expert whose entries the tuned files do not hold
            raise PieceError(f"tensor '{name}' is in the base but not in the tuned checkpoint")
        # else one tensor on both sides, tied copies or an unused one: the name pairing decides
    return pairs


def _check_complete(param: str, pieces: list[tuple[int, int, str]], total: int, base_places: dict) -> None:
    """The tuned files' tensors of `param` ((first entry, size, name), sorted) tile all its `total`
    entries; else a PieceError naming the base's tensor the first gap takes whole (an expert the
    tuned files lack), or the part of the base's tensor they lack."""
    expected = 0
    for first, size, _ in [*pieces, (total, 0, "")]:
        if first != expected:
            here = [(n, s, k) for n, (p, s, k) in base_places.items() if p == param and s <= expected < s + k]
            name, start, size = here[0] if here else (param, 0, total)
            if expected <= start and start + size <= first:
                raise PieceError(f"tensor '{name}' is in the base but not in the tuned checkpoint")
            raise PieceError(
                f"the tuned checkpoint lacks part of '{name}' (entries {expected - start} to "
                f"{min(first, start + size) - start} of {size}): it does not store every expert"
            )
        expected = first + size


def _tuned_names(other: str | Region) -> list[str]:
    return [n for n, _ in other.stored] if isinstance(other, Region) else [other]


def _reading_order(other: str | Region, name: str) -> tuple:
    """Pairs read grouped by the tuned parameter they come from (one is assembled at a time)."""
    return (other.param, other.start, name) if isinstance(other, Region) else ("", 0, name)


class _RegionReader:
    """Reads Regions of the tuned files, keeping the last parameter assembled (flat, its dtype)."""

    def __init__(self, reader):
        self.reader = reader
        self._param: str | None = None
        self._flat: torch.Tensor | None = None

    def read(self, region: Region) -> torch.Tensor:
        if self._param != region.param:
            parts = [self.reader.get(key).reshape(-1) for key, _ in region.stored]
            self._flat = parts[0] if len(parts) == 1 else torch.cat(parts)
            self._param = region.param
        return self._flat[region.start : region.stop]
