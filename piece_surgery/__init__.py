"""piece-surgery: PIECE importance masks, sparse fine-tuning and exact sparse deltas."""

__version__ = "0.1.0"

from piece_surgery.errors import PieceError  # noqa: E402

__all__ = ["PieceError", "__version__"]
