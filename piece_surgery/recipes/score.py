"""The `score` recipe: load a checkpoint, compute importance on a data file, select the top-k mask."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from piece_surgery.data.dataset import Dataset
from piece_surgery.formats.mask import Mask, MaskInfo, k_for_density, save_mask, select_top_k
from piece_surgery.models.checkpoint import (
    Checkpoint,
    LoadedModel,
    check_weights_match,
    enable_activation_checkpointing,
    parameter_keys,
)
from piece_surgery.recipes.run import Run
from piece_surgery.runtime.distributed import World
from piece_surgery.runtime.dtypes import dtype_name
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.options import RunOptions, ScoreOptions
from piece_surgery.runtime.progress import Progress
from piece_surgery.runtime.records import CheckpointIdentity, RetainRecord
from piece_surgery.runtime.sharding import is_sharded, local_part, reshard
from piece_surgery.scoring.importance import (
    PassStats,
    accumulate_gradients,
    eligible_parameters,
    normalize_scores,
    reduce_pass,
)
from piece_surgery.scoring.methods import ScoreInputs, method_named
from piece_surgery.scoring.retain import (
    GENERAL,
    NAMED_SETS,
    SELF,
    Avoided,
    ScoringInputs,
    read_scoring_inputs,
    sample_self,
)

RETAIN_OPTIONS = ("retain_labels", "retain_damping", "self_samples", "self_length")


def check_data(method: str, data: Path | None) -> None:
    """Data is given exactly when the method reads some."""
    chosen = method_named(method)
    if chosen.needs_data and data is None:
        raise PieceError(f"--data is required for method {method}")
    if not chosen.needs_data and data is not None:
        raise PieceError(f"method {method} reads no data; leave out --data")


def check_retain(method: str, retain: Sequence[str | Path], given: Sequence[str] = ()) -> None:
    """Retain text and its options (`given`: the ScoreOptions fields the user set) only for a
    method that uses them, and the self-text options only with self text."""
    retain_given = [name for name in RETAIN_OPTIONS if name in given]
    if (retain or retain_given) and not method_named(method).uses_retain:
        what = f"--{retain_given[0].replace('_', '-')}" if retain_given else "--retain"
        raise PieceError(f"{what} is for --method piece-r (got {method}); leave it out")
    if {"self_samples", "self_length"} & set(given) and SELF not in map(str, retain):
        raise PieceError("--self-samples and --self-length are for --retain self: add --retain self")


# piece-r without --retain keeps the shipped general-text set: on every domain of
# benchmarks/multidomain.py it drifted less than the model's own text at equal gain, on Wikipedia and
# on the model's own chat answers alike (docs/evidence.md, "Seven domains")
DEFAULT_RETAIN = GENERAL


def retain_sources(method: str, retain: Sequence[str | Path]) -> list[str | Path]:
    """The retain sets a recipe scores with: piece-r without any keeps DEFAULT_RETAIN."""
    return [DEFAULT_RETAIN] if method_named(method).uses_retain and not retain else list(retain)


def check_selectable(checkpoint: Checkpoint, options: ScoreOptions, avoid: Avoided) -> None:
    """Before the model is loaded (on its meta-device skeleton): some parameter is eligible, the
    density selects at least one entry, and --avoid leaves enough of them to select."""
    skeleton = checkpoint.skeleton()
    check_weights_match(skeleton, checkpoint.layout, checkpoint.folder)
    keys = parameter_keys(skeleton, checkpoint.layout)
    params = eligible_parameters(skeleton, keys, include=options.include, exclude=options.exclude)
    eligible = sum(p.numel() for p in params.values())
    k = k_for_density(options.density, eligible)
    avoided = sum(int(torch.unique(idx).numel()) for name, idx in avoid.entries.items() if name in params)
    if k > eligible - avoided:
        raise PieceError(
            f"--avoid leaves {eligible - avoided:,} of the {eligible:,} eligible entries, fewer than the "
            f"{k:,} density {options.density} selects: lower --density, or avoid fewer masks"
        )


class Scored(NamedTuple):
    mask: Mask
    stats: PassStats
    dataset: Dataset | None

    def to_json(self, *, model: str, output: Path | None, seconds: float) -> dict:
        """What `score --json` prints (schema in docs/cli.md)."""
        from piece_surgery.formats.artifacts import mask_breakdown

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
            "seconds": round(seconds, 3),
        }


def score_model(
    model: LoadedModel,
    dataset: Dataset | None,
    options: ScoreOptions,
    *,
    retain: Sequence[Dataset] = (),
    avoid: Avoided | None = None,
    identity: CheckpointIdentity | None = None,
    run: RunOptions | None = None,
    pad_id: int = 0,
    progress: Progress | None = None,
    world: World | None = None,
) -> tuple[Mask, PassStats]:
    """Score an already loaded model and select its mask (library entry point).

    `retain` is the text piece-r keeps the model's behaviour on; `avoid`'s entries are never
    selected. `identity` (the checkpoint scored) and `run` (its lengths) go into the mask's record.
    With a `world`, each rank passes over its share of the micro-batches and every rank selects the
    same mask from the summed accumulators.
    """
    method = method_named(options.method)
    if method.uses_retain and not retain:
        raise PieceError(f"--method {method.name} needs --retain (a data file of what to keep, or self)")
    if retain and not method.uses_retain:
        raise PieceError(
            f"--retain is used by --method piece-r only (got {method.name}); see docs/training.md"
        )
    if method.needs_data and dataset is None:
        raise PieceError(f"method {method.name} needs --data")
    params = eligible_parameters(model.module, model.keys, include=options.include, exclude=options.exclude)
    k = k_for_density(options.density, sum(p.numel() for p in params.values()))
    shards = _Shards.of(params, world)
    inputs = ScoreInputs(params, {}, {}, seed=options.seed, world=world, sum_over_ranks=shards.sum_over_ranks)
    stats, retain_record = PassStats(), None
    if method.needs_data:
        if options.gradient_checkpointing:
            enable_activation_checkpointing(model.module)
        passes = _GradientPasses(model.module, params, options, pad_id, progress, world)
        if method.uses_retain:
            inputs.retain_fisher, retain_stats = passes.retain_fisher(retain)
            inputs.retain_damping = options.retain_damping
        inputs.sums, inputs.squares, stats = passes.run(
            dataset, keep_sum=method.keeps_sum, keep_squares=method.keeps_squares
        )
    scores, damping_value = method.score(inputs)
    if method.uses_retain:
        retain_record = _retain_record(retain, retain_stats, options, damping_value)
    normalize_scores(scores, options.normalize, sum_over_ranks=shards.sum_over_ranks, sizes=shards.sizes)
    indices = select_top_k(
        scores, k, avoid=avoid.entries if avoid else None, world=world, offsets=shards.offsets
    )
    del scores
    fisher = None
    if retain_record is not None:
        fisher = shards.values_at(inputs.retain_fisher, indices, scale=retain_record.fisher_scale)
    run = run or RunOptions()
    info = MaskInfo(
        method=method.name,
        density=options.density,
        seed=options.seed,
        options={**options.to_json(), "max_length": run.max_length, "max_samples": run.max_samples},
        data_pass={"batches": stats.batches, "tokens": stats.tokens, "mean_loss": stats.mean_loss},
        model=identity,
        data=dataset.record() if dataset is not None and method.needs_data else None,
        dtype=dtype_name(next(model.module.parameters()).dtype),
        retain=retain_record,
        avoid=list(avoid.records) if avoid else [],
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

    def sum_over_ranks(self, value: float) -> float:
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
    pad_id: int
    progress: Progress | None
    world: World | None = None

    def run(self, dataset: Dataset, *, labels: str = "empirical", **keep) -> tuple[dict, dict, PassStats]:
        return accumulate_gradients(
            self.model,
            self.params,
            dataset,
            batch_size=self.options.batch_size,
            pad_id=self.pad_id,
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


def _retain_record(
    retain: Sequence[Dataset], stats: PassStats, options: ScoreOptions, damping_value: float
) -> RetainRecord:
    self_text = next((d for d in retain if d.name == SELF), None)
    return RetainRecord(
        sources=[d.record() for d in retain],
        labels=options.retain_labels,
        damping=options.retain_damping,
        damping_value=damping_value,
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
    model: LoadedModel,
    dataset: Dataset | None,
    options: ScoreOptions,
    inputs: ScoringInputs,
    run: Run,
) -> tuple[Mask, PassStats]:
    """Score a checkpoint whose model is loaded, with its retain data and avoided entries; the mask
    records the model, the retain text (text the model writes itself is sampled here: every rank
    writes the same, from the same seed) and what it avoided."""
    retain = [
        self_text(checkpoint, model, options, run) if source == SELF else source for source in inputs.retain
    ]
    if run.options.fsdp:
        reshard(model.module)  # generating the self text left the root module's weights gathered
    total = sum(len(d.examples) for d in [*([dataset] if dataset else []), *retain])
    total = math.ceil(total / run.world.size) if run.world is not None else total  # this rank's share
    with Progress(total, "scoring", quiet=run.quiet or not total) as bar:
        return score_model(
            model,
            dataset,
            options,
            retain=retain,
            avoid=inputs.avoid,
            identity=checkpoint.identity,
            run=run.options,
            pad_id=checkpoint.pad_id,
            progress=bar,
            world=run.world,
        )


def self_text(checkpoint: Checkpoint, model: LoadedModel, options: ScoreOptions, run: Run) -> Dataset:
    """The text the model writes itself (`self`): options.self_samples texts of options.self_length
    tokens (less where --max-length or the model's context is shorter), seeded by options.seed, the
    same on every rank."""
    return sample_self(
        model.module,
        checkpoint.load_tokenizer(),
        pad_id=checkpoint.pad_id,
        samples=options.self_samples,
        length=min(options.self_length, run.options.max_length - 1),  # the start token is one
        seed=options.seed,
        quiet=run.quiet,
    )


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

    `retain` (piece-r) holds data files, "general" or "self" (without any: DEFAULT_RETAIN); `avoid`
    masks or deltas whose entries to leave out. `run` says where and how to load (device, dtype,
    lengths, FSDP).
    Under a launcher (torchrun, ...) every rank scores its share of the data and rank 0 writes;
    with `run.fsdp`, the weights and accumulators are sharded over the ranks (docs/distributed.md).
    """
    options = options or ScoreOptions()
    check_data(options.method, data)
    check_retain(options.method, retain)
    session = Run(run)
    retain = retain_sources(options.method, retain)
    if output is not None:
        inputs = [model_ref, data, *(r for r in retain if str(r) not in NAMED_SETS), *avoid]
        output = session.check_output(output, inputs=inputs, overwrite=overwrite, kind="file")
        if output.suffix != ".safetensors":  # what every reader of masks takes
            raise PieceError(
                f"a mask is a .safetensors file: name the output e.g. '{output.stem}.safetensors'"
            )
    checkpoint = session.open(model_ref)
    dataset = session.data(checkpoint, data) if method_named(options.method).needs_data else None
    inputs = read_scoring_inputs(checkpoint, retain, avoid, session)
    check_selectable(checkpoint, options, inputs.avoid)
    model = session.load_model(checkpoint)
    mask, stats = score_loaded(checkpoint, model, dataset, options, inputs, session)
    if output is not None:
        session.write(lambda: save_mask(mask, Path(output)))
    return Scored(mask, stats, dataset)


__all__ = [
    "ScoreOptions",
    "Scored",
    "check_data",
    "check_retain",
    "retain_sources",
    "score_checkpoint",
    "score_loaded",
    "score_model",
]
