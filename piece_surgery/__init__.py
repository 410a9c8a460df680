"""piece-surgery: PIECE importance masks, sparse fine-tuning and exact sparse deltas."""

from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.version import __version__

# The public API: name -> the module that defines it (see docs/architecture.md).
_HOMES = {
    "ScoreOptions": "scoring.options",
    "score_checkpoint": "recipes.score",
    "score_model": "scoring.selection",
    "TrainConfig": "training.config",
    "train_sparse": "training.loop",
    "train_checkpoint": "recipes.train",
    "open_checkpoint": "models.checkpoint",
    "load_mask": "formats.mask",
    "save_mask": "integrations.saving",
    "diff": "merging.diff",
    "load_delta": "formats.delta_folder",
    "save_delta": "integrations.saving",
    "apply": "recipes.apply",
    "apply_recipe": "recipes.apply",
    "load_recipe": "formats.merge_recipe",
    "RunOptions": "runtime.options",
    "apply_to_model": "merging.live",
    "plan_apply": "merging.plan",
    "DeltaSwitcher": "merging.switcher",
    "open_artifact": "formats.artifacts",
    "open_delta": "formats.artifacts",
    "open_mask": "formats.artifacts",
    "push": "recipes.push",
    "EvalOptions": "evaluation.options",
    "evaluate_candidates": "recipes.evaluate",
    "score": "integrations.api",
    "sparsify": "integrations.api",
    "SparseModel": "integrations.sparse_model",
    "PieceCallback": "integrations.trainer",
}

__all__ = ["PieceError", "__version__", *_HOMES]


def __getattr__(name: str):
    # Imported on first use: `import piece_surgery` stays cheap, and the CLI loads what it needs.
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"piece_surgery.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'piece_surgery' has no attribute {name!r}")
