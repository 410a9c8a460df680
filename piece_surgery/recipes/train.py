"""The `train` recipe: score (unless a mask is given), train the masked entries, write the delta."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

from piece_surgery.data.examples import Dataset
from piece_surgery.data.files import referenced_images
from piece_surgery.formats.artifacts import open_mask
from piece_surgery.formats.delta import Delta, DeltaInfo, TrainLog, TrainProvenance
from piece_surgery.formats.delta_folder import DEFAULT_FORMAT, save_delta
from piece_surgery.formats.mask import Mask, check_scored_on
from piece_surgery.io.outputs import output_path, refuse_overlap, remove_stale_temporaries
from piece_surgery.io.sniff import DELTA
from piece_surgery.models.checkpoint import Checkpoint, LoadedModel
from piece_surgery.recipes.run import Run, open_avoided
from piece_surgery.runtime.dtypes import dtype_name
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.options import RunOptions
from piece_surgery.runtime.progress import Progress
from piece_surgery.runtime.sharding import reshard
from piece_surgery.scoring.inputs import check_selectable, read_scoring_inputs
from piece_surgery.scoring.methods import method_named
from piece_surgery.scoring.options import GENERAL, NAMED_SETS, SELF, ScoreOptions, check_drift_set
from piece_surgery.scoring.retain import general_text
from piece_surgery.scoring.selection import score_loaded, self_text
from piece_surgery.training.config import TrainConfig
from piece_surgery.training.deltas import trained_delta
from piece_surgery.training.loop import TrainResult, train_sparse
from piece_surgery.training.report import Reporters, parse_report_to
from piece_surgery.training.schedule import budget_period, total_steps
from piece_surgery.training.state import is_state, remove_state


class Trained(NamedTuple):
    delta: Delta
    result: TrainResult
    mask: Mask
    tensor_bytes: int = 0  # bytes of tensor data the delta folder holds (format 1 or 2)

    def to_json(self, *, model: str, mask_ref: str | None, output: Path, seconds: float) -> dict:
        """What `train --json` prints (schema in docs/cli.md): the run's figures as the delta's
        provenance records them (TrainResult.summary), and what was written."""
        delta, mask = self.delta, self.mask
        provenance = delta.info.provenance
        general, data = provenance.eval_general, provenance.data
        return {
            "output": str(output),
            "model": model,
            "mask": mask_ref,
            "method": mask.info.method,
            "density": mask.info.density,
            "mask_entries": mask.k,
            "entries": delta.count,
            "tensors": len(delta.tensors),
            # as score --json says them: the examples trained on, and those left out
            "examples": data.examples if data else None,
            "skipped_examples": data.skipped if data else 0,
            **self.result.summary(),
            "eval_general": general.file if general else None,
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
    report_to: str | Sequence[str] | None = None,
    logging_dir: Path | None = None,
) -> Trained:
    """Score (unless `mask_ref` names a mask; `score_options`, `retain` and `avoid` as for
    score_checkpoint), train the masked entries, write the delta folder (in format `delta_format`).
    `run` says where and how to load. `eval_general` (a data file, `self` or `general`) is general
    text the drift from the base is measured on, every `config.eval_every` steps and at the end.
    `report_to` (tensorboard, wandb; "none" or None: nothing) logs every step there while it
    trains, into `logging_dir` (default: OUT.logs beside the output).
    Under a launcher (torchrun, ...) every rank trains on its share of each step and rank 0 writes."""
    options = _scoring_options(score_options, retain, avoid, mask_ref)
    eval_general = _eval_general(eval_general, config)
    _check_options(config, mask_ref, options, eval_data, eval_general)
    session = Run(run)
    files = [r for r in [eval_general, *(options.retain or [])] if r and str(r) not in NAMED_SETS]
    inputs = [model_ref, data, mask_ref, eval_data, *files, *avoid]
    output = session.check_output(Path(output), inputs=inputs, overwrite=overwrite, kind=DELTA)
    state_dir = _state_dir(output, inputs, resume=resume, overwrite=overwrite, session=session)
    reporting = _reporting(report_to, logging_dir, (output, state_dir), inputs)
    checkpoint = session.open(model_ref)
    mask = _mask_for(mask_ref, checkpoint)
    dataset = session.data(checkpoint, data)
    eval_set = session.data(checkpoint, eval_data, every_example=True) if eval_data else None
    scoring = None
    if mask is None:
        avoided = open_avoided(avoid)
        scoring = read_scoring_inputs(checkpoint, options.retain_sources, avoided, session.reader(checkpoint))
        check_selectable(checkpoint, options, scoring.avoid)
    general = _general_text(eval_general, checkpoint, session) if eval_general is not None else None
    model = session.load_model(checkpoint)
    if general is SELF:
        general = _self_general(checkpoint, model, replace(options, seed=config.seed), session)
    if mask is None:
        mask, _ = score_loaded(checkpoint, model, dataset, options, scoring, **session.where())
    config = _configured(config, mask, dataset, session)
    sets = (dataset, eval_set, general)
    result = _train(session, checkpoint, model, mask, sets, config, state_dir, resume, reporting)
    provenance = _provenance(mask, config, session.options, dataset, eval_set, result, general)
    info = DeltaInfo(checkpoint.identity, provenance)
    delta = trained_delta(checkpoint, model, mask.indices, result.values, info)

    def write() -> int:
        tensor_bytes = save_delta(delta, output, format_version=delta_format)
        remove_state(state_dir)
        return tensor_bytes

    return Trained(delta, result, mask, session.write(write) or 0)


def _scoring_options(
    options: ScoreOptions | None, retain: Sequence[str | Path], avoid: Sequence[str], mask_ref: str | None
) -> ScoreOptions:
    """The scoring options (with `retain` given apart, as the library takes it); none of them, nor
    --avoid, with a mask that is given."""
    if mask_ref is not None and (options is not None or retain or avoid):
        raise PieceError(
            "scoring options (--method, --density, --retain, --avoid, ...) do nothing with --mask; "
            "leave them out"
        )
    return (options or ScoreOptions()).with_retain(retain)


def _eval_general(eval_general: str | Path | None, config: TrainConfig) -> str | Path | None:
    if eval_general is not None and not str(eval_general).strip():
        raise PieceError("--eval-general is empty: give a data file, self or general")
    if eval_general is not None:
        check_drift_set(eval_general, "--eval-general")
    if config.drift_budget and config.budget_on == "measured" and eval_general is None:
        return GENERAL  # the budget measures on the shipped general-text set by default
    return eval_general


def _check_options(
    config: TrainConfig,
    mask_ref: str | None,
    options: ScoreOptions,
    eval_data: Path | None,
    eval_general: str | Path | None,
) -> None:
    """Options that contradict each other, refused before anything is read."""
    if config.eval_every and eval_data is None and eval_general is None:
        raise PieceError("--eval-every needs --eval-data or --eval-general (what to measure)")
    if mask_ref is None:
        config.check_fisher(method_named(options.method).uses_retain, options.method)


def _mask_for(mask_ref: str | None, checkpoint: Checkpoint) -> Mask | None:
    """The mask given (checked against this checkpoint), or None: score first."""
    if mask_ref is None:
        return None
    mask = open_mask(mask_ref)
    check_mask_fits(mask, checkpoint, f"mask '{mask_ref}'")
    return mask


def _self_general(checkpoint: Checkpoint, model: LoadedModel, options: ScoreOptions, session: Run) -> Dataset:
    """--eval-general self: the text the loaded model writes itself."""
    length = session.options.max_length
    general = self_text(checkpoint, model, options, max_length=length, quiet=session.quiet)
    if session.options.fsdp:
        reshard(model.module)  # generating left the root module's weights gathered
    return general


def _configured(config: TrainConfig, mask: Mask, dataset: Dataset, session: Run) -> TrainConfig:
    """The config with the mask's defaults (its learning rate and retain penalty), and a measured
    budget's period (a tenth of the run) when none was given."""
    config = config.for_mask(mask.info.method, mask.fisher is not None)
    config.check_fisher(mask.fisher is not None)
    ranks = session.world.size if session.world is not None else 1
    steps = total_steps(len(dataset.examples), config, ranks)
    if config.drift_budget and config.budget_on == "measured" and config.eval_every is None:
        config = replace(config, eval_every=budget_period(steps))
    return config


class Reporting(NamedTuple):
    names: tuple[str, ...]  # the reporters asked for (training/report.REPORTERS)
    folder: Path  # where they write
    run_name: str  # the run's name there (the delta's)


def _reporting(
    report_to: str | Sequence[str] | None,
    logging_dir: Path | None,
    outputs: tuple[Path, Path],
    inputs: Sequence[str | Path | None],
) -> Reporting:
    """(the reporters asked for, each installed; the folder they write into), checked before any
    work: the folder (default OUT.logs) is an output too, so it may not overlap an input, nor lie
    in the `outputs` (the delta folder and its state folder), which replace what is in them."""
    output = outputs[0]
    text = report_to if report_to is None or isinstance(report_to, str) else ",".join(report_to)
    names = parse_report_to(text)
    if logging_dir is not None and not names:
        raise PieceError("--logging-dir is where --report-to writes: give --report-to too, or leave it out")
    folder = Path(logging_dir) if logging_dir is not None else output.with_name(output.name + ".logs")
    if names:
        refuse_overlap(folder, inputs, reads=referenced_images)
        for other in outputs:  # a folder around them is fine: replacing them leaves the rest
            if output_path(folder).resolve().is_relative_to(other):
                raise PieceError(
                    f"--logging-dir '{folder}' lies in '{other.name}', which this run replaces with what it "
                    f"writes; choose a folder apart (the default is {output.name}.logs beside the delta)"
                )
        if folder.exists() and not folder.is_dir():
            raise PieceError(f"logging folder '{folder}' is a file; choose another --logging-dir")
    return Reporting(names, folder, output.name)


def _train(
    session: Run,
    checkpoint: Checkpoint,
    model: LoadedModel,
    mask: Mask,
    sets: tuple[Dataset, Dataset | None, Dataset | None],
    config: TrainConfig,
    state_dir: Path,
    resume: bool,
    reporting: Reporting | None = None,
) -> TrainResult:
    """train_sparse on the loaded model, with a progress bar and the reporters asked for (rank 0).
    `sets`: the training data, the held-out data and the general text (the last two may be None)."""
    ranks = session.world.size if session.world is not None else 1
    steps = total_steps(len(sets[0].examples), config, ranks)
    reporting = reporting or Reporting((), Path("."), "")
    run_config = {
        **config.to_json(),
        "method": mask.info.method,
        "density": mask.info.density,
        "ranks": ranks,
    }
    names = reporting.names if session.is_main else ()
    reporters = Reporters(names, reporting.folder, reporting.run_name, run_config, quiet=session.quiet)
    with Progress(steps, "training", quiet=session.quiet, unit="step") as bar:

        def report(n: int, record: dict) -> None:
            notes = {"loss": f"{record['loss']:.4f}"}
            if "predicted_drift" in record:
                notes["drift"] = f"{record['predicted_drift']:.3g}"
            bar.note(**notes)
            bar.advance(n)
            reporters.log(record)

        try:
            result = _train_sparse(session, checkpoint, model, mask, sets, config, state_dir, resume, report)
        except BaseException:
            reporters.close(failed=True)
            raise
        reporters.close(result.history)
        return result


def _train_sparse(session, checkpoint, model, mask, sets, config, state_dir, resume, report) -> TrainResult:
    """train_sparse with what the recipe has; the resume key is what a resumed run must share with
    the run that saved the state (_resume_key)."""
    dataset, eval_set, general = sets
    resume_key = _resume_key(session, checkpoint, mask, dataset, eval_set, general)
    return train_sparse(
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
        autocast=session.placement(checkpoint).autocast,
    )


# The options a resumed run may change (docs: README, train): where it runs and how fast (device,
# attention kernel, FSDP, trust), where it stops and how often it measures, saves and checks a
# budget (TrainConfig.resume_key keeps the rest of the training options). Every other option that
# changes the trained values or the figures recorded is in the key.
RESUME_FREE_RUN_OPTIONS = ("device", "attn_implementation", "trust_remote_code", "fsdp", "quiet")


def _resume_key(
    session: Run,
    checkpoint: Checkpoint,
    mask: Mask,
    dataset: Dataset,
    eval_set: Dataset | None,
    general: Dataset | None,
) -> dict:
    """What a resumed run must share with the run that saved the state, besides the training
    options (train_sparse adds TrainConfig.resume_key and the number of ranks): the model, the
    data and how it is read, the mask, the weights' dtype, and the sets the figures are taken on."""
    options = session.options
    return {
        "model": checkpoint.identity.fingerprint,
        "data": dataset.sha256,
        "mask": mask.digest(),
        "max_length": options.max_length,
        "max_samples": options.max_samples,
        "dtype": dtype_name(session.placement(checkpoint).dtype),
        "eval_data": eval_set.sha256 if eval_set is not None else None,
        "eval_general": general.sha256 if general is not None else None,
    }


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
    if state_dir.exists() and not is_state(state_dir):  # resumed or not: saving replaces the folder
        raise PieceError(
            f"'{state_dir}', where train keeps its resumable state, holds something else; "
            "move it away or choose another -o"
        )
    if not resume and state_dir.exists():
        if not overwrite:
            raise PieceError(
                f"a saved training state is in '{state_dir}': add --resume to continue it, "
                "or --overwrite to discard it and start afresh"
            )
        session.write(lambda: remove_state(state_dir))
    return state_dir


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
    figures = result.summary()
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
        eval_general=general.record() if general is not None else None,
        **{name: figures[name] for name in TrainProvenance.FIGURES},
        log=TrainLog.from_json(figures["log"]),
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
    check_scored_on(mask, checkpoint.identity, where)
