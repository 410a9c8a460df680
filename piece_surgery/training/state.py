"""A sparse run's resumable state: the trained values, AdamW's moments, the step, the RNG state and
the history, as safetensors + JSON, written atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from piece_surgery.io.outputs import atomic_path
from piece_surgery.models.layout import save_shard
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.json_files import file_sha256, read_json
from piece_surgery.training.sparse_grad import SparseParameters

STATE_FILE = "state.safetensors"
_KEY_NAMES = {
    "data": "data file",
    "config": "set of training options",
    "ranks": "number of processes (resume with the world size it was saved with)",
}
DESCRIPTION = "state.json"


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
    """Values, AdamW moments, step, RNG state: safetensors + JSON, written atomically, with the
    tensors' sha256. `resume_key` names what a resumed run must share with this one (model, data,
    mask, settings). `kept` is a drift budget's (step, values): the last step within it."""
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
    with atomic_path(Path(state_dir), is_dir=True) as tmp:
        save_shard(tensors, tmp / STATE_FILE, {"format": "piece-surgery/train-state"})
        description = {
            "step": step,
            "history": history,
            "resume_key": resume_key,
            "state_sha256": file_sha256(tmp / STATE_FILE),
            "kept_step": kept[0] if kept is not None else None,
        }
        (tmp / DESCRIPTION).write_text(json.dumps(description, default=str))


def load_state(
    state_dir: Path | None,
    sparse: SparseParameters,
    optimizer: torch.optim.Optimizer,
    resume_key: dict,
    rank: int = 0,
) -> tuple[int, list, tuple[int, dict[str, torch.Tensor]] | None]:
    """Put a saved state into the values and the optimizer; returns (step, history, and a drift
    budget's kept (step, values) or None)."""
    if state_dir is None or not (Path(state_dir) / DESCRIPTION).is_file():
        raise PieceError(f"--resume: no saved training state in '{state_dir}'; run with --save-every first")
    state_dir = Path(state_dir)
    description = _read_description(state_dir)
    saved = json.loads(json.dumps(description["resume_key"], default=str))
    wanted = json.loads(json.dumps(resume_key, default=str))
    for key in sorted(set(saved) | set(wanted)):
        if saved.get(key) != wanted.get(key):
            what = _KEY_NAMES.get(key, key)
            raise PieceError(
                f"--resume: the saved state was made with another {what}; start afresh without --resume"
            )
    if (
        not (state_dir / STATE_FILE).is_file()
        or file_sha256(state_dir / STATE_FILE) != description["state_sha256"]
    ):
        raise PieceError(
            f"--resume: '{state_dir / STATE_FILE}' does not match its recorded sha256 (changed or "
            "truncated); start afresh without --resume"
        )
    step = description["step"]
    try:
        with safe_open(str(state_dir / STATE_FILE), "pt") as f:
            saved_tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise PieceError(f"--resume: cannot read '{state_dir / STATE_FILE}' (corrupt)") from exc
    with torch.no_grad():
        for name, value in sparse.values.items():
            parts = {k: saved_tensors.get(f"{name}::{k}") for k in ("values", "exp_avg", "exp_avg_sq")}
            if any(t is None or t.shape != value.shape or t.dtype != value.dtype for t in parts.values()):
                raise PieceError(f"--resume: the saved state does not hold '{name}' as this run trains it")
            value.copy_(parts["values"])
            moments = {k: parts[k].to(value.device) for k in ("exp_avg", "exp_avg_sq")}
            optimizer.state[value] = {"step": torch.tensor(float(step)), **moments}
    rng = saved_tensors.get(f"rng::torch::rank{rank}" if rank else "rng::torch")
    if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        raise PieceError("--resume: the saved state has no valid random-number state; start afresh")
    torch.set_rng_state(rng)
    kept = None
    kept_step = description.get("kept_step")
    if isinstance(kept_step, int) and not isinstance(kept_step, bool):
        values = {name: saved_tensors.get(f"{name}::kept") for name in sparse.values}
        if any(v is None or v.shape != sparse.values[n].shape for n, v in values.items()):
            raise PieceError("--resume: the saved state's kept values do not match this run; start afresh")
        kept = (kept_step, values)
    return step, list(description["history"]), kept


def _read_description(state_dir: Path) -> dict:
    description = read_json(state_dir / DESCRIPTION, f"--resume: '{state_dir / DESCRIPTION}'")
    well_formed = (
        isinstance(description, dict)
        and isinstance(description.get("step"), int)
        and description["step"] >= 0
        and isinstance(description.get("history"), list)
        and isinstance(description.get("resume_key"), dict)
        and isinstance(description.get("state_sha256"), str)
    )
    if not well_formed:
        raise PieceError(
            f"--resume: '{state_dir / DESCRIPTION}' is not a training state this version wrote; "
            "start afresh without --resume"
        )
    return description


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
