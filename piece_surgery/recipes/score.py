"""The `score` recipe: load a checkpoint, compute importance on a data file, select the top-k mask."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from piece_surgery.data.examples import Dataset
from piece_surgery.formats.mask import Mask, save_mask
from piece_surgery.recipes.run import Run, open_avoided
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.options import RunOptions
from piece_surgery.scoring.importance import PassStats
from piece_surgery.scoring.inputs import (
    check_data,
    check_selectable,
    read_scoring_inputs,
)
from piece_surgery.scoring.methods import method_named
from piece_surgery.scoring.options import ScoreOptions
from piece_surgery.scoring.retain import NAMED_SETS
from piece_surgery.scoring.selection import score_loaded


class Scored(NamedTuple):
    mask: Mask
    stats: PassStats
    dataset: Dataset | None

    def to_json(self, *, model: str, output: Path | None, seconds: float) -> dict:
        """What `score --json` prints (schema in docs/cli.md)."""
        from piece_surgery.formats.mask import mask_breakdown

        summary = mask_breakdown(self.mask)
        return {
            "output": None if output is None else str(output),
            "model": model,
            "method": self.mask.info.method,
            "density": self.mask.info.density,
            "entries": self.mask.k,
            "eligible": self.mask.eligible,
            "tensors": summary["tensors"],
            "norm_share": summary["norm_share"],
            "examples": self.stats.examples,
            "skipped_examples": self.dataset.skipped if self.dataset else 0,
            "tokens": self.stats.tokens,
            "mean_loss": self.stats.mean_loss if self.stats.batches else None,
            "retain": self.mask.info.retain.to_json() if self.mask.info.retain else None,
            "avoid": [a.to_json() for a in self.mask.info.avoid],
            "seconds": round(seconds, 3),
        }


def score_checkpoint(
    model_ref: str,
    data: Path | None,
    options: ScoreOptions | None = None,
    run: RunOptions | None = None,
    *,
    retain: Sequence[str | Path] = (),
    avoid: Sequence[str] = (),
    output: Path | None = None,
    overwrite: bool = False,
) -> Scored:
    """Score a checkpoint (folder or Hub id) on a data file; with `output`, write the mask there.

    `retain` (piece-r; or options.retain) holds data files, "general" or "self" (without any:
    DEFAULT_RETAIN); `avoid` masks or deltas whose entries to leave out. `run` says where and how
    to load (device, dtype, lengths, FSDP).
    Under a launcher (torchrun, ...) every rank scores its share of the data and rank 0 writes;
    with `run.fsdp`, the weights and accumulators are sharded over the ranks (docs/distributed.md).
    """
    options = options or ScoreOptions()
    options = options.with_retain(retain)
    check_data(options.method, data)
    session = Run(run)
    retain = options.retain_sources
    if output is not None:
        inputs = [model_ref, data, *(r for r in retain if str(r) not in NAMED_SETS), *avoid]
        output = session.check_output(output, inputs=inputs, overwrite=overwrite, kind="file")
        if output.suffix != ".safetensors":  # what every reader of masks takes
            raise PieceError(
                f"a mask is a .safetensors file: name the output e.g. '{output.stem}.safetensors'"
            )
    checkpoint = session.open(model_ref)
    dataset = session.data(checkpoint, data) if method_named(options.method).needs_data else None
    inputs = read_scoring_inputs(checkpoint, retain, open_avoided(avoid), session.reader(checkpoint))
    check_selectable(checkpoint, options, inputs.avoid)
    model = session.load_model(checkpoint)
    mask, stats = score_loaded(checkpoint, model, dataset, options, inputs, **session.where())
    if output is not None:
        session.write(lambda: save_mask(mask, Path(output)))
    return Scored(mask, stats, dataset)
