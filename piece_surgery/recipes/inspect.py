"""The `inspect` recipe: what a mask or a delta holds, per layer, module kind, part and expert."""

from __future__ import annotations

from piece_surgery.formats.artifacts import Artifact
from piece_surgery.formats.mask import mask_breakdown
from piece_surgery.models.naming import selection_breakdown


def summarize(artifact: Artifact) -> dict:
    """What `inspect --json` prints of a mask or a delta (schema in docs/cli.md): entries per layer
    and module kind, size and provenance."""
    if artifact.mask is not None:
        mask = artifact.mask
        info = mask.info
        return {
            "kind": "mask",
            **mask_breakdown(mask),
            "method": info.method,
            "density": info.density,
            "eligible": mask.eligible,
            "model": info.model.to_json() if info.model else None,
            "data": info.data.to_json() if info.data else None,
            "file_bytes": artifact.path.stat().st_size,
        }
    delta = artifact.delta
    indices = {n: t.indices for n, t in delta.tensors.items()}
    return {
        "kind": "delta",
        **selection_breakdown(indices, {n: t.shape for n, t in delta.tensors.items()}),
        "base": delta.info.base.to_json() if delta.info.base else None,
        "provenance": delta.info.provenance.to_json() if delta.info.provenance else None,
        "tensor_bytes": delta.tensor_bytes,
        "bytes_per_entry": delta.tensor_bytes / max(delta.count, 1),
        "evaluations": delta.info.evaluations,
    }
