"""The `inspect` recipe: what a mask or a delta holds, per layer, module kind, part and expert; the
retain sets a mask kept in mind; a trained delta's log drawn against its steps (--plot)."""

from __future__ import annotations

from pathlib import Path

from piece_surgery.formats.artifacts import Artifact
from piece_surgery.formats.delta import TrainLog, TrainProvenance
from piece_surgery.formats.mask import mask_breakdown
from piece_surgery.models.naming import selection_breakdown
from piece_surgery.recipes.plots import check_plot, pyplot, save
from piece_surgery.runtime.errors import PieceError


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
            "retain": info.retain.to_json() if info.retain else None,
            "avoid": [a.to_json() for a in info.avoid],
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


def training_log(artifact: Artifact, ref: str) -> TrainLog:
    """The log a trained delta records. PieceError, one line, for a mask, a delta that `diff` or
    `import` made, or one trained before logs were recorded."""
    if artifact.mask is not None:
        raise PieceError(f"--plot draws a trained delta's log; '{ref}' is a mask")
    provenance = artifact.delta.info.provenance
    if not isinstance(provenance, TrainProvenance):
        raise PieceError(f"--plot draws a trained delta's log; '{ref}' was not made by `train`")
    if provenance.log is None or not provenance.log.step:
        raise PieceError(f"delta '{ref}' records no training log (trained before piece-surgery 0.2)")
    return provenance.log


def plot_log(artifact: Artifact, ref: str, plot: Path, *, overwrite: bool = False) -> None:
    """Draw a trained delta's loss (and held-out loss) and drift (measured, predicted) against its
    steps into a PNG at `plot` (checked first: inspect_command's rules for outputs)."""
    log = training_log(artifact, ref)
    target = check_plot(plot, overwrite, [ref])
    drifts = [(n, getattr(log, n)) for n in ("measured_drift", "predicted_drift") if getattr(log, n)]
    figure, axes = pyplot().subplots(2 if drifts else 1, 1, figsize=(6.5, 6 if drifts else 3.5), sharex=True)
    top = axes[0] if drifts else axes
    top.plot(log.step, log.loss, label="train loss")
    if log.eval_loss:
        _points(top, log.step, log.eval_loss, "held-out loss (--eval-data)")
    top.set_ylabel("mean token loss (nats)")
    top.legend()
    top.set_title(f"{ref}: {len(log.step)} steps")
    if drifts:
        for name, values in drifts:
            label = "measured: KL from the base" if name == "measured_drift" else "predicted: 1/2 sum F d^2"
            _points(axes[1], log.step, values, label)
        axes[1].set_ylabel("drift (nats per token)")
        axes[1].legend()
    (axes[-1] if drifts else axes).set_xlabel("step")
    figure.tight_layout()
    save(figure, target)


def _points(axes, steps: list[int], values: list[float | None], label: str) -> None:
    """The steps that took a measure (a column's nulls left out), joined by a line."""
    taken = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None]
    axes.plot([s for s, _ in taken], [v for _, v in taken], marker="o", markersize=3, label=label)
