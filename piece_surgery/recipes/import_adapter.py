"""The `import` recipe: a PEFT adapter that merges into its base (SHiRA, LoRA, ...) as a delta, by
comparing the merged weights with the base's files entry by entry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from piece_surgery.formats.delta import Delta
from piece_surgery.formats.delta_folder import DEFAULT_FORMAT, save_delta
from piece_surgery.io.outputs import check_output
from piece_surgery.io.sniff import DELTA
from piece_surgery.merging.adapters import adapter_as_delta
from piece_surgery.recipes.run import load_base
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.options import RunOptions


@dataclass(frozen=True)
class Imported:
    """What `import` wrote: the delta, and the bytes of tensor data its folder holds."""

    delta: Delta
    tensor_bytes: int

    def to_json(self, *, adapter: str, output: Path, seconds: float) -> dict:
        """What `import --json` prints (schema in docs/cli.md)."""
        return {
            "output": str(output),
            "adapter": adapter,
            "entries": self.delta.count,
            "tensors": len(self.delta.tensors),
            "seconds": round(seconds, 3),
        }


def import_peft(
    adapter_ref: str,
    output: Path,
    *,
    base_ref: str | None = None,
    overwrite: bool = False,
    delta_format: int = DEFAULT_FORMAT,
    run: RunOptions | None = None,
) -> Imported:
    """A delta from a PEFT adapter: its weights merged into the base, compared entry by entry with
    the base's files (adapter_as_delta), written to `output`."""
    output = check_output(output, overwrite=overwrite, inputs=(adapter_ref, base_ref), kind=DELTA)
    delta = adapter_as_delta(
        adapter_ref, base_ref=base_ref, load_base=lambda ref: load_base(ref, run), output=output
    )
    if delta.count == 0:
        raise PieceError("the adapter changes nothing in the base: there is no delta to write")
    return Imported(delta, save_delta(delta, output, format_version=delta_format))
