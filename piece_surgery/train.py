"""The `train` recipe: score (unless a mask is given), train the masked entries, write the delta."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

from piece_surgery import distributed
from piece_surgery.artifacts import open_mask
from piece_surgery.checkpoint import Checkpoint, open_checkpoint
from piece_surgery.data import Dataset
from piece_surgery.delta import Delta, DeltaInfo, TrainProvenance, delta_from_values, save_delta
from piece_surgery.distributed import World
from piece_surgery.errors import PieceError
from piece_surgery.mask import Mask, check_mask_fits
from piece_surgery.outputs import check_output, remove_stale_temporaries
from piece_surgery.progress import Progress
from piece_surgery.retain import SELF, read_scoring_inputs
from piece_surgery.score import ScoreOptions, retain_sources, score_loaded
from piece_surgery.sharding import shard_model
from piece_surgery.train_state import remove_state
from piece_surgery.trainer import TrainConfig, TrainResult, total_steps, train_sparse


class Trained(NamedTuple):
    delta: Delta
    result: TrainResult
    mask: Mask


def state_dir_for(output: Path) -> Path:
    """Where `train -o OUT --save-every N` keeps its resumable state: OUT.state beside OUT."""
    return output.with_name(output.name + ".state")


def train_checkpoint(
    model_ref: str,
    data: Path,
    output: Path,
    config: TrainConfig,
    *,
    mask_ref: str | None = None,
    score_options: ScoreOptions | None = None,
    retain: Sequence[str | Path] = (),
    avoid: Sequence[str] = (),
    eval_data: Path | None = None,
    max_length: int = 512,
    max_samples: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    quiet: bool = True,
    fsdp: bool = False,
    compact: bool = False,
) -> Trained:
    """Score (unless `mask_ref` names a mask; `retain` and `avoid` as for score_checkpoint), train
    the masked entries, write the delta folder. Under a launcher (torchrun, ...) every rank trains
    on its share of each step and rank 0 writes."""
    world = distributed.start(device)
    distributed.load_device(world, device, fsdp)  # --fsdp without a launcher fails here, early
    main = world is None or world.is_main
    quiet = quiet or not main
    output = Path(output)
    files = [mask_ref, eval_data, *(r for r in retain if str(r) != SELF), *avoid]
    inputs = [Path(model_ref), Path(data), *(Path(p) for p in files if p)]
    check_output(output, overwrite=overwrite, inputs=tuple(inputs))
    if mask_ref is not None and (score_options is not None or retain or avoid):
        raise PieceError(
            "scoring options (--method, --density, --retain, --avoid, ...) do nothing with --mask; "
            "leave them out"
        )
    if config.eval_every and eval_data is None:
        raise PieceError("--eval-every needs --eval-data (held-out data to evaluate on)")
    state_dir = _state_dir(output, resume=resume, overwrite=overwrite, world=world)
    mask = open_mask(mask_ref) if mask_ref is not None else None
    checkpoint = open_checkpoint(model_ref, trust_remote_code=trust_remote_code)
    if mask is not None:
        check_mask_fits(mask, checkpoint, f"mask '{mask_ref}'")
    dataset = checkpoint.load_data(data, max_length=max_length, max_samples=max_samples, quiet=quiet)
    eval_set = checkpoint.load_data(eval_data, max_length=max_length, quiet=quiet) if eval_data else None
    options = score_options or ScoreOptions()
    if mask is None:
        retain = retain_sources(options.method, retain)
    scoring = read_scoring_inputs(checkpoint, retain, avoid, max_length=max_length, quiet=quiet)
    model = checkpoint.load_model(
        device=distributed.load_device(world, device, fsdp), dtype=dtype, quiet=quiet
    )
    if fsdp:
        shard_model(model, world)
    if mask is None:
        mask, _ = score_loaded(checkpoint, dataset, options, scoring, quiet=quiet, world=world)
        mask.info.options["max_samples"] = max_samples
    config = config.for_mask(mask.info.method, mask.fisher is not None)
    resume_key = {"model": checkpoint.identity.fingerprint, "data": dataset.sha256, "mask": mask.digest()}
    ranks = world.size if world is not None else 1
    with Progress(
        total_steps(len(dataset.examples), config, ranks), "training", quiet=quiet, unit="step"
    ) as bar:

        def report(n: int, record: dict) -> None:
            notes = {"loss": f"{record['loss']:.4f}"}
            if "predicted_drift" in record:
                notes["drift"] = f"{record['predicted_drift']:.3g}"
            bar.note(**notes)
            bar.advance(n)

        result = train_sparse(
            model,
            checkpoint.parameters(mask.indices),
            mask.indices,
            dataset,
            config,
            pad_id=checkpoint.pad_id,
            eval_dataset=eval_set,
            state_dir=state_dir,
            resume=resume,
            resume_key=resume_key,
            progress=report,
            fisher=mask.fisher,
            world=world,
        )
    delta = _delta_of(
        checkpoint, mask, result, _provenance(mask, config, dataset, eval_set, result, max_length)
    )
    if main:
        save_delta(delta, output, compact=compact)
        remove_state(state_dir)
    if world is not None:
        world.barrier()  # every rank ends once the delta is written
    return Trained(delta, result, mask)


def _state_dir(output: Path, *, resume: bool, overwrite: bool, world: World | None) -> Path:
    """Where this run's resumable state goes; a state left by an earlier run is continued
    (--resume), discarded (--overwrite) or refused."""
    state_dir = state_dir_for(output)
    remove_stale_temporaries(state_dir)  # of a run killed while saving its state
    if not resume and state_dir.exists():
        if not overwrite:
            raise PieceError(
                f"a saved training state is in '{state_dir}': add --resume to continue it, "
                "or --overwrite to discard it and start afresh"
            )
        if world is None or world.is_main:
            remove_state(state_dir)
        if world is not None:
            world.barrier()
    return state_dir


def _delta_of(checkpoint: Checkpoint, mask: Mask, result: TrainResult, provenance: TrainProvenance) -> Delta:
    """The trained values against the base values read from the checkpoint files."""
    entries = {}
    with checkpoint.reader() as reader:
        for name, idx in mask.indices.items():
            base_values = reader.get(name).reshape(-1)[idx].clone()
            entries[name] = (idx, base_values, result.values[name].to(base_values.dtype))
    shapes = {n: mask.shapes[n] for n in entries}
    return delta_from_values(entries, shapes, DeltaInfo(checkpoint.identity, provenance))


def _provenance(
    mask: Mask,
    config: TrainConfig,
    dataset: Dataset,
    eval_set: Dataset | None,
    result: TrainResult,
    max_length: int,
) -> TrainProvenance:
    info = mask.info
    return TrainProvenance(
        method=info.method,
        density=info.density,
        mask={
            "method": info.method,
            "density": info.density,
            "data": info.data.to_json() if info.data else None,
            "seed": info.seed,
            "k": mask.k,
        },
        hyperparameters={**asdict(config), "betas": list(config.betas), "max_length": max_length},
        data=dataset.record(),
        eval_data=eval_set.record() if eval_set else None,
        steps=result.steps,
        final_train_loss=result.train_loss,
        final_eval_loss=result.eval_loss,
        predicted_drift=result.predicted_drift,
        stopped_by_drift_budget=result.stopped_by_drift_budget,
    )
