"""The delta folder (docs/formats.md): delta.safetensors, delta.json and a model card; read,
checked against the format and written atomically, in any of the format versions below.

A format version is a module (delta_v1, delta_v2) in FORMATS: a new version is one module and one
entry here. delta.json is checked against the shipped schema (schemas/delta.json) before any
tensor is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from piece_surgery.formats import delta_v1, delta_v2
from piece_surgery.formats.card import GENERATED_MARK, evaluation_lines, front_matter, table_cell
from piece_surgery.formats.codec import validate_indices
from piece_surgery.formats.delta import (
    FORMAT,
    Delta,
    DeltaInfo,
    TensorDelta,
    check_finite_change,
    provenance_from_json,
)
from piece_surgery.formats.schema import load_schema, problem
from piece_surgery.io.locks import folder_lock
from piece_surgery.io.outputs import atomic_path
from piece_surgery.io.sniff import CARD, DELTA_DESCRIPTION, DELTA_WEIGHTS
from piece_surgery.models.layout import save_shard
from piece_surgery.models.naming import module_kind
from piece_surgery.runtime import leftovers
from piece_surgery.runtime.dtypes import dtype_name, numel
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.json_files import file_sha256, read_json
from piece_surgery.runtime.records import CheckpointIdentity

FORMATS: dict[int, ModuleType] = {module.VERSION: module for module in (delta_v1, delta_v2)}
DEFAULT_FORMAT = 1
COMPACT_FORMAT = 2  # --compact


def delta_json(delta: Delta, weights_sha256: str, tensor_bytes: int, version: int, extras: dict) -> dict:
    """The delta.json object for a delta whose delta.safetensors has the given digest and tensor
    bytes, in format `version`; `extras` holds what that version records per tensor."""
    info = delta.info
    tensors = {}
    for name, t in sorted(delta.tensors.items()):
        count = int(t.indices.numel())
        tensors[name] = {"shape": list(t.shape), "dtype": dtype_name(t.dtype), "count": count}
        if t.loads_as is not None:
            tensors[name]["loads_as"] = list(t.loads_as)
        tensors[name].update(extras.get(name, {}))
    return {
        "format": FORMAT,
        "format_version": version,
        "tool_version": info.tool_version,
        "count": delta.count,
        "tensor_bytes": tensor_bytes,
        "weights_sha256": weights_sha256,
        "base": info.base.to_json() if info.base else None,
        "provenance": info.provenance.to_json() if info.provenance else None,
        "evaluations": info.evaluations,
        "tensors": tensors,
    }


def save_delta(
    delta: Delta, folder: Path, *, format_version: int = DEFAULT_FORMAT, card: str | None = None
) -> int:
    """Write the delta folder atomically (a temporary folder renamed at the end), replacing any
    folder already there, in format `format_version` (FORMATS); `card` is the README.md (default:
    a generated model card). Returns the bytes of tensor data written (delta.json's
    `tensor_bytes`). PieceError for an unknown version, or a compact delta's entries written as
    format 1 (which needs the base values)."""
    if format_version not in FORMATS:
        raise PieceError(f"unknown delta format {format_version}; this version writes {sorted(FORMATS)}")
    version = FORMATS[format_version]
    tensors: dict[str, torch.Tensor] = {}
    extras: dict[str, dict] = {}
    for name, t in sorted(delta.tensors.items()):
        arrays, extras[name] = version.encode(name, t.indices, t.base, t.tuned, t.shape, t.digest)
        tensors.update(arrays)
    tensor_bytes = sum(v.numel() * v.element_size() for v in tensors.values())
    with atomic_path(Path(folder), is_dir=True) as tmp:
        save_shard(tensors, tmp / DELTA_WEIGHTS, {"format": FORMAT})
        delta.weights_sha256 = file_sha256(tmp / DELTA_WEIGHTS)
        description = delta_json(delta, delta.weights_sha256, tensor_bytes, version.VERSION, extras)
        (tmp / DELTA_DESCRIPTION).write_text(json.dumps(description, indent=2, default=str) + "\n")
        (tmp / CARD).write_text(card if card is not None else delta_card(delta, tensor_bytes=tensor_bytes))
    return tensor_bytes


def record_evaluation(folder: Path, evaluation: dict[str, Any]) -> Delta:
    """Add what `eval` measured to a local delta folder: delta.json's `evaluations` and, if this tool
    wrote it, the card. The weights and their sha256 are untouched, so the delta's identity and
    exactness checks are as before; each file is replaced atomically.

    The record names the weights it measured (`weights_sha256`): PieceError, with nothing written,
    when the folder's are no longer those (a delta written over it while eval measured). Records
    into one folder take turns (io/locks.folder_lock), each reading the folder afresh, so records
    made at once are all kept."""
    folder = Path(folder)
    with folder_lock(folder, f"delta '{folder}'"):
        delta = load_delta(folder)
        check_measured(folder, evaluation.get("weights_sha256"), now=delta.weights_sha256)
        delta.info.evaluations.append(evaluation)
        description = read_json(folder / DELTA_DESCRIPTION, f"delta '{folder}': {DELTA_DESCRIPTION}")
        description["evaluations"] = delta.info.evaluations
        card = folder / CARD
        card_text = None  # a card the user wrote is theirs
        if not card.is_file() or GENERATED_MARK in card.read_text(encoding="utf-8", errors="replace"):
            card_text = delta_card(delta, tensor_bytes=description.get("tensor_bytes"))
        # both texts are made before either file is replaced
        _replace_file(folder / DELTA_DESCRIPTION, json.dumps(description, indent=2, default=str) + "\n")
        if card_text is not None:
            written = folder / DELTA_DESCRIPTION
            leftovers.note(written, f"eval's record is in '{written}' but not yet in its card ({CARD})")
            _replace_file(card, card_text)
            leftovers.forget(card)
        leftovers.note(folder / DELTA_DESCRIPTION, f"eval's record is in '{folder}'")
    return delta


def check_measured(folder: Path, weights_sha256: str | None, *, now: str | None = None) -> None:
    """PieceError when the delta in `folder` has other weights than those measured (their sha256);
    `now`: its weights' sha256, by default as its delta.json records it."""
    if weights_sha256 is None:
        raise PieceError("an evaluation record names the weights it measured (weights_sha256); give it")
    if now is None:
        description = read_json(folder / DELTA_DESCRIPTION, f"delta '{folder}': {DELTA_DESCRIPTION}")
        now = description.get("weights_sha256") if isinstance(description, dict) else None
    if weights_sha256 != now:
        raise PieceError(
            f"delta '{folder}' changed while eval measured it (its weights are not the ones measured); "
            "nothing was recorded into it: run eval again"
        )


def _replace_file(path: Path, text: str) -> None:
    with atomic_path(path, is_dir=False) as tmp:
        tmp.write_text(text)


def load_delta(folder: Path, *, name: str | None = None) -> Delta:
    """Read a local delta folder and check it against the format: delta.json against its schema,
    the digest, dtypes, lengths, indices, and no entry changed to a non-finite value. `name` is
    how errors call it (formats.artifacts.open_delta also takes Hub repo ids)."""
    folder = Path(folder)
    where = name or f"delta '{folder}'"
    if not (folder / DELTA_DESCRIPTION).is_file() or not (folder / DELTA_WEIGHTS).is_file():
        raise PieceError(f"{where} is not a delta folder (needs {DELTA_DESCRIPTION} and {DELTA_WEIGHTS})")
    description = read_json(folder / DELTA_DESCRIPTION, f"{where}: {DELTA_DESCRIPTION}")
    version = _version_of(description, where)
    schema = load_schema("delta.json")
    found = problem(description, schema)
    for tensor, meta in (description.get("tensors") or {}).items() if found is None else ():
        entry = schema["$defs"][version.TENSOR_SCHEMA]
        found = found or problem(
            meta, entry, schema, label=lambda where, t=tensor: f"{where.split('[')[0]} of '{t}'"
        )
    if found:
        raise PieceError(f"{where}: {DELTA_DESCRIPTION} {found} (corrupt or hand-edited)")
    if file_sha256(folder / DELTA_WEIGHTS) != description["weights_sha256"]:
        raise PieceError(
            f"{where}: {DELTA_WEIGHTS} does not match its recorded sha256 (corrupt or truncated)"
        )
    tensors = _read_tensors(folder / DELTA_WEIGHTS, description["tensors"], where, version)
    try:
        info = DeltaInfo(
            base=CheckpointIdentity.from_json(description.get("base")),
            provenance=provenance_from_json(description.get("provenance")),
            tool_version=str(description.get("tool_version", "unknown")),
            evaluations=list(description.get("evaluations") or []),
        )
    except (ValueError, TypeError) as exc:
        raise PieceError(f"{where}: {DELTA_DESCRIPTION} has a malformed record ({exc})") from exc
    return Delta(tensors, info, description["weights_sha256"])


def _version_of(description: Any, where: str) -> ModuleType:
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise PieceError(f"{where}: {DELTA_DESCRIPTION} does not describe a piece-surgery delta")
    version = str(description.get("format_version"))
    known = {str(v): module for v, module in FORMATS.items()}
    if version not in known:
        raise PieceError(
            f"{where} has format version {description.get('format_version')!r}; this piece-surgery reads "
            f"{' and '.join(map(str, FORMATS))}: upgrade piece-surgery"
        )
    return known[version]


def _read_tensors(path: Path, described: dict, where: str, version: ModuleType) -> dict:
    tensors = {}
    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            unlisted = sorted(keys - {p for name in described for p in version.arrays(name)})
            if unlisted:  # applying the rest would leave these out, silently
                raise PieceError(
                    f"{where}: {DELTA_DESCRIPTION} does not list tensor '{unlisted[0].split('::')[0]}', "
                    f"which {DELTA_WEIGHTS} holds (corrupt or hand-edited)"
                )
            for name, meta in described.items():
                parts = version.arrays(name)
                if not all(p in keys for p in parts):
                    arrays = "/".join(p.split("::")[1] for p in parts)
                    raise PieceError(f"{where}: tensor '{name}' lacks its {arrays} arrays")
                stored = [f.get_tensor(p) for p in parts]
                idx, base, tuned, digest = version.decode(name, meta, stored, where)
                gap_bytes = stored[0].numel() if digest is not None else None
                t = TensorDelta(idx, base, tuned, tuple(meta["shape"]), digest, gap_bytes)
                if t.indices.numel() != meta["count"]:
                    raise PieceError(f"{where}: tensor '{name}' has arrays of different lengths")
                validate_indices(t.indices, numel(t.shape), f"{where}, tensor '{name}'")
                # a compact delta has no base values: none of its tuned values may be non-finite
                base = t.base if t.base is not None else torch.zeros_like(t.tuned)
                check_finite_change(name, t.indices, base, t.tuned, where)
                loads_as = meta.get("loads_as")
                t.loads_as = tuple(loads_as) if isinstance(loads_as, list) else None
                tensors[name] = t
    except (SafetensorError, OSError) as exc:
        raise PieceError(f"{where}: cannot read its files (corrupt or truncated)") from exc
    return tensors


def delta_card(
    delta: Delta,
    *,
    base_model: str | None = None,
    repo_id: str | None = None,
    tensor_bytes: int | None = None,
) -> str:
    """A card for a delta folder; `base_model` (a Hub repo id) defaults to the base's own repo id;
    `tensor_bytes` is what the folder stores (default: as the delta was loaded)."""
    info = delta.info
    tensor_bytes = delta.tensor_bytes if tensor_bytes is None else tensor_bytes
    base_model = base_model or (info.base.repo_id if info.base else None)
    provenance = info.provenance.to_json() if info.provenance else {}
    density = provenance.get("density")
    per_kind: dict[str, int] = {}
    for name, t in delta.tensors.items():
        per_kind[module_kind(name)] = per_kind.get(module_kind(name), 0) + int(t.indices.numel())
    body = [
        "",
        GENERATED_MARK,
        "",
        "# Sparse delta (piece-surgery)",
        "",
        f"A sparse delta of {delta.count:,} weight entries in {len(delta.tensors)} tensors"
        + (f" for `{base_model}`" if base_model else "")
        + f", {tensor_bytes:,} bytes of tensor data.",
        "",
        f"- changed entries (k): {delta.count:,}"
        + (f"; mask density {density}" if density else "")
        + f"; method: {info.method}",
        f"- bytes of tensor data per entry: {tensor_bytes / max(delta.count, 1):.1f}",
        "",
        "## Apply it",
        "",
        "With piece-surgery installed (it installs from its source repository with pip):",
        "",
        "```bash",
        f"piece-surgery apply {base_model or 'BASE_MODEL'} {repo_id or 'THIS_DELTA'} -o merged",
        "```",
        "",
        "## What it changes",
        "",
        "| module kind | entries |",
        "|---|---|",
        *[f"| `{table_cell(k)}` | {v:,} |" for k, v in sorted(per_kind.items())],
        "",
        *evaluation_lines(info.evaluations),
        "## How it was made",
        "",
        "```json",
        json.dumps(provenance, indent=2, default=str, sort_keys=True),
        "```",
        "",
    ]
    tags = ["piece-surgery", "sparse-delta", info.method]
    return "\n".join(front_matter(base_model, tags, relation="adapter") + body)
