"""The `score` recipe: load a checkpoint, compute importance on a data file, select the top-k mask."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from piece_surgery import __version__
from piece_surgery.checkpoint import (
    enable_activation_checkpointing,
    identity,
    load_causal_lm,
    parameter_keys,
    parse_dtype,
    pick_device,
    read_layout,
)
from piece_surgery.data import Dataset, load_dataset, load_tokenizer, pad_id
from piece_surgery.errors import PieceError
from piece_surgery.hub import resolve
from piece_surgery.importance import (
    DEFAULT_EXCLUDE,
    PassStats,
    accumulate_gradients,
    data_free_scores,
    eligible_parameters,
    needs_data,
    normalize_scores,
    scores_from_sums,
)
from piece_surgery.mask import Mask, k_for_density, select_top_k
from piece_surgery.progress import Progress


@dataclass
class ScoreOptions:
    method: str = "piece-s"
    density: float = 0.001
    batch_size: int = 1
    max_samples: int | None = None
    max_length: int = 512
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    seed: int = 0
    offload_accumulators: bool = False
    gradient_checkpointing: bool = False
    normalize: str = "none"  # "tensor": scores divided by each tensor's mean before the top-k

    def validate(self) -> None:
        """Check the options before any loading, so mistakes fail in milliseconds."""
        needs_data(self.method)
        normalize_scores({}, self.normalize)
        if not (0.0 < self.density <= 1.0):
            raise PieceError(f"density {self.density} is outside (0, 1]; the paper uses 0.001")
        if self.batch_size < 1:
            raise PieceError("--batch-size must be at least 1")
        for pattern in [*self.include, *self.exclude]:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise PieceError(f"pattern '{pattern}' is not a valid regex: {exc}") from exc


def score_model(
    model: torch.nn.Module,
    keys: dict[str, str],
    dataset: Dataset | None,
    options: ScoreOptions,
    *,
    pad: int = 0,
    progress: Progress | None = None,
) -> tuple[Mask, PassStats]:
    """Score an already loaded model and select its mask (library entry point)."""
    options.validate()
    method = options.method
    data_pass = needs_data(method)
    params = eligible_parameters(model, keys, include=options.include, exclude=options.exclude)
    k = k_for_density(options.density, sum(p.numel() for p in params.values()))
    stats = PassStats()
    if data_pass:
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
    info = {
        "method": method,
        "density": options.density,
        "seed": options.seed,
        "options": {
            "batch_size": options.batch_size,
            "normalize": options.normalize,
            "include": options.include,
            "exclude": options.exclude,
            "max_samples": options.max_samples,
        },
        "pass": {"batches": stats.batches, "tokens": stats.tokens, "mean_loss": stats.mean_loss},
        "tool_version": __version__,
    }
    shapes = {key: tuple(p.shape) for key, p in params.items()}
    return Mask(indices, shapes, info), stats


def score_checkpoint(
    model_ref: str,
    data: Path | None,
    options: ScoreOptions,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    quiet: bool = True,
) -> tuple[Mask, PassStats, Dataset | None]:
    """Resolve, load and score a checkpoint on a data file; returns the mask and what the pass saw."""
    options.validate()
    source = resolve(model_ref, what="model")
    folder = source.path
    layout = read_layout(folder)
    model_id = identity(source, layout)
    torch_dtype = parse_dtype(dtype, folder, layout)
    target = pick_device(device)
    dataset = None
    tokenizer = None
    if needs_data(options.method):
        if data is None:
            raise PieceError(f"--data is required for method {options.method}")
        tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
        dataset = load_dataset(
            data, tokenizer, max_length=options.max_length, max_samples=options.max_samples
        )
    model = load_causal_lm(folder, dtype=torch_dtype, device=target, trust_remote_code=trust_remote_code)
    keys = parameter_keys(model, layout)
    total = len(dataset.examples) if dataset else 0
    with Progress(total, "scoring", quiet=quiet or not total) as bar:
        mask, stats = score_model(
            model, keys, dataset, options, pad=pad_id(tokenizer) if tokenizer else 0, progress=bar
        )
    mask.info["model"] = model_id
    mask.info["dtype"] = str(torch_dtype).removeprefix("torch.")
    if dataset is not None:
        mask.info["data"] = dataset.identity()
    return mask, stats, dataset


__all__ = ["ScoreOptions", "score_checkpoint", "score_model"]
