"""The `diff` recipe: check the output, diff two checkpoints, write the delta folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from piece_surgery.formats.delta import Delta
from piece_surgery.formats.delta_folder import DEFAULT_FORMAT, save_delta
from piece_surgery.io.outputs import check_output
from piece_surgery.io.sniff import DELTA
from piece_surgery.merging.diff import diff
from piece_surgery.runtime.errors import PieceError


@dataclass
class Diffed:
    """What `diff` wrote: the delta and the bytes of tensor data its folder holds."""

    delta: Delta
    tensor_bytes: int

    def to_json(self, *, base: str, tuned: str, output: Path, seconds: float) -> dict:
        """What `diff --json` prints (schema in docs/cli.md)."""
        delta = self.delta
        return {
            "output": str(output),
            "base": base,
            "tuned": tuned,
            "entries": delta.count,
            "tensors": len(delta.tensors),
            "tensor_bytes": self.tensor_bytes,
            "bytes_per_entry": self.tensor_bytes / max(delta.count, 1),
            "changed_fraction": delta.info.provenance.changed_fraction,
            "seconds": round(seconds, 3),
        }


def write_diff(
    base_ref: str,
    tuned_ref: str,
    output: Path,
    *,
    density: float | None = None,
    top_k: int | None = None,
    base_model: str | None = None,
    overwrite: bool = False,
    quiet: bool = True,
    delta_format: int = DEFAULT_FORMAT,
) -> Diffed:
    """The `diff` recipe: check the output, diff the two checkpoints, write the delta folder
    (in format `delta_format`: formats/delta_folder.FORMATS)."""
    output = check_output(output, overwrite=overwrite, inputs=(base_ref, tuned_ref), kind=DELTA)
    delta = diff(base_ref, tuned_ref, density=density, top_k=top_k, base_model=base_model, quiet=quiet)
    if delta.count == 0:
        raise PieceError("the two checkpoints are identical: there is no delta to write")
    return Diffed(delta, save_delta(delta, output, format_version=delta_format))
