"""Hot-swapping deltas on a live model: one base in memory, several deltas resident, and a switch
that changes only their entries, exactly (the base's bits come back when no delta is active).

    switcher = DeltaSwitcher(model)                  # a loaded transformers model, at its base weights
    switcher.add("legal", open_delta("user/delta-legal"))
    switcher.add("code", open_delta("deltas/code"), scale=0.5)
    switcher.activate("code")                        # the model now holds base + 0.5 x code
    with switcher.using("legal"):                    # ... base + legal inside, back to code after
        ...
    switcher.activate(None)                          # the base, bit for bit
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from piece_surgery.formats.delta import Delta
from piece_surgery.merging.combine import TensorPart, merge_one
from piece_surgery.merging.live import check_shape, live_delta, model_tensors, write_entries
from piece_surgery.runtime.errors import PieceError


@dataclass
class _Resident:
    """One delta's entries on the model's device: where, the values to write, the base's values."""

    names: list[str]  # the parameters' names in the model
    params: list[torch.nn.Parameter]
    indices: list[torch.Tensor]  # int32 where the tensor allows: half the memory of int64
    new: list[torch.Tensor]
    base: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        tensors = [*self.indices, *self.new, *self.base]
        return sum(t.numel() * t.element_size() for t in tensors)


class DeltaSwitcher:
    """Several deltas resident beside one model; activate() makes the model hold one of them (or
    none: the base). A switch writes the previous delta's base values back and the next delta's
    values in: O(entries), no other weight is touched."""

    def __init__(self, model: torch.nn.Module):
        if not isinstance(model, torch.nn.Module):
            raise PieceError(
                f"DeltaSwitcher takes a loaded model (a torch.nn.Module), got {type(model).__name__}"
            )
        self.model = model
        self.active: str | None = None
        self._resident: dict[str, _Resident] = {}

    def add(self, name: str, delta: Delta | str | Path, *, scale: float = 1.0) -> None:
        """Check the delta (a Delta, or a delta folder's path or Hub repo id) against the model's
        base weights (activate(None) first if another delta is active) and keep its entries on the
        model's device. PieceError for a name in use, or a delta or scale it cannot take."""
        if not isinstance(name, str):
            raise PieceError(f"a resident delta's name is a string, got {type(name).__name__}")
        delta = live_delta(self.model, delta, scale)
        if name in self._resident:
            raise PieceError(f"a delta named '{name}' is already resident; remove it first")
        if self.active is not None:
            raise PieceError(f"'{self.active}' is active: add deltas while the model holds its base")
        resident = _Resident([], [], [], [], [])
        with torch.no_grad():
            for tensor_name, where in model_tensors(self.model, delta).items():
                t = delta.tensors[tensor_name]
                check_shape(tensor_name, where, t.shape)
                param = where.param
                idx = where.positions(t.indices)
                current = param.view(-1)[idx].detach().clone()
                part = TensorPart(t, scale, f"delta '{name}'", target="this model", force_hint="")
                _, new, _ = merge_one(tensor_name, current.cpu(), part, force=False)
                small = param.numel() < 2**31
                resident.names.append(where.pname)
                resident.params.append(param)
                resident.indices.append(idx.to(torch.int32) if small else idx)
                resident.new.append(new.to(param.device))
                resident.base.append(current)
        self._resident[name] = resident

    def remove(self, name: str) -> None:
        self._known(name)
        if self.active == name:
            self.activate(None)
        del self._resident[name]

    def activate(self, name: str | None) -> None:
        """Make the model hold delta `name` (None: the base). Exact both ways."""
        if name is not None:
            self._known(name)
        if name == self.active:
            return
        if self.active is not None:
            self._write(self._resident[self.active], "base")
            self.active = None
        if name is not None:
            self._write(self._resident[name], "new")
        self.active = name

    def _known(self, name: str) -> None:
        if not isinstance(name, str) or name not in self._resident:
            raise PieceError(f"no resident delta named {name!r}; add it first")

    def _write(self, resident: _Resident, which: str) -> None:
        """Write the resident entries (checked: write_entries)."""
        values = getattr(resident, which)
        writes = list(zip(resident.names, resident.params, resident.indices, values, strict=True))
        write_entries(self.model, writes)

    @contextmanager
    def using(self, name: str | None) -> Iterator[None]:
        """Delta `name` inside the block, whatever was active before after it."""
        previous = self.active
        self.activate(name)
        try:
            yield
        finally:
            self.activate(previous)

    @property
    def names(self) -> list[str]:
        return list(self._resident)

    def resident_bytes(self, name: str) -> int:
        """Device memory a resident delta takes (indices, its values and the base's)."""
        self._known(name)
        return self._resident[name].nbytes
