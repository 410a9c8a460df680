"""piece-surgery: PIECE importance masks, sparse fine-tuning and exact sparse deltas."""

__version__ = "0.1.0"

from piece_surgery.errors import PieceError  # noqa: E402

# The public API: name -> the module that defines it (see docs/architecture.md).
_HOMES = {
    "ScoreOptions": "options",
    "score_checkpoint": "score",
    "score_model": "score",
    "TrainConfig": "options",
    "train_sparse": "trainer",
    "train_checkpoint": "train",
    "open_checkpoint": "checkpoint",
    "load_mask": "mask",
    "save_mask": "mask",
    "diff": "delta",
    "load_delta": "delta",
    "save_delta": "delta",
    "apply": "merge",
    "apply_recipe": "merge",
    "load_recipe": "recipe",
    "RunOptions": "options",
    "apply_to_model": "merge",
    "plan_apply": "merge",
    "DeltaSwitcher": "switcher",
    "open_artifact": "artifacts",
    "open_delta": "artifacts",
    "open_mask": "artifacts",
    "push": "artifacts",
    "EvalOptions": "options",
    "evaluate_candidates": "evaluate",
}

__all__ = ["PieceError", "__version__", *_HOMES]


def __getattr__(name: str):
    # Imported on first use: `import piece_surgery` stays cheap, and the CLI loads what it needs.
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"piece_surgery.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'piece_surgery' has no attribute {name!r}")
