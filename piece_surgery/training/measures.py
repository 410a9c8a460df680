"""What a sparse run measures every --eval-every steps and at its end: the loss on held-out data,
and the drift on general text against the base (the same model with the base's values)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from piece_surgery.data.examples import Dataset
from piece_surgery.evaluation.drift import compare, model_forward
from piece_surgery.evaluation.loss import evaluate
from piece_surgery.runtime.distributed import World
from piece_surgery.runtime.errors import PieceError
from piece_surgery.training.config import TrainConfig
from piece_surgery.training.sparse_grad import SparseParameters


@dataclass
class Measures:
    """What the loop measures every --eval-every steps and at the end: the loss on held-out data,
    and the drift on general text: mean token KL(base || the model now), the base being the same
    model with the base's values written back (only the masked entries differ). Every rank
    measures (the same values): a model FSDP shards runs on all ranks or none."""

    model: torch.nn.Module
    sparse: SparseParameters
    config: TrainConfig
    pad_id: int
    eval_dataset: Dataset | None
    general_dataset: Dataset | None
    world: World | None = None
    eval_loss: float | None = None
    drift: float | None = None

    def take(self, record: dict) -> None:
        self.sparse.write()
        if self.eval_dataset is not None:
            self.eval_loss = record["eval_loss"] = evaluate(
                self.model, self.eval_dataset, self.config.batch_size, self.pad_id
            )
        if self.general_dataset is not None:
            drift = self._drift()
            if self.world is not None:  # every rank stops (or not) on the same number: rank 0's
                drift = self.world.gather(drift)[0]
            self.drift = record["measured_drift"] = drift

    def restore(self, record: dict) -> None:
        """The figures a step measured, as its record kept them (a run rolled back to it)."""
        self.drift = record.get("measured_drift", self.drift)
        self.eval_loss = record.get("eval_loss", self.eval_loss)

    def finish(self, history: list[dict]) -> None:
        """The last step's figures: taken now, unless the loop (or the run a state was saved
        by) took them at that step."""
        wanted = self.eval_dataset is not None or self.general_dataset is not None
        last = history[-1] if history else {}
        if wanted and not ("eval_loss" in last or "measured_drift" in last):
            self.take(last)
        else:
            self.eval_loss = last.get("eval_loss", self.eval_loss)
            self.drift = last.get("measured_drift", self.drift)

    def _drift(self) -> float:

        forward = model_forward(self.model)
        was_training = self.model.training
        self.model.eval()

        def base(batch):
            with self.sparse.as_base():  # norm gains and shared weights take the values in forward
                return forward(batch)

        def tuned(batch):
            return forward(batch)

        try:
            device = next(self.model.parameters()).device
            with self.sparse.calls() as called:
                measured = compare(
                    self.general_dataset,
                    base,
                    {"tuned": tuned},
                    batch_size=self.config.batch_size,
                    pad_id=self.pad_id,
                    device=device,
                )
        finally:
            self.sparse.write()
            self.model.train(was_training)
        kl = measured["tuned"].kl
        if kl == 0.0 and self.sparse.changed_entries(called):
            # the base pass and the tuned pass gave the same logits on every token: a write into
            # the live model did not reach its forward, and the figure would be a silent 0
            raise PieceError(
                "the drift measured 0 exactly although trained entries differ from the base: the base "
                "values written into the model did not take effect in its forward (a replaced forward "
                "that caches its weights?); load the model without it (USE_HUB_KERNELS=NO)"
            )
        return kl
