"""The sparse delta: what it holds, its folder (read, check, write), and `diff` of two checkpoints.

A delta stores, per touched tensor, the flat indices of the changed entries and the base and tuned
values there. The folder format is specified in docs/formats.md ("Delta folder"); merging deltas into
a checkpoint or a loaded model is merge.py's job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from piece_surgery.formats.codec import ENCODINGS, decode_indices, encode_indices, values_digest
from piece_surgery.formats.mask import is_shape, select_top_k, validate_indices
from piece_surgery.io.outputs import atomic_path, check_output
from piece_surgery.models.checkpoint import Checkpoint, open_checkpoint, save_shard
from piece_surgery.runtime.dtypes import (
    as_bits,
    bits_dtype,
    dtype_name,
    float_dtype,
    index_dtype,
    numel,
    same_bits,
)
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.options import check_density
from piece_surgery.runtime.progress import Progress
from piece_surgery.runtime.records import CheckpointIdentity, DataRecord, JsonRecord, file_sha256, read_json
from piece_surgery.runtime.version import __version__

FORMAT = "piece-surgery/delta"
FORMAT_VERSION = 1
COMPACT_VERSION = 2  # --compact: index gaps and tuned values only, a digest of the base values
WEIGHTS = "delta.safetensors"
DESCRIPTION = "delta.json"
CARD = "README.md"


@dataclass
class DiffProvenance(JsonRecord):
    """A delta made by `diff` of two checkpoints (or `import` of an adapter)."""

    tuned: str  # how the tuned checkpoint was named
    density: float | None = None
    top_k: int | None = None
    changed_fraction: dict[str, float] = field(default_factory=dict)  # per tensor, of its entries
    made_by: str = "diff"


@dataclass
class TrainProvenance(JsonRecord):
    """A delta made by `train`: the mask it trained, the hyperparameters, the data, the losses."""

    method: str | None
    density: float | None
    mask: dict[str, Any]  # method, density, data, seed and k of the mask
    hyperparameters: dict[str, Any]  # TrainConfig.to_json() and max_length
    data: DataRecord | None
    eval_data: DataRecord | None
    steps: int
    final_train_loss: float | None
    final_eval_loss: float | None
    predicted_drift: float | None = None  # 1/2 sum F d^2 (a mask that carries the retain Fisher)
    stopped_by_drift_budget: bool = False
    made_by: str = "train"
    measured_drift: float | None = None  # mean token KL(base || tuned) on --eval-general, at the end
    eval_general: DataRecord | None = None  # the general text it was measured on
    drift_budget_passed: dict | None = None  # {"step", "drift", "budget", "on"}: the step past it


Provenance = DiffProvenance | TrainProvenance
_PROVENANCES = {"diff": DiffProvenance, "train": TrainProvenance}


def provenance_from_json(data: Any) -> Provenance | None:
    """The provenance record delta.json holds (None for one this version does not know)."""
    if not isinstance(data, dict) or data.get("made_by") not in _PROVENANCES:
        return None
    return _PROVENANCES[data["made_by"]].from_json(data)


@dataclass
class DeltaInfo:
    """What a delta records besides its entries: the base it was made from and how."""

    base: CheckpointIdentity | None = None
    provenance: Provenance | None = None
    tool_version: str = __version__
    # what `eval --record` measured: gain and drift, the data by name, sha256 and tokens
    evaluations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def method(self) -> str:
        """The scoring method for a trained delta, else how it was made (e.g. `diff`)."""
        if isinstance(self.provenance, TrainProvenance) and self.provenance.method:
            return self.provenance.method
        return self.provenance.made_by if self.provenance else "unknown"


@dataclass
class TensorDelta:
    indices: torch.Tensor  # int64, sorted unique flat indices
    base: torch.Tensor | None  # base values at those indices; None for a compact delta, until matched
    tuned: torch.Tensor  # tuned values at those indices (checkpoint dtype)
    shape: tuple[int, ...]
    base_sha256: str | None = None  # compact: the digest of the base values at the indices
    index_bytes: int | None = None  # compact: bytes of the encoded index gaps
    # names of the same weight (tied) that the base's files did not store, so they loaded as this
    # tensor: the delta changes them too. None: not recorded (deltas written before 0.2)
    loads_as: tuple[str, ...] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.tuned.dtype

    def change(self) -> torch.Tensor:
        """tuned - base, in float64 (exact for bf16, fp16 and fp32 values)."""
        if self.base is None:
            raise ValueError("a compact delta's change needs its base values: match it first (with_base)")
        return self.tuned.double() - self.base.double()

    def digest(self) -> str:
        """The digest of the base values (recorded for a compact delta, computed otherwise)."""
        return self.base_sha256 or values_digest(as_bits(self.base).numpy())

    def matches(self, values: torch.Tensor) -> bool:
        """Whether `values` (at the indices, in the delta's dtype) are the base it was made from."""
        if self.base is not None:
            return bool(same_bits(values.to(self.dtype), self.base).all())
        return values_digest(as_bits(values.detach().cpu().to(self.dtype)).numpy()) == self.base_sha256

    def matched(self, *candidates: torch.Tensor) -> TensorDelta | None:
        """This delta with its base values known: itself if it holds them, else (a compact delta)
        built on the first candidate whose values its digest matches; None if none does."""
        if self.base is not None:
            return self
        for values in candidates:
            if self.matches(values):
                return self.with_base(values)
        return None

    def applied_to(self, current: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(new values, on_base): the values the entries take when this delta is applied at `scale`
        onto weights whose values there are `current` (1-D, the weight's dtype, on the CPU), and
        which of them are the recorded base, bit for bit.

        The exactness rule, the one place it is written: where the scale is 1, the dtypes agree and
        the current value is the recorded base, the tuned value itself is written, so a delta on its
        own base gives the tuned weights bit for bit (base + (tuned - base) in floating point is not
        always tuned, e.g. for a weight that crosses zero); elsewhere current + scale x (tuned -
        base), computed in float64 and rounded once to the weight's dtype. Needs the base values
        (a compact delta: `matched` first)."""
        on_base = same_bits(current, self.base.to(current.dtype))
        new = (current.double() + scale * self.change()).to(current.dtype)
        if scale == 1.0 and self.dtype == current.dtype:
            new = torch.where(on_base, self.tuned, new)
        return new, on_base

    def with_base(self, values: torch.Tensor) -> TensorDelta:
        """This delta with its base values known (a compact delta, matched against a base)."""
        return replace(self, base=values.detach().cpu().to(self.dtype).clone(), index_bytes=None)

    @property
    def stored_bytes(self) -> int:
        """Bytes this tensor's arrays take in delta.safetensors (format 1, or compact if loaded so)."""
        n = int(self.indices.numel())
        if self.index_bytes is not None:
            return self.index_bytes + n * self.tuned.element_size()
        return n * index_dtype(numel(self.shape)).itemsize + 2 * n * self.tuned.element_size()


@dataclass
class Delta:
    tensors: dict[str, TensorDelta]
    info: DeltaInfo = field(default_factory=DeltaInfo)
    weights_sha256: str | None = None  # of delta.safetensors, once saved or loaded

    @property
    def count(self) -> int:
        return sum(int(t.indices.numel()) for t in self.tensors.values())

    @property
    def tensor_bytes(self) -> int:
        return sum(t.stored_bytes for t in self.tensors.values())


# ---------------------------------------------------------------- building and saving


def delta_from_values(
    entries: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    shapes: dict[str, tuple[int, ...]],
    info: DeltaInfo | None = None,
    loads_as: dict[str, list[str]] | None = None,
) -> Delta:
    """Build a delta from (indices, base values, tuned values); entries that did not change are
    dropped. `loads_as` maps a tensor to the tied names its base did not store (checkpoint.
    unstored_twins), which the delta records."""
    tensors = {}
    for name in sorted(entries):
        idx, base, tuned = entries[name]
        tuned = tuned.to(base.dtype)
        changed = ~same_bits(base, tuned)
        check_finite_change(name, idx[changed], base[changed], tuned[changed])
        if bool(changed.any()):
            tensors[name] = TensorDelta(
                idx[changed].to(torch.int64).cpu(),
                base[changed].cpu(),
                tuned[changed].cpu(),
                tuple(shapes[name]),
                loads_as=tuple((loads_as or {}).get(name, ())),
            )
    return Delta(tensors, info or DeltaInfo())


def delta_json(
    delta: Delta, weights_sha256: str, tensor_bytes: int, *, compact: dict[str, dict] | None = None
) -> dict[str, Any]:
    """The delta.json object for a delta whose delta.safetensors has the given digest and tensor
    bytes; `compact` holds each tensor's index encoding and base digest (format 2)."""
    info = delta.info
    tensors = {}
    for name, t in sorted(delta.tensors.items()):
        tensors[name] = {
            "shape": list(t.shape),
            "dtype": dtype_name(t.dtype),
            "count": int(t.indices.numel()),
        }
        if t.loads_as is not None:
            tensors[name]["loads_as"] = list(t.loads_as)
        if compact is not None:
            tensors[name].update(compact[name])
    return {
        "format": FORMAT,
        "format_version": COMPACT_VERSION if compact is not None else FORMAT_VERSION,
        "tool_version": info.tool_version,
        "count": delta.count,
        "tensor_bytes": tensor_bytes,
        "weights_sha256": weights_sha256,
        "base": info.base.to_json() if info.base else None,
        "provenance": info.provenance.to_json() if info.provenance else None,
        "evaluations": info.evaluations,
        "tensors": tensors,
    }


def save_delta(delta: Delta, folder: Path, *, compact: bool = False, card: str | None = None) -> int:
    """Write the delta folder atomically (a temporary folder renamed at the end), replacing any
    folder already there; `card` is the README.md (default: a generated model card). `compact`
    writes format 2: index gaps and tuned values, with a digest of the base values. Returns the
    bytes of tensor data written (what delta.json records as `tensor_bytes`)."""
    from piece_surgery.formats.card import delta_card

    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    encodings: dict[str, dict] = {}
    for name, t in sorted(delta.tensors.items()):
        if compact:
            data, encoding = encode_indices(t.indices.numpy())
            tensors[f"{name}::gaps"] = torch.from_numpy(data)
            encodings[name] = {"gaps": encoding, "base_sha256": t.digest()}
        else:
            if t.base is None:
                raise PieceError(
                    f"tensor '{name}' comes from a compact delta: format 1 needs its base values"
                )
            tensors[f"{name}::indices"] = t.indices.to(index_dtype(numel(t.shape)))
            tensors[f"{name}::base"] = as_bits(t.base)
        tensors[f"{name}::tuned"] = as_bits(t.tuned)
    tensor_bytes = sum(v.numel() * v.element_size() for v in tensors.values())
    with atomic_path(folder, is_dir=True) as tmp:
        save_shard(tensors, tmp / WEIGHTS, {"format": FORMAT})
        delta.weights_sha256 = file_sha256(tmp / WEIGHTS)
        description = delta_json(
            delta, delta.weights_sha256, tensor_bytes, compact=encodings if compact else None
        )
        (tmp / DESCRIPTION).write_text(json.dumps(description, indent=2, default=str) + "\n")
        (tmp / CARD).write_text(card if card is not None else delta_card(delta, tensor_bytes=tensor_bytes))
    return tensor_bytes


def record_evaluation(folder: Path, evaluation: dict[str, Any]) -> Delta:
    """Add what `eval` measured to a local delta folder: delta.json's `evaluations` and, if this tool
    wrote it, the card. The weights and their sha256 are untouched, so the delta's identity and
    exactness checks are as before; each file is replaced atomically."""
    from piece_surgery.formats.card import GENERATED_MARK, delta_card

    folder = Path(folder)
    delta = load_delta(folder)
    delta.info.evaluations.append(evaluation)
    description = read_json(folder / DESCRIPTION, f"delta '{folder}': {DESCRIPTION}")
    description["evaluations"] = delta.info.evaluations
    card = folder / CARD
    card_text = None  # a card the user wrote is theirs
    if not card.is_file() or GENERATED_MARK in card.read_text(encoding="utf-8", errors="replace"):
        card_text = delta_card(delta, tensor_bytes=description.get("tensor_bytes"))
    # both texts are made before either file is replaced
    _replace_file(folder / DESCRIPTION, json.dumps(description, indent=2, default=str) + "\n")
    if card_text is not None:
        _replace_file(card, card_text)
    return delta


def _replace_file(path: Path, text: str) -> None:
    with atomic_path(path, is_dir=False) as tmp:
        tmp.write_text(text)


def load_delta(folder: Path, *, name: str | None = None) -> Delta:
    """Read a local delta folder and check it against the format: delta.json's shape, the digest,
    dtypes, lengths, indices, and no entry changed to a non-finite value. `name` is how errors call
    it (artifacts.open_delta also takes Hub repo ids)."""
    folder = Path(folder)
    where = name or f"delta '{folder}'"
    if not (folder / DESCRIPTION).is_file() or not (folder / WEIGHTS).is_file():
        raise PieceError(f"{where} is not a delta folder (needs {DESCRIPTION} and {WEIGHTS})")
    description = read_json(folder / DESCRIPTION, f"{where}: {DESCRIPTION}")
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise PieceError(f"{where}: {DESCRIPTION} does not describe a piece-surgery delta")
    version = str(description.get("format_version"))
    if version not in (str(FORMAT_VERSION), str(COMPACT_VERSION)):
        raise PieceError(
            f"{where} has format version {description.get('format_version')!r}; this piece-surgery reads "
            f"{FORMAT_VERSION} and {COMPACT_VERSION}: upgrade piece-surgery"
        )
    compact = version == str(COMPACT_VERSION)
    problem = _description_problem(description, compact)
    if problem:
        raise PieceError(f"{where}: {DESCRIPTION} {problem} (corrupt or hand-edited)")
    if file_sha256(folder / WEIGHTS) != description["weights_sha256"]:
        raise PieceError(f"{where}: {WEIGHTS} does not match its recorded sha256 (corrupt or truncated)")
    tensors = _read_tensors(folder / WEIGHTS, description["tensors"], where, compact)
    try:
        info = DeltaInfo(
            base=CheckpointIdentity.from_json(description.get("base")),
            provenance=provenance_from_json(description.get("provenance")),
            tool_version=str(description.get("tool_version", "unknown")),
            evaluations=list(description.get("evaluations") or []),
        )
    except (ValueError, TypeError) as exc:
        raise PieceError(f"{where}: {DESCRIPTION} has a malformed record ({exc})") from exc
    return Delta(tensors, info, description["weights_sha256"])


def _description_problem(description: dict, compact: bool = False) -> str | None:
    """What in delta.json does not follow the format (docs/formats.md), or None."""
    if not isinstance(description.get("weights_sha256"), str):
        return "has no 'weights_sha256' string"
    tensors = description.get("tensors")
    if not isinstance(tensors, dict):
        return "'tensors' must be an object of tensor name -> {shape, dtype, count}"
    for name, meta in tensors.items():
        if not isinstance(meta, dict):
            return f"entry of '{name}' must be an object with shape, dtype and count"
        if not is_shape(meta.get("shape")):
            return f"shape of '{name}' must be a list of sizes"
        if not isinstance(meta.get("dtype"), str) or float_dtype(meta["dtype"]) is None:
            return f"dtype of '{name}' must be bfloat16, float16, float32 or float64"
        count = meta.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            return f"count of '{name}' must be a positive integer"
        twins = meta.get("loads_as", [])
        if not isinstance(twins, list) or not all(isinstance(t, str) for t in twins):
            return f"loads_as of '{name}' must be a list of tensor names"
        if compact and meta.get("gaps") not in ENCODINGS:
            return f"gaps of '{name}' must be one of {', '.join(ENCODINGS)}"
        digest = meta.get("base_sha256")
        if compact and not (isinstance(digest, str) and len(digest) == 64):
            return f"base_sha256 of '{name}' must be a sha256 hex digest"
    for key in ("base", "provenance"):
        if description.get(key) is not None and not isinstance(description[key], dict):
            return f"'{key}' must be an object"
    evaluations = description.get("evaluations") or []
    if not isinstance(evaluations, list) or not all(isinstance(e, dict) for e in evaluations):
        return "'evaluations' must be a list of objects"
    for i, evaluation in enumerate(evaluations):
        problem = _evaluation_problem(evaluation)
        if problem:
            return f"evaluations[{i}]: {problem}"
    return None


def _number(value: Any, *, optional: bool = False) -> bool:
    if value is None:
        return optional
    return isinstance(value, int | float) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _evaluation_problem(evaluation: dict) -> str | None:
    """What is wrong with one `eval --record` entry (schema in docs/formats.md), or None."""
    for key in ("gain", "loss", "base_loss"):
        if not _number(evaluation.get(key), optional=True):
            return f"'{key}' must be a number or null"
    data = evaluation.get("data")
    if data is not None and not (
        isinstance(data, dict) and isinstance(data.get("file"), str) and _count(data.get("tokens"))
    ):
        return "'data' must be null or an object with a file name and a token count"
    general = evaluation.get("general")
    if not isinstance(general, list) or not all(isinstance(g, dict) for g in general):
        return "'general' must be a list of objects"
    for g in general:
        if not isinstance(g.get("set"), str) or not _count(g.get("tokens")):
            return "each 'general' entry needs a set name and a token count"
        if not all(_number(g.get(key)) for key in ("kl", "top1_changed")):
            return "each 'general' entry needs numbers 'kl' and 'top1_changed'"
    return None


def _read_tensors(path: Path, described: dict, where: str, compact: bool = False) -> dict[str, TensorDelta]:
    tensors = {}
    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            for name, meta in described.items():
                parts = [f"{name}::gaps" if compact else f"{name}::indices", f"{name}::tuned"]
                parts += [] if compact else [f"{name}::base"]
                if not all(p in keys for p in parts):
                    arrays = "/".join(p.split("::")[1] for p in parts)
                    raise PieceError(f"{where}: tensor '{name}' lacks its {arrays} arrays")
                tensors[name] = _tensor_delta(name, meta, [f.get_tensor(p) for p in parts], where, compact)
    except (SafetensorError, OSError) as exc:
        raise PieceError(f"{where}: cannot read its files (corrupt or truncated)") from exc
    return tensors


def _tensor_delta(name: str, meta: dict, arrays: list, where: str, compact: bool) -> TensorDelta:
    dtype = float_dtype(meta["dtype"])
    bits = bits_dtype(dtype.itemsize)
    shape = tuple(meta["shape"])
    if compact:
        gaps, tuned = arrays
        if gaps.dtype != torch.uint8 or gaps.dim() != 1 or tuned.dtype != bits or tuned.dim() != 1:
            raise PieceError(f"{where}: tensor '{name}' has inconsistent dtypes")
        try:
            idx = torch.from_numpy(decode_indices(gaps.numpy(), meta["gaps"]))
        except ValueError as exc:
            raise PieceError(f"{where}: tensor '{name}': its index gaps do not decode ({exc})") from exc
        base = None
    else:
        idx, tuned, base = arrays
        if idx.dtype not in (torch.int32, torch.int64) or base.dtype != bits or tuned.dtype != bits:
            raise PieceError(f"{where}: tensor '{name}' has inconsistent dtypes")
        if not (idx.dim() == base.dim() == tuned.dim() == 1) or base.numel() != idx.numel():
            raise PieceError(f"{where}: tensor '{name}' has arrays of different lengths")
        base = base.view(dtype)
    if not (idx.numel() == tuned.numel() == meta["count"]):
        raise PieceError(f"{where}: tensor '{name}' has arrays of different lengths")
    validate_indices(idx, numel(shape), f"{where}, tensor '{name}'")
    tuned = tuned.view(dtype)
    idx = idx.to(torch.int64)
    # a compact delta has no base values: none of its tuned values may be non-finite
    check_finite_change(name, idx, base if base is not None else torch.zeros_like(tuned), tuned, where)
    if compact:
        return TensorDelta(
            idx, None, tuned, shape, meta["base_sha256"], arrays[0].numel(), loads_as=_loads_as(meta)
        )
    return TensorDelta(idx, base, tuned, shape, loads_as=_loads_as(meta))


def _loads_as(meta: dict) -> tuple[str, ...] | None:
    value = meta.get("loads_as")
    return tuple(value) if isinstance(value, list) else None


def check_finite_change(
    name: str, indices: torch.Tensor, base: torch.Tensor, tuned: torch.Tensor, where: str = "the delta"
) -> None:
    """A change may not make a finite weight NaN or infinite (a base that held one may keep it)."""
    bad = torch.nonzero(~torch.isfinite(tuned) & torch.isfinite(base)).flatten()
    if bad.numel():
        first = int(bad[0])
        raise PieceError(
            f"{where} sets entry {int(indices[first])} of '{name}' to {float(tuned[first])}; "
            "a delta may not make a weight non-finite"
        )


# ---------------------------------------------------------------- diff


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
        for name in sorted(pairs):
            b = base_reader.get(name).reshape(-1)
            t = tuned_reader.get(pairs[name]).reshape(-1)
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


def _check_unpaired_tuned(base: Checkpoint, tuned: Checkpoint, pairs: dict[str, str], used: dict[str, str]):
    """A tensor only the tuned files store must be one loading ignores, or a tied copy of one the
    base stores once with the same values as the tuned model's own (a delta cannot untie them)."""
    base_loads = _loads_as_stored(base)
    for name in sorted(set(tuned.layout) - set(pairs.values())):
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
    from piece_surgery.models.checkpoint import parameter_keys
    from piece_surgery.scoring.importance import eligible_parameters

    skeleton = checkpoint.skeleton()
    params = eligible_parameters(skeleton, parameter_keys(skeleton, checkpoint.layout))
    return {name: p.numel() for name, p in params.items()}


def _entry_limit(density: float | None, top_k: int | None, eligible: int) -> int:
    if density is not None:
        check_density(density)
        return max(1, int(density * eligible))
    if top_k < 1:
        raise PieceError("--top-k must be at least 1")
    return top_k


def paired_tensors(base: Checkpoint, tuned: Checkpoint) -> dict[str, str]:
    """Which stored tensor of `tuned` is which of `base`: base name -> tuned name, matched as loading
    matches them. The same name, or the same model weight under another spelling (one file with
    the base-model prefix, one without, as older files are written); a tied weight one side stores
    twice and the other once pairs with what the other loads it as; a tensor only one side stores
    that the model never uses (a buffer older files keep beside the weights) is left out. Anything
    else, and a shape or dtype that differs, is a PieceError naming the tensor."""
    pairs = {name: name for name in base.layout if name in tuned.layout}
    if len(pairs) < max(len(base.layout), len(tuned.layout)):
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
        _check_unpaired_tuned(base, tuned, pairs, used_tuned)
    for name, other in sorted(pairs.items()):
        b, t = base.layout[name], tuned.layout[other]
        if b.shape != t.shape or b.dtype != t.dtype:
            raise PieceError(
                f"tensor '{name}' differs: base {list(b.shape)} {b.dtype}, tuned {list(t.shape)} {t.dtype}"
            )
    return pairs


@dataclass
class Diffed:
    """What `diff` wrote: the delta and the bytes of tensor data its folder holds."""

    delta: Delta
    tensor_bytes: int

    def to_json(self, *, base: str, tuned: str, output: Path, seconds: float) -> dict:
        """What `diff --json` prints (schema in docs/cli.md)."""
        delta = self.delta
        return {
            "output": str(output),
            "base": base,
            "tuned": tuned,
            "entries": delta.count,
            "tensors": len(delta.tensors),
            "tensor_bytes": self.tensor_bytes,
            "bytes_per_entry": self.tensor_bytes / max(delta.count, 1),
            "changed_fraction": delta.info.provenance.changed_fraction,
            "seconds": round(seconds, 3),
        }


def write_diff(
    base_ref: str,
    tuned_ref: str,
    output: Path,
    *,
    density: float | None = None,
    top_k: int | None = None,
    base_model: str | None = None,
    overwrite: bool = False,
    quiet: bool = True,
    compact: bool = False,
) -> Diffed:
    """The `diff` recipe: check the output, diff the two checkpoints, write the delta folder
    (format 2 with `compact`)."""
    output = check_output(output, overwrite=overwrite, inputs=(base_ref, tuned_ref))
    delta = diff(base_ref, tuned_ref, density=density, top_k=top_k, base_model=base_model, quiet=quiet)
    if delta.count == 0:
        raise PieceError("the two checkpoints are identical: there is no delta to write")
    return Diffed(delta, save_delta(delta, output, compact=compact))
