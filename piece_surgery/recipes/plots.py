"""Figures the commands draw (`eval --plot`, `inspect --plot`): the output checked before any
work, matplotlib (the `plot` extra) asked for in one line where it is missing, the image written
atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from piece_surgery.data.files import referenced_images
from piece_surgery.io.outputs import atomic_path, check_output
from piece_surgery.runtime.errors import PieceError


def check_plot(plot: Path, overwrite: bool, inputs: Sequence) -> Path:
    """The path to write a --plot image at: a .png outside the inputs, matplotlib installed."""
    if Path(plot).suffix.lower() != ".png":
        raise PieceError(f"--plot writes a .png image: name it e.g. '{Path(plot).stem}.png'")
    target = check_output(plot, overwrite=overwrite, inputs=inputs, kind="file", reads=referenced_images)
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise PieceError("--plot needs matplotlib: pip install 'piece-surgery[plot]'") from exc
    return target


def pyplot():
    """matplotlib's pyplot, drawing off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figure, path: Path) -> None:
    """Write `figure` as a PNG at `path` (atomically) and close it."""
    with atomic_path(path, is_dir=False) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    pyplot().close(figure)
