"""Delta format version 1 (docs/formats.md, "Delta folder"): per tensor, its sorted flat indices,
and the base and tuned values there as raw bit patterns. 8 bytes per entry for bf16 and fp16.

A format version module says which arrays a tensor has in delta.safetensors (`arrays`), writes
them (`encode`, with what delta.json records per tensor besides shape, dtype and count;
`base_sha256()` computes the base values' digest where the version records it) and reads
them back (`decode`: indices, base values or None, tuned values, the base's digest or None);
formats/delta_folder.py keeps the table of versions and makes the TensorDelta.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from piece_surgery.runtime.dtypes import as_bits, bits_dtype, float_dtype, index_dtype, numel
from piece_surgery.runtime.errors import PieceError

VERSION = 1
TENSOR_SCHEMA = "tensor_v1"  # its per-tensor entry of delta.json, in schemas/delta.json

Decoded = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, str | None]


def arrays(name: str) -> list[str]:
    return [f"{name}::indices", f"{name}::tuned", f"{name}::base"]


def encode(
    name: str,
    indices: torch.Tensor,
    base: torch.Tensor | None,
    tuned: torch.Tensor,
    shape: tuple[int, ...],
    base_sha256: Callable[[], str],
) -> tuple[dict[str, torch.Tensor], dict]:
    if base is None:
        raise PieceError(f"tensor '{name}' comes from a compact delta: format 1 needs its base values")
    return {
        f"{name}::indices": indices.to(index_dtype(numel(shape))),
        f"{name}::base": as_bits(base),
        f"{name}::tuned": as_bits(tuned),
    }, {}


def decode(name: str, meta: dict, stored: list[torch.Tensor], where: str) -> Decoded:
    """The tensor's entries from its arrays (in `arrays` order), checked: dtypes and lengths
    (the indices and finiteness are checked by the folder reader)."""
    idx, tuned, base = stored
    dtype = float_dtype(meta["dtype"])
    bits = bits_dtype(dtype.itemsize)
    if idx.dtype not in (torch.int32, torch.int64) or base.dtype != bits or tuned.dtype != bits:
        raise PieceError(f"{where}: tensor '{name}' has inconsistent dtypes")
    one_dimensional = idx.dim() == base.dim() == tuned.dim() == 1
    if not one_dimensional or not (base.numel() == idx.numel() == tuned.numel()):
        raise PieceError(f"{where}: tensor '{name}' has arrays of different lengths")
    return idx.to(torch.int64), base.view(dtype), tuned.view(dtype), None
