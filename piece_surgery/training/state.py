"""A sparse run's resumable state: the trained values, AdamW's moments, the step, the RNG state and
the history, as safetensors + JSON, written atomically."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from piece_surgery.io.outputs import atomic_path
from piece_surgery.models.layout import save_shard
from piece_surgery.runtime import leftovers
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.json_files import file_sha256, read_json
from piece_surgery.runtime.paths import is_present
from piece_surgery.training.sparse_grad import SparseParameters

STATE_FILE = "state.safetensors"
STATE_FORMAT = "piece-surgery/train-state"
DESCRIPTION = "state.json"
DESCRIPTION_KEY = "description"  # the description, inside the state file's header
_KEY_NAMES = {
    "data": "data file",
    "config": "set of training options",
    "ranks": "number of processes (resume with the world size it was saved with)",
    "max_length": "--max-length",
    "max_samples": "--max-samples",
    "dtype": "--dtype",
    "eval_data": "--eval-data",
    "eval_general": "--eval-general",
}
_OPTION_KEYS = ("max_length", "max_samples", "dtype")


def save_state(
    state_dir: Path,
    sparse: SparseParameters,
    optimizer: torch.optim.Optimizer,
    step: int,
    history: list,
    resume_key: dict,
    rng_states: list[torch.Tensor] | None = None,
    kept: tuple[int, dict[str, torch.Tensor]] | None = None,
) -> None:
    """Values, AdamW moments, step, RNG state: safetensors + JSON, written atomically. The
    description (step, history, resume key, kept step) travels inside the safetensors file, whose
    sha256 state.json records, so every part of the state is covered by the digest; state.json
    repeats it for people to read. `resume_key` names what a resumed run must share with this one
    (model, data, mask, settings). `kept` is a drift budget's (step, values): the last step within
    it. PieceError, before anything is written, if `state_dir` holds anything but a state."""
    state_dir = Path(state_dir)
    if is_present(state_dir) and not (is_state(state_dir) or _is_empty_folder(state_dir)):
        raise PieceError(
            f"'{state_dir}', where the resumable state is saved, holds something else; move it away "
            "or choose another output"
        )
    tensors = {}
    if kept is not None:
        for name, value in kept[1].items():
            tensors[f"{name}::kept"] = value.detach().cpu()
    for name, value in sparse.values.items():
        tensors[f"{name}::values"] = value.detach().cpu()
        moments = optimizer.state.get(value, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in moments:
                tensors[f"{name}::{key}"] = moments[key].cpu()
    rng_states = rng_states or [torch.get_rng_state()]
    tensors["rng::torch"] = rng_states[0]
    for rank, rng in enumerate(rng_states[1:], 1):  # each rank's own random state (dropout)
        tensors[f"rng::torch::rank{rank}"] = rng
    description = {
        "step": step,
        "history": history,
        "resume_key": resume_key,
        "kept_step": kept[0] if kept is not None else None,
    }
    text = json.dumps(description, default=str)
    with atomic_path(state_dir, is_dir=True) as tmp:
        save_shard(tensors, tmp / STATE_FILE, {"format": STATE_FORMAT, DESCRIPTION_KEY: text})
        readable = {**json.loads(text), "state_sha256": file_sha256(tmp / STATE_FILE)}
        (tmp / DESCRIPTION).write_text(json.dumps(readable))
    leftovers.note(state_dir, f"a resumable state (step {step}) is in '{state_dir}' (--resume continues it)")


def load_state(
    state_dir: Path | None,
    sparse: SparseParameters,
    optimizer: torch.optim.Optimizer,
    resume_key: dict,
    rank: int = 0,
) -> tuple[int, list, tuple[int, dict[str, torch.Tensor]] | None]:
    """Put a saved state into the values and the optimizer; returns (step, history, and a drift
    budget's kept (step, values) or None). PieceError, in one line, for a state that is missing,
    changed since it was saved (any part of it: the digest covers the description too), not one
    this version wrote, or made with another resume key."""
    if state_dir is None or not (Path(state_dir) / DESCRIPTION).is_file():
        raise PieceError(f"--resume: no saved training state in '{state_dir}'; run with --save-every first")
    state_dir = Path(state_dir)
    description, saved_tensors = _read_state(state_dir)
    _check_resume_key(description["resume_key"], resume_key)
    step = description["step"]
    with torch.no_grad():
        for name, value in sparse.values.items():
            parts = {k: saved_tensors.get(f"{name}::{k}") for k in ("values", "exp_avg", "exp_avg_sq")}
            if any(t is None or t.shape != value.shape or t.dtype != value.dtype for t in parts.values()):
                raise PieceError(f"--resume: the saved state does not hold '{name}' as this run trains it")
            value.copy_(parts["values"])
            moments = {k: parts[k].to(value.device) for k in ("exp_avg", "exp_avg_sq")}
            optimizer.state[value] = {"step": torch.tensor(float(step)), **moments}
    _restore_rng(saved_tensors.get(f"rng::torch::rank{rank}" if rank else "rng::torch"))
    kept = None
    if description["kept_step"] is not None:
        values = {name: saved_tensors.get(f"{name}::kept") for name in sparse.values}
        if any(v is None or v.shape != sparse.values[n].shape for n, v in values.items()):
            raise PieceError("--resume: the saved state's kept values do not match this run; start afresh")
        kept = (description["kept_step"], values)
    return step, list(description["history"]), kept


def _read_state(state_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The description and tensors of a saved state, checked whole against the recorded digest."""
    state_file = state_dir / STATE_FILE
    readable = read_json(state_dir / DESCRIPTION, f"--resume: '{state_dir / DESCRIPTION}'")
    if not isinstance(readable, dict) or not isinstance(readable.get("state_sha256"), str):
        raise PieceError(f"--resume: '{state_dir / DESCRIPTION}' {_NOT_OURS}")
    if not state_file.is_file() or file_sha256(state_file) != readable["state_sha256"]:
        raise PieceError(
            f"--resume: '{state_file}' does not match its recorded sha256 (changed or truncated); "
            "start afresh without --resume"
        )
    try:
        with safe_open(str(state_file), "pt") as f:
            text = (f.metadata() or {}).get(DESCRIPTION_KEY)
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise PieceError(f"--resume: cannot read '{state_file}' (corrupt)") from exc
    try:
        description = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        description = None
    if not _well_formed(description):
        raise PieceError(f"--resume: '{state_file}' {_NOT_OURS}")
    if {k: v for k, v in readable.items() if k != "state_sha256"} != description:
        raise PieceError(
            f"--resume: '{state_dir / DESCRIPTION}' does not match the state it describes (edited?); "
            "start afresh without --resume"
        )
    return description, tensors


_DESCRIBED = {"step", "history", "resume_key", "kept_step"}
_NOT_OURS = "is not a training state this version wrote; start afresh without --resume"
_RECORD_NUMBERS = {"loss", "lr", "grad_norm", "predicted_drift", "eval_loss", "measured_drift"}


def _well_formed(description) -> bool:
    """A description as save_state writes it: a step, one record per step up to it (each with
    finite numbers), a resume key, and a kept step among the records (or none)."""
    if not isinstance(description, dict) or set(description) != _DESCRIBED:
        return False
    step, history, kept = description["step"], description["history"], description["kept_step"]
    if not _whole(step) or not isinstance(history, list) or not isinstance(description["resume_key"], dict):
        return False
    if [r.get("step") if isinstance(r, dict) else None for r in history] != list(range(1, step + 1)):
        return False
    for record in history:
        if not {"loss", "lr", "grad_norm"} <= record.keys() <= {"step", *_RECORD_NUMBERS}:
            return False
        if not all(_number(record[k]) for k in record.keys() & _RECORD_NUMBERS):
            return False
        if not (math.isfinite(record["loss"]) and math.isfinite(record["lr"])):  # a gradient norm may be inf
            return False
    return kept is None or (_whole(kept) and 1 <= kept <= step)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_resume_key(saved: dict, wanted: dict) -> None:
    """The resumed run must share every part of the key with the run that saved the state; a
    training option or run option that differs is named with both values."""
    wanted = json.loads(json.dumps(wanted, default=str))
    for key in sorted(set(saved) | set(wanted)):
        if saved.get(key) == wanted.get(key):
            continue
        if key == "config" and isinstance(saved.get(key), dict) and isinstance(wanted.get(key), dict):
            raise PieceError(
                f"--resume: the saved state was made with other training options "
                f"({_changed_options(saved[key], wanted[key])}); give the saved values, "
                "or start afresh without --resume"
            )
        what = _KEY_NAMES.get(key, key)
        shown = f" ({saved.get(key)} saved, {wanted.get(key)} now)" if key in _OPTION_KEYS else ""
        raise PieceError(
            f"--resume: the saved state was made with another {what}{shown}; start afresh without --resume"
        )


def _changed_options(saved: dict, wanted: dict) -> str:
    """'--lr: 0.001 saved, 0.005 now; ...': each training option (TrainConfig field, as its flag)
    whose value differs between the saved key and this run's."""
    changed = [k for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
    return "; ".join(
        f"--{k.replace('_', '-')}: {_shown(saved.get(k))} saved, {_shown(wanted.get(k))} now" for k in changed
    )


def _shown(value) -> str:
    """An option's value as it is typed (betas as 0.9,0.95; None as 'none')."""
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def _restore_rng(rng: torch.Tensor | None) -> None:
    if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        raise PieceError("--resume: the saved state has no valid random-number state; start afresh")
    try:
        torch.set_rng_state(rng)
    except RuntimeError as exc:  # a state the generator refuses (all zeros, say)
        raise PieceError("--resume: the saved state has no valid random-number state; start afresh") from exc


def _is_empty_folder(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir())


def is_state(folder: Path) -> bool:
    """A folder save_state wrote: its description and state file, and nothing but them."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    names = {p.name for p in folder.iterdir()}
    return DESCRIPTION in names and names <= {DESCRIPTION, STATE_FILE}


def remove_state(state_dir: Path) -> None:
    if is_state(state_dir):
        shutil.rmtree(state_dir, ignore_errors=True)
        leftovers.forget(state_dir)
