"""The `train` recipe: score (unless a mask is given), train the masked entries, write the delta."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

from piece_surgery.data.dataset import Dataset
from piece_surgery.data.images import referenced_images
from piece_surgery.formats.artifacts import open_mask
from piece_surgery.formats.delta import Delta, DeltaInfo, TrainProvenance, delta_from_values
from piece_surgery.formats.delta_folder import DEFAULT_FORMAT, save_delta
from piece_surgery.formats.mask import Mask
from piece_surgery.io.outputs import refuse_overlap, remove_stale_temporaries
from piece_surgery.models.checkpoint import Checkpoint, LoadedModel
from piece_surgery.recipes.run import Run
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.options import RunOptions
from piece_surgery.runtime.progress import Progress
from piece_surgery.runtime.sharding import reshard
from piece_surgery.scoring.inputs import check_retain, check_selectable, read_scoring_inputs, retain_sources
from piece_surgery.scoring.methods import method_named
from piece_surgery.scoring.options import ScoreOptions
from piece_surgery.scoring.retain import GENERAL, NAMED_SETS, SELF, general_text
from piece_surgery.scoring.selection import score_loaded, self_text
from piece_surgery.training.loop import TrainConfig, TrainResult, budget_period, total_steps, train_sparse
from piece_surgery.training.state import is_state, remove_state


class Trained(NamedTuple):
    delta: Delta
    result: TrainResult
    mask: Mask
    tensor_bytes: int = 0  # bytes of tensor data the delta folder holds (format 1 or 2)

    def to_json(self, *, model: str, mask_ref: str | None, output: Path, seconds: float) -> dict:
        """What `train --json` prints (schema in docs/cli.md)."""
        delta, result, mask = self.delta, self.result, self.mask
        return {
            "output": str(output),
            "model": model,
            "mask": mask_ref,
            "method": mask.info.method,
            "density": mask.info.density,
            "mask_entries": mask.k,
            "entries": delta.count,
            "tensors": len(delta.tensors),
            "steps": result.steps,
            "resumed_from": result.resumed_from,
            "first_train_loss": result.history[0]["loss"] if result.history else None,
            "final_train_loss": result.train_loss,
            "final_eval_loss": result.eval_loss,
            "predicted_drift": result.predicted_drift,
            "measured_drift": result.measured_drift,
            "eval_general": general.file if (general := delta.info.provenance.eval_general) else None,
            "stopped_by_drift_budget": result.stopped_by_drift_budget,
            "drift_budget_passed": result.drift_budget_passed,
            "unchanged_reason": result.unchanged_reason,
            "seconds": round(seconds, 3),
        }


def state_dir_for(output: Path) -> Path:
    """Where `train -o OUT --save-every N` keeps its resumable state: OUT.state beside OUT."""
    return output.with_name(output.name + ".state")


def train_checkpoint(
    model_ref: str,
    data: Path,
    output: Path,
    config: TrainConfig,
    run: RunOptions | None = None,
    *,
    mask_ref: str | None = None,
    score_options: ScoreOptions | None = None,
    retain: Sequence[str | Path] = (),
    avoid: Sequence[str] = (),
    eval_data: Path | None = None,
    eval_general: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    delta_format: int = DEFAULT_FORMAT,
) -> Trained:
    """Score (unless `mask_ref` names a mask; `retain` and `avoid` as for score_checkpoint), train
    the masked entries, write the delta folder. `run` says where and how to load. `eval_general`
    (a data file, `self` or `general`) is general text the drift from the base is measured on,
    every `config.eval_every` steps and at the end (drift.py). Under a launcher (torchrun, ...)
    every rank trains on its share of each step and rank 0 writes."""
    output = Path(output)
    if eval_general is not None and not str(eval_general).strip():
        raise PieceError("--eval-general is empty: give a data file, self or general")
    if config.drift_budget and config.budget_on == "measured" and eval_general is None:
        eval_general = GENERAL  # the budget measures on the shipped general-text set by default
    _check_options(config, mask_ref, score_options, retain, avoid, eval_data, eval_general)
    session = Run(run)
    general_file = eval_general if eval_general is not None and str(eval_general) not in NAMED_SETS else None
    extra = [mask_ref, eval_data, general_file, *(r for r in retain if str(r) not in NAMED_SETS), *avoid]
    output = session.check_output(output, inputs=[model_ref, data, *extra], overwrite=overwrite)
    inputs = [model_ref, data, *extra]
    state_dir = _state_dir(output, inputs, resume=resume, overwrite=overwrite, session=session)
    mask = open_mask(mask_ref) if mask_ref is not None else None
    checkpoint = session.open(model_ref)
    if mask is not None:
        check_mask_fits(mask, checkpoint, f"mask '{mask_ref}'")
        config = config.for_mask(mask.info.method, mask.fisher is not None)
    dataset = session.data(checkpoint, data)
    eval_set = session.data(checkpoint, eval_data, every_example=True) if eval_data else None
    options = score_options or ScoreOptions()
    if mask is None:
        retain = retain_sources(options.method, retain)
    scoring = read_scoring_inputs(checkpoint, retain, avoid, session.reader(checkpoint))
    if mask is None:
        check_selectable(checkpoint, options, scoring.avoid)
    general = _general_text(eval_general, checkpoint, session) if eval_general is not None else None
    model = session.load_model(checkpoint)
    if general is SELF:
        general = self_text(
            checkpoint,
            model,
            replace(options, seed=config.seed),
            max_length=session.options.max_length,
            quiet=session.quiet,
        )
        if session.options.fsdp:
            reshard(model.module)  # generating left the root module's weights gathered
    if mask is None:
        mask, _ = score_loaded(checkpoint, model, dataset, options, scoring, **session.where())
        config = config.for_mask(mask.info.method, mask.fisher is not None)
    resume_key = {"model": checkpoint.identity.fingerprint, "data": dataset.sha256, "mask": mask.digest()}
    ranks = session.world.size if session.world is not None else 1
    steps = total_steps(len(dataset.examples), config, ranks)
    if config.drift_budget and config.budget_on == "measured" and config.eval_every is None:
        config = replace(config, eval_every=budget_period(steps))
    with Progress(steps, "training", quiet=session.quiet, unit="step") as bar:

        def report(n: int, record: dict) -> None:
            notes = {"loss": f"{record['loss']:.4f}"}
            if "predicted_drift" in record:
                notes["drift"] = f"{record['predicted_drift']:.3g}"
            bar.note(**notes)
            bar.advance(n)

        result = train_sparse(
            model.module,
            model.parameters(mask.indices),
            mask.indices,
            dataset,
            config,
            pad_id=checkpoint.pad_id,
            eval_dataset=eval_set,
            general_dataset=general,
            state_dir=state_dir,
            resume=resume,
            resume_key=resume_key,
            progress=report,
            fisher=mask.fisher,
            world=session.world,
        )
    provenance = _provenance(mask, config, session.options, dataset, eval_set, result, general)
    delta = _delta_of(checkpoint, model, mask, result, provenance)

    def write() -> int:
        tensor_bytes = save_delta(delta, output, format_version=delta_format)
        remove_state(state_dir)
        return tensor_bytes

    return Trained(delta, result, mask, session.write(write) or 0)


def _check_options(
    config: TrainConfig,
    mask_ref: str | None,
    score_options: ScoreOptions | None,
    retain: Sequence[str | Path],
    avoid: Sequence[str],
    eval_data: Path | None,
    eval_general: str | Path | None = None,
) -> None:
    """Options that contradict each other, refused before anything is read."""
    if mask_ref is not None and (score_options is not None or retain or avoid):
        raise PieceError(
            "scoring options (--method, --density, --retain, --avoid, ...) do nothing with --mask; "
            "leave them out"
        )
    if config.eval_every and eval_data is None and eval_general is None:
        raise PieceError("--eval-every needs --eval-data or --eval-general (what to measure)")
    if mask_ref is None:
        method = (score_options or ScoreOptions()).method
        check_retain(method, retain)
        predicted_budget = config.drift_budget and config.budget_on == "predicted"
        if (predicted_budget or config.retain_weight) and not method_named(method).uses_retain:
            raise PieceError(
                f"--budget-on predicted and --retain-weight need a mask that carries the retain Fisher "
                f"(--method piece-r); --method {method} has none"
            )


def _general_text(ref: str | Path, checkpoint: Checkpoint, session: Run) -> Dataset | str:
    """--eval-general: a data file or the shipped set, read now; `self` is written by the model
    once it is loaded (SELF stands for it until then)."""
    if str(ref) == SELF:
        return SELF
    if str(ref) == GENERAL:
        return session.data(checkpoint, general_text(), every_example=True, name=GENERAL)
    return session.data(checkpoint, Path(ref), every_example=True)


def _state_dir(
    output: Path, inputs: Sequence[str | Path | None], *, resume: bool, overwrite: bool, session: Run
) -> Path:
    """Where this run's resumable state goes (an output too: it may not overlap an input); a state
    left by an earlier run is continued (--resume), discarded (--overwrite) or refused. Only a
    folder that holds a training state is ever discarded."""
    state_dir = state_dir_for(output)
    refuse_overlap(state_dir, inputs, reads=referenced_images)
    if state_dir.is_symlink() or (state_dir.exists() and not state_dir.is_dir()):
        raise PieceError(
            f"'{state_dir}', where train keeps its resumable state, is a link or a file; "
            "move it away or choose another -o"
        )
    remove_stale_temporaries(state_dir)  # of a run killed while saving its state
    if not resume and state_dir.exists():
        if not is_state(state_dir):
            raise PieceError(
                f"'{state_dir}', where train keeps its resumable state, holds something else; "
                "move it away or choose another -o"
            )
        if not overwrite:
            raise PieceError(
                f"a saved training state is in '{state_dir}': add --resume to continue it, "
                "or --overwrite to discard it and start afresh"
            )
        session.write(lambda: remove_state(state_dir))
    return state_dir


def _delta_of(
    checkpoint: Checkpoint, model: LoadedModel, mask: Mask, result: TrainResult, provenance: TrainProvenance
) -> Delta:
    """The trained values against the base values read from the checkpoint files. A trained tensor
    that the files also store under another name (a tied pair stored twice) changes under every
    name: transformers ties the copies on loading only while they agree."""
    entries = {}
    with checkpoint.reader() as reader:
        for name, idx in mask.indices.items():
            for stored in (name, *model.aliases.get(name, [])):
                base_values = reader.get(stored).reshape(-1)[idx].clone()
                entries[stored] = (idx, base_values, result.values[name].to(base_values.dtype))
    shapes = {n: checkpoint.layout[n].shape for n in entries}
    return delta_from_values(entries, shapes, DeltaInfo(checkpoint.identity, provenance), model.twins)


def _provenance(
    mask: Mask,
    config: TrainConfig,
    run: RunOptions,
    dataset: Dataset,
    eval_set: Dataset | None,
    result: TrainResult,
    general: Dataset | None = None,
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
        # TrainConfig.from_json reads these back into the config that made the delta
        hyperparameters={**config.to_json(), "max_length": run.max_length},
        data=dataset.record(),
        eval_data=eval_set.record() if eval_set else None,
        steps=result.steps,
        final_train_loss=result.train_loss,
        final_eval_loss=result.eval_loss,
        predicted_drift=result.predicted_drift,
        measured_drift=result.measured_drift,
        eval_general=general.record() if general is not None else None,
        stopped_by_drift_budget=result.stopped_by_drift_budget,
        drift_budget_passed=result.drift_budget_passed,
    )


def check_mask_fits(mask: Mask, checkpoint: Checkpoint, where: str) -> None:
    """A mask must name tensors of this checkpoint, with their shapes, scored on these very weights."""
    for name in mask.indices:
        if name not in checkpoint.layout:
            raise PieceError(f"{where} selects tensor '{name}', which this model does not have")
        if tuple(checkpoint.layout[name].shape) != tuple(mask.shapes[name]):
            raise PieceError(
                f"{where}: tensor '{name}' is {list(mask.shapes[name])} in the mask but "
                f"{list(checkpoint.layout[name].shape)} in this model"
            )
    scored_on = mask.info.model
    if scored_on and scored_on.fingerprint and scored_on.fingerprint != checkpoint.identity.fingerprint:
        raise PieceError(f"{where} was scored on another model ({scored_on.name}); score this model first")
