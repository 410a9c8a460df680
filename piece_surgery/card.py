"""Model cards (README.md) for deltas: YAML front matter for the Hub, and a readable body."""

from __future__ import annotations

import json

from piece_surgery.naming import module_kind


def delta_card(description: dict, *, base_model: str | None = None, license: str | None = None) -> str:
    """A card for a delta folder, from its delta.json description."""
    base = description.get("base") or {}
    provenance = description.get("provenance") or {}
    base_model = base_model or base.get("repo_id")
    method = provenance.get("method") or provenance.get("made_by", "diff")
    tags = ["piece-surgery", "sparse-delta", str(method)]
    lines = ["---"]
    if base_model:
        lines.append(f"base_model: {base_model}")
        lines.append("base_model_relation: adapter")
    lines.append("library_name: piece-surgery")
    if license:
        lines.append(f"license: {license}")
    lines.append("tags:")
    lines.extend(f"- {t}" for t in tags)
    lines.append("---")
    count = description.get("count", 0)
    per_kind: dict[str, int] = {}
    for name, meta in (description.get("tensors") or {}).items():
        per_kind[module_kind(name)] = per_kind.get(module_kind(name), 0) + meta["count"]
    body = [
        "",
        "# Sparse delta (piece-surgery)",
        "",
        f"A sparse delta of {count:,} weight entries in {len(description.get('tensors') or {})} tensors"
        + (f" for `{base_model}`" if base_model else "")
        + f", {description.get('tensor_bytes', 0):,} bytes of tensor data.",
        "",
        "## Apply it",
        "",
        "```bash",
        "pip install piece-surgery",
        f"piece-surgery apply {base_model or 'BASE_MODEL'} THIS_REPO_OR_FOLDER -o merged",
        "```",
        "",
        "## What it changes",
        "",
        "| module kind | entries |",
        "|---|---|",
        *[f"| `{k}` | {v:,} |" for k, v in sorted(per_kind.items())],
        "",
        "## How it was made",
        "",
        "```json",
        json.dumps(provenance, indent=2, default=str, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines + body)
