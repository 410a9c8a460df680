"""Hugging Face Trainer (and TRL's trainers, which are Trainers) with a sparsified model: a
callback that saves the delta at every checkpoint and at the end, applies the retain penalty of a
piece-r mask, logs its predicted drift, and checks that the optimizer trains the values alone.

    sparse = piece_surgery.sparsify(model, mask)
    trainer = SFTTrainer(model=model, args=..., train_dataset=..., callbacks=[PieceCallback(sparse)])
    trainer.train()                                   # deltas in output_dir/checkpoint-N/piece-delta

Trainer's own checkpoints resume the run: their weights hold the trained values, their optimizer.pt
the values' AdamW state (O(k)), and `piece-values.safetensors` the fp32 values themselves (the
weights hold them rounded to their dtype). A resume with another mask over the same tensors is one
line; one over other tensors fails in Trainer's loading of the optimizer state, before any callback
runs (torch's ValueError on the parameter groups' sizes). What stays with
the CLI: --drift-budget (it measures and rolls back), the probe before the first step, and the order
of penalty and clipping (Trainer clips the gradient before any callback runs, so here the penalty's
gradient is added after clipping).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from piece_surgery.formats.delta_folder import FORMATS
from piece_surgery.integrations.sparse_model import HOLDER, SparseModel
from piece_surgery.integrations.state import VALUES_FILE, load_values, save_values
from piece_surgery.io.outputs import check_output, output_path, overlaps, refuse_overlap
from piece_surgery.io.sniff import DELTA
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.options import check_weight
from piece_surgery.training.config import DEFAULT_RETAIN_WEIGHT

DELTA_FOLDER = "piece-delta"  # in output_dir and in each checkpoint-N folder


class PieceCallback(TrainerCallback):
    """Saves `sparse`'s delta into every Trainer checkpoint (`checkpoint-N/piece-delta`) and, at the
    end, into `output_dir` (default: the Trainer's output_dir/piece-delta); applies the retain
    penalty retain_weight/2 sum F d^2 of a piece-r mask (`retain_weight` None: 100 with a mask that
    carries the Fisher, else 0, as `train`); adds `predicted_drift` to the logs. `format_version`:
    the delta format written.

    The final output is checked when the callback is made and again when training begins, before
    any step: PieceError if it overlaps the base checkpoint, is or holds the Trainer's output_dir,
    or is an existing folder that is not a delta (a delta there, from an earlier run, is replaced)."""

    def __init__(
        self,
        sparse: SparseModel,
        *,
        output_dir: str | Path | None = None,
        every_checkpoint: bool = True,
        retain_weight: float | None = None,
        format_version: int = 1,
    ):
        if not isinstance(sparse, SparseModel):
            raise PieceError(
                f"PieceCallback takes the SparseModel that sparsify(model, mask) returns, got "
                f"{type(sparse).__name__}"
            )
        if output_dir is not None and not isinstance(output_dir, str | Path):
            raise PieceError(f"output_dir must be a path (str or Path), got {type(output_dir).__name__}")
        self.sparse = sparse
        self.output_dir = output_dir
        self.every_checkpoint = every_checkpoint
        carries = sparse.mask.fisher is not None
        if retain_weight is not None:
            retain_weight = check_weight(retain_weight, "retain_weight")
        self.retain_weight = (
            (DEFAULT_RETAIN_WEIGHT if carries else 0.0) if retain_weight is None else retain_weight
        )
        if self.retain_weight and not carries:
            raise PieceError("retain_weight needs a mask that carries the retain Fisher (piece-r)")
        if format_version not in FORMATS:
            raise PieceError(
                f"unknown delta format {format_version!r}; this version writes {sorted(FORMATS)}"
            )
        self.format_version = format_version
        self.saved: list[Path] = []  # the delta folders written, in order
        if output_dir is not None:
            self._check_output(Path(output_dir), None)

    def _final_output(self, args) -> Path:
        return Path(self.output_dir if self.output_dir is not None else Path(args.output_dir) / DELTA_FOLDER)

    def _check_output(self, folder: Path, trainer_output: str | None) -> None:
        """The final delta's folder may be replaced at the end (save_delta's rules: not the base, not
        a folder that holds anything but a delta), and is not the Trainer's own output folder (its
        checkpoints) or one around it; checked before training, so nothing trains for a refusal."""
        base = self.sparse.checkpoint
        inputs = [base.folder] if base is not None else []
        if trainer_output is not None and overlaps(
            output_path(folder), output_path(trainer_output), inside_ok=True
        ):
            raise PieceError(
                f"PieceCallback's output_dir '{folder}' is or holds the Trainer's output_dir "
                f"'{trainer_output}' (its checkpoints): name a folder of its own, e.g. "
                f"{Path(trainer_output) / DELTA_FOLDER}"
            )
        if output_path(folder).parent.is_dir():
            check_output(folder, overwrite=True, inputs=inputs, kind=DELTA, flag="PieceCallback")
        else:  # nothing there yet (the Trainer makes its output_dir when it first saves)
            refuse_overlap(folder, inputs)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Refuse, before the first step, a final output that save_delta would refuse or that would
        replace the Trainer's output folder, and a run whose trainable parameters are not the values
        (another adapter, or a model that was not sparsified): it would train and save what the
        delta does not hold."""
        if not self.sparse.attached:
            raise PieceError("the model was unsparsified before training: sparsify it again")
        self._check_output(self._final_output(args), args.output_dir)
        if state.global_step > 0:  # resumed from a checkpoint: Trainer loaded its weights and optimizer
            self._resume(Path(args.output_dir) / f"checkpoint-{state.global_step}", kwargs.get("optimizer"))
        if model is None:
            return
        inner = getattr(model, "module", model)  # under DDP, the model it wraps
        others = [
            n for n, p in inner.named_parameters() if p.requires_grad and not n.startswith(f"{HOLDER}.")
        ]
        if others:
            raise PieceError(
                f"'{others[0]}' is trainable besides the sparse values: sparsify the model and train "
                "nothing else"
            )

    def _resume(self, checkpoint: Path, optimizer) -> None:
        """The optimizer's state is the values' (one line if another mask's values saved it, not
        torch's shape error at the first step), and the values are the checkpoint's fp32 ones where
        the Trainer's output_dir holds it (else the loaded weights', rounded to their dtype)."""
        state = getattr(optimizer, "state", {})
        for value in self.sparse.values.values():
            saved = [t for t in state.get(value, {}).values() if isinstance(t, torch.Tensor) and t.dim()]
            if any(t.shape != value.shape for t in saved):
                raise PieceError(
                    "the checkpoint was trained with another mask than this model's: sparsify with the "
                    "mask the run was started with (or start a new run)"
                )
        if (checkpoint / VALUES_FILE).is_file():
            load_values(self.sparse.sparse, self.sparse.mask.digest(), checkpoint / VALUES_FILE)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step == 0:  # the first step's gradients reached every value, or one line why not
            missing = [n for n, v in self.sparse.values.items() if v.grad is None]
            if missing:
                raise PieceError(
                    f"masked tensor '{missing[0]}' got no gradient in the first step: its module never ran "
                    "in the trainer's forward (a fused kernel or a patched forward that reads the weight "
                    "directly?), or the data does not use it; leave it out of the mask"
                )
        if self.retain_weight:
            self.sparse.add_retain_penalty(self.retain_weight)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.sparse.write()  # the weights hold the values (what Trainer saves as the model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        drift = self.sparse.predicted_drift()
        if logs is not None and drift is not None:
            logs["predicted_drift"] = drift

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():  # the fp32 values, for a resume
            save_values(self.sparse.sparse, self.sparse.mask.digest(), checkpoint)
        if self.every_checkpoint:
            self._save(checkpoint / DELTA_FOLDER, args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._save(self._final_output(args), args, state)

    def _save(self, folder: Path, args, state) -> None:
        if not state.is_world_process_zero:
            return
        self.sparse.save_delta(
            folder, provenance=provenance(args, state), format_version=self.format_version, overwrite=True
        )
        self.saved.append(folder)


def provenance(args, state) -> dict[str, Any]:
    """What a delta records of a Trainer run: its hyperparameters (named as `train` names them),
    steps and last logged losses."""
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in state.log_history if "eval_loss" in h]
    return {
        "hyperparameters": {
            "lr": args.learning_rate,
            "epochs": args.num_train_epochs,
            "max_steps": args.max_steps if args.max_steps and args.max_steps > 0 else None,
            "batch_size": args.per_device_train_batch_size,
            "grad_accum": args.gradient_accumulation_steps,
            "schedule": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "warmup_steps": args.warmup_steps,
            "weight_decay": args.weight_decay,
            "betas": [args.adam_beta1, args.adam_beta2],
            "clip": args.max_grad_norm,
            "seed": args.seed,
            "ranks": args.world_size,
            "trainer": "transformers.Trainer",
        },
        "steps": state.global_step,
        "final_train_loss": losses[-1] if losses else None,
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
    }
