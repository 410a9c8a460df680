"""A sparse run's resumable state: the trained values, AdamW's moments, the step, the RNG state and
the history, as safetensors + JSON, written atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from piece_surgery.atomic import atomic_path
from piece_surgery.checkpoint import save_shard
from piece_surgery.errors import PieceError
from piece_surgery.sparse_grad import SparseParameters


def save_state(
    state_dir: Path,
    sparse: SparseParameters,
    optimizer: torch.optim.Optimizer,
    step: int,
    history: list,
    resume_key: dict,
) -> None:
    """Values, AdamW moments, step, RNG state: safetensors + JSON, written atomically. `resume_key`
    names what a resumed run must share with this one (model, data, mask, settings)."""
    tensors = {}
    for name, value in sparse.values.items():
        tensors[f"{name}::values"] = value.detach().cpu()
        moments = optimizer.state.get(value, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in moments:
                tensors[f"{name}::{key}"] = moments[key].cpu()
    tensors["rng::torch"] = torch.get_rng_state()
    description = {"step": step, "history": history, "resume_key": resume_key}
    with atomic_path(Path(state_dir), is_dir=True) as tmp:
        save_shard(tensors, tmp / "state.safetensors", {"format": "piece-surgery/train-state"})
        (tmp / "state.json").write_text(json.dumps(description, default=str))


def load_state(
    state_dir: Path | None, sparse: SparseParameters, optimizer: torch.optim.Optimizer, resume_key: dict
) -> tuple[int, list]:
    """Put a saved state into the values and the optimizer; returns (step, history)."""
    if state_dir is None or not (Path(state_dir) / "state.json").is_file():
        raise PieceError(f"--resume: no saved training state in '{state_dir}'; run with --save-every first")
    state_dir = Path(state_dir)
    try:
        description = json.loads((state_dir / "state.json").read_text())
    except ValueError as exc:
        raise PieceError(f"--resume: '{state_dir}/state.json' is not valid JSON") from exc
    saved = json.loads(json.dumps(description.get("resume_key") or {}, default=str))
    wanted = json.loads(json.dumps(resume_key, default=str))
    for key in sorted(set(saved) | set(wanted)):
        if saved.get(key) != wanted.get(key):
            raise PieceError(
                f"--resume: the saved state was made with another {key}; start afresh without --resume"
            )
    step = int(description["step"])
    try:
        with safe_open(str(state_dir / "state.safetensors"), "pt") as f:
            for name, value in sparse.values.items():
                with torch.no_grad():
                    value.copy_(f.get_tensor(f"{name}::values"))
                moments = {
                    k: f.get_tensor(f"{name}::{k}").to(value.device) for k in ("exp_avg", "exp_avg_sq")
                }
                optimizer.state[value] = {"step": torch.tensor(float(step)), **moments}
            torch.set_rng_state(f.get_tensor("rng::torch"))
    except (SafetensorError, OSError) as exc:
        raise PieceError(f"--resume: cannot read '{state_dir}/state.safetensors' (corrupt)") from exc
    return step, list(description.get("history", []))


def remove_state(state_dir: Path) -> None:
    shutil.rmtree(state_dir, ignore_errors=True)
