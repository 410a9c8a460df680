"""The `score` recipe: load a checkpoint, compute importance on a data file, select the top-k mask."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from piece_surgery import distributed
from piece_surgery.checkpoint import Checkpoint, enable_activation_checkpointing, open_checkpoint
from piece_surgery.data import Dataset
from piece_surgery.distributed import World
from piece_surgery.dtypes import dtype_name
from piece_surgery.errors import PieceError
from piece_surgery.importance import (
    DEFAULT_EXCLUDE,
    PassStats,
    accumulate_gradients,
    check_labels,
    check_normalization,
    data_free_scores,
    eligible_parameters,
    needs_data,
    normalize_scores,
    piece_r_scores,
    reduce_pass,
    scores_from_sums,
)
from piece_surgery.mask import Mask, MaskInfo, check_density, k_for_density, save_mask, select_top_k
from piece_surgery.outputs import check_output
from piece_surgery.progress import Progress
from piece_surgery.records import RetainRecord
from piece_surgery.retain import SELF, ScoringInputs, read_scoring_inputs, sample_self
from piece_surgery.sharding import is_sharded, local_part, shard_model

# piece-r with the model's own text as the retain set drifted far less than PIECE-S for the same
# domain gain, and delta = the 1st percentile of F_retain less than the 10th (docs/evidence.md)
DEFAULT_METHOD = "piece-r"
DEFAULT_RETAIN_DAMPING = 0.01


@dataclass
class ScoreOptions:
    """How to score; checked when made, so mistakes fail in milliseconds, before any loading."""

    method: str = DEFAULT_METHOD
    density: float = 0.001
    batch_size: int = 1
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    seed: int = 0
    offload_accumulators: bool = False
    gradient_checkpointing: bool = False
    normalize: str = "none"  # "tensor": scores divided by each tensor's mean before the top-k
    # piece-r: how the retain Fisher is taken and damped, and what `--retain self` samples
    retain_labels: str = "empirical"
    retain_damping: float = DEFAULT_RETAIN_DAMPING
    self_samples: int = 64
    self_length: int = 128

    def __post_init__(self) -> None:
        needs_data(self.method)
        check_normalization(self.normalize)
        check_density(self.density)
        check_labels(self.retain_labels)
        if self.batch_size < 1:
            raise PieceError("--batch-size must be at least 1")
        if not (0.0 <= self.retain_damping <= 1.0):  # also refuses nan
            raise PieceError(f"--retain-damping {self.retain_damping} is a quantile: give a number in [0, 1]")
        if self.self_samples < 1 or self.self_length < 2:
            raise PieceError("--self-samples must be at least 1 and --self-length at least 2")
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


def retain_sources(method: str, retain: Sequence[str | Path]) -> list[str | Path]:
    """The retain sets a recipe scores with: piece-r without any keeps the model's own text."""
    return [SELF] if method == "piece-r" and not retain else list(retain)


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
    retain: Sequence[Dataset] = (),
    avoid: dict[str, torch.Tensor] | None = None,
    pad: int = 0,
    progress: Progress | None = None,
    world: World | None = None,
) -> tuple[Mask, PassStats]:
    """Score an already loaded model and select its mask (library entry point).

    `keys` maps the model's parameter names to the checkpoint's tensor names (Checkpoint.keys).
    `retain` is the text piece-r keeps the model's behaviour on; `avoid` (tensor name -> flat
    indices) entries are never selected. With a `world`, each rank passes over its share of the
    micro-batches and every rank selects the same mask from the summed accumulators.
    """
    method = options.method
    if method == "piece-r" and not retain:
        raise PieceError("--method piece-r needs --retain (a data file of what to keep, or self)")
    if retain and method != "piece-r":
        raise PieceError(f"--retain is used by --method piece-r only (got {method}); see docs/training.md")
    params = eligible_parameters(model, keys, include=options.include, exclude=options.exclude)
    k = k_for_density(options.density, sum(p.numel() for p in params.values()))
    shards = _Shards.of(params, world)
    stats, fisher, retain_record = PassStats(), None, None
    if needs_data(method):
        if dataset is None:
            raise PieceError(f"method {method} needs --data")
        if options.gradient_checkpointing:
            enable_activation_checkpointing(model)
        passes = _GradientPasses(model, params, options, pad, progress, world)
        if method == "piece-r":
            retained, retain_stats = passes.retain_fisher(retain)
            sums, _, stats = passes.run(dataset, keep_sum=True, keep_squares=False)
            scores, delta = piece_r_scores(sums, retained, options.retain_damping, total=shards.total)
            retain_record = _retain_record(retain, retain_stats, options, delta)
        else:
            sums, squares, stats = passes.run(
                dataset,
                keep_sum=method in ("piece-s", "piece-s-rel", "gradient"),
                keep_squares=method in ("piece-s", "piece-s-rel", "piece-f"),
            )
            scores = scores_from_sums(method, sums, squares, total=shards.total)
    else:
        scores = data_free_scores(method, params, options.seed, world)
    normalize_scores(scores, options.normalize, total=shards.total, sizes=shards.sizes)
    indices = select_top_k(scores, k, exclude=avoid, world=world, offsets=shards.offsets)
    del scores
    if retain_record is not None:
        fisher = shards.values_at(retained, indices, scale=retain_record.fisher_scale)
        del retained
    info = MaskInfo(
        method=method,
        density=options.density,
        seed=options.seed,
        options=options.record(),
        data_pass={"batches": stats.batches, "tokens": stats.tokens, "mean_loss": stats.mean_loss},
        data=dataset.record() if dataset is not None and needs_data(method) else None,
        dtype=dtype_name(next(model.parameters()).dtype),
        retain=retain_record,
    )
    shapes = {key: tuple(p.shape) for key, p in params.items()}
    return Mask(indices, shapes, info, fisher), stats


@dataclass
class _Shards:
    """Where each rank's part of the accumulators lies when FSDP shards the weights (else: all
    of every tensor is here, and numbers need no adding up over ranks)."""

    world: World | None
    offsets: dict[str, int] | None  # tensor name -> flat index of this rank's first entry
    sizes: dict[str, int]

    @classmethod
    def of(cls, params: dict[str, torch.nn.Parameter], world: World | None) -> _Shards:
        sizes = {n: p.numel() for n, p in params.items()}
        if not any(is_sharded(p) for p in params.values()):
            return cls(None, None, sizes)
        return cls(world, {n: local_part(p, world).start for n, p in params.items()}, sizes)

    def total(self, value: float) -> float:
        return self.world.sum(value) if self.offsets is not None else float(value)

    def values_at(
        self, tensors: dict[str, torch.Tensor], indices: dict[str, torch.Tensor], *, scale: float
    ) -> dict[str, torch.Tensor]:
        """tensors' values at the (whole-tensor) flat indices, x scale, on every rank."""
        if self.offsets is None:
            return {
                n: tensors[n].reshape(-1)[i.to(tensors[n].device)].float().cpu() * scale
                for n, i in indices.items()
            }
        mine = {}
        for n, idx in indices.items():
            local = idx - self.offsets[n]
            here = (local >= 0) & (local < tensors[n].numel())
            mine[n] = (
                idx[here],
                tensors[n].reshape(-1)[local[here].to(tensors[n].device)].float().cpu() * scale,
            )
        merged: dict[str, list] = {}
        for part in self.world.gather(mine):
            for n, pair in part.items():
                merged.setdefault(n, []).append(pair)
        out = {}
        for n in indices:
            found = torch.cat([p[0] for p in merged[n]])
            values = torch.cat([p[1] for p in merged[n]])
            out[n] = values[torch.argsort(found)]
        return out


@dataclass
class _GradientPasses:
    """Passes over data that fold each micro-batch's gradient into accumulators (importance.py)."""

    model: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    options: ScoreOptions
    pad: int
    progress: Progress | None
    world: World | None = None

    def run(self, dataset: Dataset, *, labels: str = "empirical", **keep) -> tuple[dict, dict, PassStats]:
        return accumulate_gradients(
            self.model,
            self.params,
            dataset,
            batch_size=self.options.batch_size,
            pad_id=self.pad,
            accumulator_device=torch.device("cpu") if self.options.offload_accumulators else None,
            progress=self.progress.advance if self.progress else None,
            labels=labels,
            seed=self.options.seed,
            world=self.world,
            **keep,
        )

    def retain_fisher(self, retain: Sequence[Dataset]) -> tuple[dict[str, torch.Tensor], PassStats]:
        """F_retain = sum over every retain micro-batch of g^2, in one buffer."""
        fisher: dict[str, torch.Tensor] | None = None
        total = PassStats()
        for data in retain:
            _, fisher, stats = self.run(
                data,
                labels=self.options.retain_labels,
                keep_sum=False,
                keep_squares=True,
                squares_into=fisher,
                reduce=False,  # several sets add into one buffer: add the ranks' buffers once, below
            )
            total.batches += stats.batches
            total.tokens += stats.tokens
            total.inverse_tokens += stats.inverse_tokens
        if self.world is not None and not any(is_sharded(p) for p in self.params.values()):
            reduce_pass(self.world, list(fisher.values()), total)  # (FSDP shards stay apart)
        return fisher, total


def _retain_record(retain: Sequence[Dataset], stats: PassStats, options: ScoreOptions, delta: float):
    self_text = next((d for d in retain if d.name == SELF), None)
    return RetainRecord(
        sources=[d.record() for d in retain],
        labels=options.retain_labels,
        damping=options.retain_damping,
        delta=delta,
        # sum_b g_b^2 ~ sum_b F / T_b for a per-token Fisher F when token gradients are independent
        fisher_scale=1.0 / stats.inverse_tokens if stats.inverse_tokens else math.nan,
        self_sampling=(
            # the length written: --self-length, or less where the model's context is shorter
            {"seed": options.seed, "samples": options.self_samples, "length": self_text.max_length - 1}
            if self_text
            else None
        ),
    )


def score_loaded(
    checkpoint: Checkpoint,
    dataset: Dataset | None,
    options: ScoreOptions,
    inputs: ScoringInputs,
    *,
    quiet: bool = True,
    world: World | None = None,
) -> tuple[Mask, PassStats]:
    """Score a checkpoint whose model is loaded, with its retain data and avoided entries; the mask
    records the model, the retain text (text the model writes itself is sampled here: every rank
    writes the same, from the same seed) and what it avoided."""
    retain = [
        sample_self(
            checkpoint.model,
            checkpoint.load_tokenizer(),
            pad_id=checkpoint.pad_id,
            samples=options.self_samples,
            length=min(options.self_length, inputs.max_length - 1),  # the start token is one
            seed=options.seed,
            quiet=quiet,
        )
        if source == SELF
        else source
        for source in inputs.retain
    ]
    total = sum(len(d.examples) for d in [*([dataset] if dataset else []), *retain])
    total = math.ceil(total / world.size) if world is not None else total  # about this rank's share
    with Progress(total, "scoring", quiet=quiet or not total) as bar:
        mask, stats = score_model(
            checkpoint.model,
            checkpoint.keys,
            dataset,
            options,
            retain=retain,
            avoid=inputs.avoid,
            pad=checkpoint.pad_id,
            progress=bar,
            world=world,
        )
    mask.info.model = checkpoint.identity
    mask.info.avoid = inputs.avoid_records
    return mask, stats


def score_checkpoint(
    model_ref: str,
    data: Path | None,
    options: ScoreOptions,
    *,
    retain: Sequence[str | Path] = (),
    avoid: Sequence[str] = (),
    output: Path | None = None,
    overwrite: bool = False,
    max_length: int = 512,
    max_samples: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    quiet: bool = True,
    fsdp: bool = False,
) -> Scored:
    """Score a checkpoint (folder or Hub id) on a data file; with `output`, write the mask there.

    `retain` (piece-r) holds data files or "self" (without any: self); `avoid` masks or deltas whose
    entries to leave out.
    Under a launcher (torchrun, ...) every rank scores its share of the data and rank 0 writes;
    with `fsdp`, the weights and accumulators are sharded over the ranks (docs/distributed.md).
    """
    world = distributed.start(device)
    distributed.load_device(world, device, fsdp)  # --fsdp without a launcher fails here, early
    quiet = quiet or (world is not None and not world.is_main)
    retain = retain_sources(options.method, retain)
    if output is not None:
        files = [data, *(r for r in retain if str(r) != SELF), *avoid]
        inputs = (Path(model_ref), *(Path(f) for f in files if f is not None))
        check_output(Path(output), overwrite=overwrite, inputs=inputs, kind="file")
    if needs_data(options.method) and data is None:
        raise PieceError(f"--data is required for method {options.method}")
    if not needs_data(options.method) and data is not None:
        raise PieceError(f"method {options.method} reads no data; leave out --data")
    checkpoint = open_checkpoint(model_ref, trust_remote_code=trust_remote_code)
    dataset = None
    if needs_data(options.method):
        dataset = checkpoint.load_data(data, max_length=max_length, max_samples=max_samples, quiet=quiet)
    inputs = read_scoring_inputs(checkpoint, retain, avoid, max_length=max_length, quiet=quiet)
    model = checkpoint.load_model(
        device=distributed.load_device(world, device, fsdp), dtype=dtype, quiet=quiet
    )
    if fsdp:
        shard_model(model, world)
    mask, stats = score_loaded(checkpoint, dataset, options, inputs, quiet=quiet, world=world)
    mask.info.options["max_samples"] = max_samples
    if output is not None and (world is None or world.is_main):
        save_mask(mask, Path(output))
    if world is not None:
        world.barrier()  # every rank ends once the mask is written
    return Scored(mask, stats, dataset)


__all__ = ["ScoreOptions", "Scored", "retain_sources", "score_checkpoint", "score_loaded", "score_model"]
