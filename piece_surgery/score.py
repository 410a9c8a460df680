"""The `score` recipe: load a checkpoint, compute importance on a data file, select the top-k mask."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from piece_surgery.checkpoint import enable_activation_checkpointing, open_checkpoint
from piece_surgery.data import Dataset
from piece_surgery.dtypes import dtype_name
from piece_surgery.errors import PieceError
from piece_surgery.importance import (
    DEFAULT_EXCLUDE,
    PassStats,
    accumulate_gradients,
    check_normalization,
    data_free_scores,
    eligible_parameters,
    needs_data,
    normalize_scores,
    scores_from_sums,
)
from piece_surgery.mask import Mask, MaskInfo, check_density, k_for_density, save_mask, select_top_k
from piece_surgery.outputs import check_output
from piece_surgery.progress import Progress


@dataclass
class ScoreOptions:
    """How to score; checked when made, so mistakes fail in milliseconds, before any loading."""

    method: str = "piece-s"
    density: float = 0.001
    batch_size: int = 1
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    seed: int = 0
    offload_accumulators: bool = False
    gradient_checkpointing: bool = False
    normalize: str = "none"  # "tensor": scores divided by each tensor's mean before the top-k

    def __post_init__(self) -> None:
        needs_data(self.method)
        check_normalization(self.normalize)
        check_density(self.density)
        if self.batch_size < 1:
            raise PieceError("--batch-size must be at least 1")
        for pattern in [*self.include, *self.exclude]:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise PieceError(f"pattern '{pattern}' is not a valid regex: {exc}") from exc

    def record(self) -> dict:
        """The options a mask records about how it was scored."""
        return {
            "batch_size": self.batch_size,
            "normalize": self.normalize,
            "include": self.include,
            "exclude": self.exclude,
        }


class Scored(NamedTuple):
    mask: Mask
    stats: PassStats
    dataset: Dataset | None


def score_model(
    model: torch.nn.Module,
    keys: dict[str, str],
    dataset: Dataset | None,
    options: ScoreOptions,
    *,
    pad: int = 0,
    progress: Progress | None = None,
) -> tuple[Mask, PassStats]:
    """Score an already loaded model and select its mask (library entry point).

    `keys` maps the model's parameter names to the checkpoint's tensor names (Checkpoint.keys).
    """
    method = options.method
    params = eligible_parameters(model, keys, include=options.include, exclude=options.exclude)
    k = k_for_density(options.density, sum(p.numel() for p in params.values()))
    stats = PassStats()
    if needs_data(method):
        if dataset is None:
            raise PieceError(f"method {method} needs --data")
        if options.gradient_checkpointing:
            enable_activation_checkpointing(model)
        sums, squares, stats = accumulate_gradients(
            model,
            params,
            dataset,
            batch_size=options.batch_size,
            pad_id=pad,
            keep_sum=method in ("piece-s", "piece-s-rel", "gradient"),
            keep_squares=method in ("piece-s", "piece-s-rel", "piece-f"),
            accumulator_device=torch.device("cpu") if options.offload_accumulators else None,
            progress=progress.advance if progress else None,
        )
        scores = scores_from_sums(method, sums, squares)
    else:
        scores = data_free_scores(method, params, options.seed)
    indices = select_top_k(normalize_scores(scores, options.normalize), k)
    del scores
    info = MaskInfo(
        method=method,
        density=options.density,
        seed=options.seed,
        options=options.record(),
        data_pass={"batches": stats.batches, "tokens": stats.tokens, "mean_loss": stats.mean_loss},
        data=dataset.record() if dataset is not None and needs_data(method) else None,
        dtype=dtype_name(next(model.parameters()).dtype),
    )
    shapes = {key: tuple(p.shape) for key, p in params.items()}
    return Mask(indices, shapes, info), stats


def score_checkpoint(
    model_ref: str,
    data: Path | None,
    options: ScoreOptions,
    *,
    output: Path | None = None,
    overwrite: bool = False,
    max_length: int = 512,
    max_samples: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    quiet: bool = True,
) -> Scored:
    """Score a checkpoint (folder or Hub id) on a data file; with `output`, write the mask there."""
    if output is not None:
        inputs = (Path(model_ref), *([Path(data)] if data else []))
        check_output(Path(output), overwrite=overwrite, inputs=inputs, kind="file")
    if needs_data(options.method) and data is None:
        raise PieceError(f"--data is required for method {options.method}")
    if not needs_data(options.method) and data is not None:
        raise PieceError(f"method {options.method} reads no data; leave out --data")
    checkpoint = open_checkpoint(model_ref, trust_remote_code=trust_remote_code)
    dataset = None
    if needs_data(options.method):
        dataset = checkpoint.load_data(data, max_length=max_length, max_samples=max_samples, quiet=quiet)
    model = checkpoint.load_model(device=device, dtype=dtype, quiet=quiet)
    total = len(dataset.examples) if dataset else 0
    with Progress(total, "scoring", quiet=quiet or not total) as bar:
        mask, stats = score_model(
            model, checkpoint.keys, dataset, options, pad=checkpoint.pad_id, progress=bar
        )
    mask.info.model = checkpoint.identity
    mask.info.options["max_samples"] = max_samples
    if output is not None:
        save_mask(mask, Path(output))
    return Scored(mask, stats, dataset)


__all__ = ["ScoreOptions", "Scored", "score_checkpoint", "score_model"]
