"""piece-surgery: PIECE importance masks, sparse fine-tuning and exact sparse deltas."""

__version__ = "0.1.0"

from piece_surgery.errors import PieceError  # noqa: E402

__all__ = [
    "PieceError",
    "__version__",
    "apply",
    "apply_to_model",
    "diff",
    "load_delta",
    "load_mask",
    "push",
    "save_delta",
    "save_mask",
    "score_checkpoint",
    "train_checkpoint",
    "train_sparse",
]

_HOMES = {
    "apply": "delta",
    "apply_to_model": "delta",
    "diff": "delta",
    "load_delta": "delta",
    "save_delta": "delta",
    "load_mask": "mask",
    "save_mask": "mask",
    "push": "hub",
    "score_checkpoint": "score",
    "train_checkpoint": "train",
    "train_sparse": "train",
}


def __getattr__(name: str):
    # Imported on first use: `import piece_surgery` stays cheap, and the CLI loads what it needs.
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"piece_surgery.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'piece_surgery' has no attribute {name!r}")
