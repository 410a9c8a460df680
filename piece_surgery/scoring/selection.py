"""Score a loaded model and select its mask: the data passes that fold every micro-batch's
gradient into accumulators (importance.py), the method's score (methods.py), the global top-k
(formats/mask.py), and the record of how it was made. `score_model` is the library entry point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from piece_surgery.data.examples import Dataset
from piece_surgery.formats.mask import Mask, MaskInfo, k_for_density, select_top_k
from piece_surgery.models.checkpoint import Checkpoint, LoadedModel
from piece_surgery.models.eligible import eligible_parameters
from piece_surgery.models.fused import ParameterSlice
from piece_surgery.models.loading import enable_activation_checkpointing
from piece_surgery.runtime.distributed import World
from piece_surgery.runtime.dtypes import dtype_name
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.options import RunOptions
from piece_surgery.runtime.progress import Progress
from piece_surgery.runtime.records import CheckpointIdentity, RetainRecord
from piece_surgery.runtime.sharding import is_sharded, local_part, reshard
from piece_surgery.scoring.importance import PassStats, accumulate_gradients, normalize_scores, reduce_pass
from piece_surgery.scoring.methods import ScoreInputs, method_named
from piece_surgery.scoring.options import ScoreOptions
from piece_surgery.scoring.retain import CHAT, SELF, Avoided, ScoringInputs, sample_chat, sample_self


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
    params = eligible_parameters(
        model.module, model.keys, include=options.include, exclude=options.exclude, slices=model.slices
    )
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
    groups = {n: p.stored.param for n, p in params.items() if isinstance(p, ParameterSlice)}
    normalize_scores(
        scores, options.normalize, sum_over_ranks=shards.sum_over_ranks, sizes=shards.sizes, groups=groups
    )
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
    chat = next((d for d in retain if d.name == CHAT), None)
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
        chat_sampling=(
            {
                "seed": options.seed,
                "instructions": chat.read,
                "length": min(options.self_length, chat.max_length // 2),
            }
            if chat
            else None
        ),
    )


def score_loaded(
    checkpoint: Checkpoint,
    model: LoadedModel,
    dataset: Dataset | None,
    options: ScoreOptions,
    inputs: ScoringInputs,
    *,
    run: RunOptions,
    world: World | None = None,
    quiet: bool = True,
) -> tuple[Mask, PassStats]:
    """Score a checkpoint whose model is loaded, with its retain data and avoided entries; the mask
    records the model, the retain text (text the model writes itself is sampled here: every rank
    writes the same, from the same seed) and what it avoided."""
    retain = [_written(source, checkpoint, model, options, run, quiet) for source in inputs.retain]
    if run.fsdp:
        reshard(model.module)  # generating the self text left the root module's weights gathered
    total = sum(len(d.examples) for d in [*([dataset] if dataset else []), *retain])
    total = math.ceil(total / world.size) if world is not None else total  # this rank's share
    with Progress(total, "scoring", quiet=quiet or not total) as bar:
        return score_model(
            model,
            dataset,
            options,
            retain=retain,
            avoid=inputs.avoid,
            identity=checkpoint.identity,
            run=run,
            pad_id=checkpoint.pad_id,
            progress=bar,
            world=world,
        )


def _written(source, checkpoint: Checkpoint, model: LoadedModel, options: ScoreOptions, run, quiet: bool):
    """A retain source as scoring reads it: the text the model writes itself (self, chat) written
    now, every rank the same from the same seed; a dataset read before, as it is."""
    if source == SELF:
        return self_text(checkpoint, model, options, max_length=run.max_length, quiet=quiet)
    if source == CHAT:  # an answer takes at most half the positions: the instruction fits beside it
        max_length = min(run.max_length, checkpoint.context_length() or run.max_length)
        length = min(options.self_length, max_length // 2)
        tokenizer = checkpoint.load_tokenizer()
        return sample_chat(
            model.module,
            tokenizer,
            length=length,
            seed=options.seed,
            max_length=max_length,
            pad_id=checkpoint.pad_id,
            quiet=quiet,
        )
    return source


def self_text(
    checkpoint: Checkpoint, model: LoadedModel, options: ScoreOptions, *, max_length: int, quiet: bool
) -> Dataset:
    """The text the model writes itself (`self`): options.self_samples texts of options.self_length
    tokens (less where --max-length or the model's context is shorter), seeded by options.seed, the
    same on every rank."""
    return sample_self(
        model.module,
        checkpoint.load_tokenizer(),
        pad_id=checkpoint.pad_id,
        samples=options.self_samples,
        length=min(options.self_length, max_length - 1),  # the start token is one
        seed=options.seed,
        quiet=quiet,
    )
