"""The `eval` recipe: what candidates learned on a domain and how far they drifted from their base on
general text, measured against one loaded base (drift.py has the measure).

A candidate is a delta (folder or Hub repo id), a PEFT adapter (read as the delta its merge makes)
or a merged checkpoint. Deltas and adapters are switched in and out of the one base model
(DeltaSwitcher), so N of them cost one model load and, per batch, one pass of the base and one of
each candidate; a merged checkpoint is loaded beside the base, one at a time.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from piece_surgery.data.examples import Dataset
from piece_surgery.evaluation.drift import Comparison, Forward, compare, model_forward
from piece_surgery.evaluation.options import EvalOptions
from piece_surgery.formats.delta import Delta
from piece_surgery.formats.delta_folder import check_measured, record_evaluation
from piece_surgery.io.outputs import input_path
from piece_surgery.io.sniff import DELTA, sniff
from piece_surgery.merging.switcher import DeltaSwitcher
from piece_surgery.models.checkpoint import Checkpoint, LoadedModel
from piece_surgery.recipes.candidates import adapter_delta, identify, load_beside
from piece_surgery.recipes.plots import check_plot, pyplot, save
from piece_surgery.recipes.run import Run, check_dtype_choice
from piece_surgery.runtime.errors import PieceError, first_line, quote
from piece_surgery.runtime.options import RunOptions
from piece_surgery.runtime.progress import Progress, library_logs_silenced
from piece_surgery.scoring.options import check_drift_set
from piece_surgery.scoring.retain import GENERAL, SELF, general_text, sample_self

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Candidate:
    """One candidate as given, what kind it is, and its figures once measured."""

    ref: str
    kind: str  # "delta", "adapter" or "checkpoint"
    path: Path
    delta: Delta | None = None  # a delta, or an adapter read as one
    domain: Comparison | None = None
    general: dict[str, Comparison] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def changes_outputs(self) -> bool:
        return any(c.differs for c in [*([self.domain] if self.domain else []), *self.general.values()])

    def to_json(self) -> dict:
        """One row of `eval --json` (schema in docs/cli.md)."""
        first = next(iter(self.general.values()), None)
        domain = self.domain
        return {
            "candidate": self.ref,
            "kind": self.kind,
            "changes_outputs": self.changes_outputs,
            "gain": domain.base_loss - domain.loss if domain else None,
            "loss": domain.loss if domain else None,
            "base_loss": domain.base_loss if domain else None,
            "drift": first.kl if first else None,
            "top1_changed": first.top1_share if first else None,
            "tokens": (domain.tokens if domain else 0) + sum(c.tokens for c in self.general.values()),
            "general": [{"set": name, **c.to_json()} for name, c in self.general.items()],
            "seconds": round(self.seconds, 3),
        }


@dataclass
class Evaluated:
    """What `eval` measured: the base, the data, and each candidate's figures."""

    base: str
    data: Dataset | None
    general: list[Dataset]
    candidates: list[Candidate]
    seconds: float = 0.0
    base_identity: dict | None = None  # the base's CheckpointIdentity, as records carry it
    recorded: list[str] = field(default_factory=list)  # the deltas --record wrote into
    plot: str | None = None  # the image --plot drew
    tasks: dict[str, dict] = field(default_factory=dict)  # lm-eval: candidate ("base" too) -> task -> metrics

    def to_json(self) -> dict:
        def data_json(d: Dataset) -> dict:
            return {"file": d.name, "sha256": d.sha256, "examples": len(d.examples), "skipped": d.skipped}

        return {
            "base": self.base,
            "data": data_json(self.data) if self.data else None,
            "general": [data_json(d) for d in self.general],
            "candidates": [c.to_json() for c in self.candidates],
            "recorded": self.recorded,
            "plot": self.plot,
            "tasks": self.tasks,
            "seconds": round(self.seconds, 3),
        }


def evaluate_candidates(
    base_ref: str,
    candidates: Sequence[str],
    run: RunOptions | None = None,
    *,
    data: Path | None = None,
    general: Sequence[str | Path] = (SELF,),
    options: EvalOptions | None = None,
    tasks: Sequence[str] = (),
    tasks_path: Path | None = None,
) -> Evaluated:
    """Measure each candidate against the base: on `data` (the domain) the mean token loss of both
    and the gain; on each `general` set (a data file, `self`: text the base writes itself, seeded
    as `score --retain self` is, or `general`: the shipped set) the drift KL(base || candidate),
    the candidate's loss and the share of tokens whose top-1 prediction changed. PieceError for a
    candidate of another base (naming the first mismatch), empty data, or a set that tokenizes to
    nothing."""
    options = options or EvalOptions()
    start = time.perf_counter()
    if not candidates:
        raise PieceError("give at least one candidate: a delta, a PEFT adapter or a merged checkpoint")
    if not general:
        raise PieceError("give at least one --general set (a data file, self or general)")
    for g in general:
        check_drift_set(g, "--general")
    session = Run(run)
    if session.options.fsdp:
        raise PieceError("--fsdp is for score and train; eval loads one model per process")
    if session.world is not None and session.world.size > 1:
        # every rank would measure everything, and write the same record and plot
        raise PieceError("eval runs in one process: run it without torchrun or another launcher")
    checkpoint = session.open(base_ref, what="base")
    found = [_candidate(ref) for ref in candidates]
    domain = session.data(checkpoint, data) if data is not None else None
    files = {
        str(g): session.data(checkpoint, Path(g), every_example=True)
        for g in general
        if str(g) not in (SELF, GENERAL)
    }
    if GENERAL in map(str, general):
        files[GENERAL] = session.data(checkpoint, general_text(), every_example=True, name=GENERAL)
    base = session.load_model(checkpoint)
    sets = [_general_set(str(g), files, checkpoint, base, options, session) for g in general]
    switcher = DeltaSwitcher(base.module)
    for c in found:
        if c.kind != "checkpoint":
            c.delta = c.delta or _adapter_delta(c, base_ref, session.options)
            check_dtype_choice(c.delta, checkpoint, session.options.dtype, f"{c.kind} '{c.ref}'")
            switcher.add(c.ref, c.delta)
    measured = [(domain, "domain")] if domain is not None else []
    measured += [(d, d.name) for d in sets]
    with Progress(
        sum(len(d.examples) for d, _ in measured) * max(len(found), 1), "measuring", quiet=session.quiet
    ) as bar:
        for dataset, label in measured:
            _measure(dataset, label, found, switcher, base, checkpoint, session, options, bar)
    evaluated = Evaluated(base_ref, domain, sets, found, 0.0, checkpoint.identity.to_json())
    if tasks:
        evaluated.tasks = _run_tasks(tasks, tasks_path, found, switcher, base, checkpoint, session, options)
    evaluated.seconds = time.perf_counter() - start
    return evaluated


def _candidate(ref: str) -> Candidate:
    """What `ref` holds: a delta folder, a PEFT adapter or a model checkpoint."""
    kind, path, delta = identify(ref)
    return Candidate(ref, kind, path, delta=delta)


def _adapter_delta(candidate: Candidate, base_ref: str, run: RunOptions) -> Delta:
    return adapter_delta(candidate.ref, base_ref, run)


def _general_set(
    name: str, files: dict, checkpoint: Checkpoint, base: LoadedModel, options: EvalOptions, run: Run
) -> Dataset:
    if name != SELF:
        return files[name]
    return sample_self(
        base.module,
        checkpoint.load_tokenizer(),
        pad_id=checkpoint.pad_id,
        samples=options.self_samples,
        length=min(options.self_length, run.options.max_length - 1),
        seed=options.seed,
        quiet=run.quiet,
    )


def _measure(dataset, label, found, switcher, base, checkpoint, session, options, bar) -> None:
    """Every candidate on one dataset: deltas switched on the base batch by batch, a merged
    checkpoint loaded beside it."""
    device = next(base.module.parameters()).device
    base_forward = model_forward(base.module)

    def timed(candidate: Candidate, forward: Forward) -> Forward:
        def run_it(batch):
            begin = time.perf_counter()
            out = forward(batch)
            candidate.seconds += time.perf_counter() - begin
            return out

        return run_it

    def on_base(batch):
        switcher.activate(None)
        return base_forward(batch)

    deltas = {
        c.ref: timed(c, _switched(switcher, c.ref, base_forward)) for c in found if c.kind != "checkpoint"
    }
    results = compare(
        dataset,
        on_base,
        deltas,
        batch_size=options.batch_size,
        pad_id=checkpoint.pad_id,
        device=device,
        progress=bar.advance,
    )
    for c in found:
        if c.kind == "checkpoint":
            other = _load_candidate(c, checkpoint, session)
            results.update(
                compare(
                    dataset,
                    on_base,
                    {c.ref: timed(c, model_forward(other))},
                    batch_size=options.batch_size,
                    pad_id=checkpoint.pad_id,
                    device=device,
                    progress=bar.advance,
                )
            )
            del other
    switcher.activate(None)
    for c in found:
        if label == "domain":
            c.domain = results[c.ref]
        else:
            c.general[label] = results[c.ref]


def _switched(switcher: DeltaSwitcher, name: str, forward: Forward) -> Forward:
    def run_it(batch):
        switcher.activate(name)
        return forward(batch)

    return run_it


def _load_candidate(candidate: Candidate, base: Checkpoint, session: Run) -> torch.nn.Module:
    return load_beside(candidate.ref, base, session)


def evaluation_record(evaluated: Evaluated, candidate: Candidate) -> dict:
    """What `eval --record` writes into a delta: the figures and the data they were taken on, by
    name, sha256 and token count (never a local path)."""
    from piece_surgery.runtime.version import __version__

    row = candidate.to_json()
    data = evaluated.data
    general = {d.name: d for d in evaluated.general}
    return {
        "base": evaluated.base_identity,
        "data": None
        if data is None
        else {"file": data.name, "sha256": data.sha256, "tokens": row_tokens(candidate.domain)},
        "gain": row["gain"],
        "loss": row["loss"],
        "base_loss": row["base_loss"],
        "general": [{**g, "sha256": general[g["set"]].sha256} for g in row["general"]],
        "weights_sha256": candidate.delta.weights_sha256 if candidate.delta is not None else None,
        "tool_version": __version__,
    }


def row_tokens(comparison: Comparison | None) -> int:
    return comparison.tokens if comparison is not None else 0


def _refuse_repeats(refs: Sequence[str], what: str) -> None:
    """The same candidate or set given twice, however spelled (./d, d/, x/../d), or two sets whose
    files share a name (their rows, and a record, would be told apart by name only)."""
    seen: dict[object, str] = {}
    for ref in refs:
        path = input_path(ref)
        key = path if path is not None else ref
        if key in seen:
            raise PieceError(f"{what} '{ref}' is '{seen[key]}' again; give each once")
        seen[key] = ref
    if what != "candidate":
        names: dict[str, str] = {}
        for ref in refs:
            name = Path(ref).name if ref not in (SELF, GENERAL) else ref
            if name in names:
                raise PieceError(
                    f"--general sets '{names[name]}' and '{ref}' share the name '{name}', which "
                    "tells them apart in the output and records; rename one"
                )
            names[name] = ref


def check_recordable(candidates: Sequence[str]) -> None:
    """--record writes into the candidates that are local delta folders (a Hub repo is pushed, not
    edited here): there must be one."""
    local = [ref for ref in candidates if _local_delta(ref)]
    if not local:
        raise PieceError(
            "--record writes into local delta folders, and no candidate is one; leave out --record"
        )
    for ref in local:  # before any work: a record is written whole into every delta, or into none
        try:
            fd, probe = tempfile.mkstemp(dir=Path(ref).expanduser(), prefix=".piece-surgery-probe.")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise PieceError(
                f"--record cannot write into delta '{ref}' ({first_line(exc)}); make it writable, "
                "or leave out --record"
            ) from exc


def _local_delta(ref: str) -> bool:
    return DELTA in sniff(Path(ref).expanduser())


def evaluate_command_recipe(
    base_ref: str,
    candidates: Sequence[str],
    run: RunOptions | None = None,
    *,
    data: Path | None = None,
    general: Sequence[str | Path] = (SELF,),
    options: EvalOptions | None = None,
    record: bool = False,
    plot: Path | None = None,
    tasks: str | None = None,
    tasks_path: Path | None = None,
    overwrite: bool = False,
) -> Evaluated:
    """The `eval` command: evaluate_candidates, then (each checked before any work) --record into
    the deltas, --plot gain against drift, and lm-evaluation-harness --tasks on every candidate."""
    _refuse_repeats(candidates, "candidate")
    _refuse_repeats([str(g) for g in general], "--general set")
    if record:
        check_recordable(candidates)
    given_plot = plot
    if plot is not None:
        if data is None:
            raise PieceError("--plot draws gain on --data against drift: add --data, or leave out --plot")
        plot = check_plot(plot, overwrite, [base_ref, *candidates, data, *general])
    task_names = _check_tasks(tasks, tasks_path)
    evaluated = evaluate_candidates(
        base_ref,
        candidates,
        run,
        data=data,
        general=general,
        options=options,
        tasks=task_names,
        tasks_path=tasks_path,
    )
    if record:
        into = [c for c in evaluated.candidates if c.kind == "delta" and _local_delta(c.ref)]
        for candidate in into:  # each delta still the one measured, before any record is written
            check_measured(candidate.path, candidate.delta.weights_sha256)
        for candidate in into:
            record_evaluation(candidate.path, evaluation_record(evaluated, candidate))
            evaluated.recorded.append(candidate.ref)
    if plot is not None:
        draw(evaluated, plot)
        evaluated.plot = str(given_plot)  # as the user gave it
    return evaluated


def draw(evaluated: Evaluated, path: Path) -> None:
    """Gain on the domain against drift on the first general set, one point per candidate: the
    learning/forgetting picture docs/evidence.md draws."""
    rows = [c.to_json() for c in evaluated.candidates]
    figure, axes = pyplot().subplots(figsize=(6, 4.5))
    for row in rows:
        if row["gain"] is None or row["drift"] is None:
            continue
        axes.scatter(max(row["drift"], 1e-12), row["gain"])
        axes.annotate(
            Path(row["candidate"]).name or row["candidate"], (max(row["drift"], 1e-12), row["gain"])
        )
    axes.set_xscale("log")
    axes.set_xlabel(f"drift: mean token KL(base || candidate) on {evaluated.general[0].name}")
    axes.set_ylabel(
        f"gain: mean token loss on {evaluated.data.name if evaluated.data else '-'}, base - candidate"
    )
    axes.set_title(f"against {evaluated.base}")
    figure.tight_layout()
    save(figure, path)


def _check_tasks(tasks: str | None, tasks_path: Path | None) -> list[str]:
    """The lm-evaluation-harness tasks asked for, each known to it (checked before any work)."""
    if tasks is None:
        if tasks_path is not None:
            raise PieceError("--tasks-path does nothing without --tasks; leave it out")
        return []
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise PieceError("--tasks is empty: give task names, comma-separated")
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise PieceError("--tasks needs lm-evaluation-harness: pip install 'piece-surgery[lm-eval]'") from exc
    if tasks_path is not None and not Path(tasks_path).is_dir():
        raise PieceError(f"--tasks-path '{tasks_path}' is not a folder of task definitions")
    with library_logs_silenced():
        known = set(TaskManager(include_path=str(tasks_path) if tasks_path else None).all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise PieceError(
            f"lm-evaluation-harness knows no task '{quote(unknown[0], 60)}'; see `lm-eval ls tasks`"
        )
    return names


def _run_tasks(tasks, tasks_path, found, switcher, base, checkpoint, session, options) -> dict[str, dict]:
    """Each task on the base and every candidate (deltas switched in on the one base model), through
    lm-evaluation-harness's Python API: metric name -> value, per task."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_path) if tasks_path else None)
    tokenizer = checkpoint.load_tokenizer()

    def scores(model: torch.nn.Module) -> dict:
        with library_logs_silenced():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size)
            out = lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), task_manager=manager, verbosity="ERROR"
            )
        return {
            task: {k: v for k, v in metrics.items() if isinstance(v, int | float)}
            for task, metrics in out["results"].items()
        }

    results = {"base": scores(base.module)}
    for c in found:
        if c.kind == "checkpoint":
            results[c.ref] = scores(_load_candidate(c, checkpoint, session))
        else:
            with switcher.using(c.ref):
                results[c.ref] = scores(base.module)
    return results
