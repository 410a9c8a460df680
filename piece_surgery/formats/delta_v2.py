"""Delta format version 2, compact (docs/formats.md, "Compact delta"): per tensor, its sorted flat
indices as gaps in a fixed width or as varints, and the tuned values; delta.json records the
sha256 of the base values in their place. About 3.5 bytes per entry for a bf16 0.1% delta.
(The protocol of a version module: formats/delta_v1.py.)"""

from __future__ import annotations

from collections.abc import Callable

import torch

from piece_surgery.formats.codec import decode_indices, encode_indices
from piece_surgery.runtime.dtypes import as_bits, bits_dtype, float_dtype
from piece_surgery.runtime.errors import PieceError

VERSION = 2
TENSOR_SCHEMA = "tensor_v2"


def arrays(name: str) -> list[str]:
    return [f"{name}::gaps", f"{name}::tuned"]


def encode(
    name: str,
    indices: torch.Tensor,
    base: torch.Tensor | None,
    tuned: torch.Tensor,
    shape: tuple[int, ...],
    base_sha256: Callable[[], str],
) -> tuple[dict[str, torch.Tensor], dict]:
    data, encoding = encode_indices(indices.numpy())
    tensors = {f"{name}::gaps": torch.from_numpy(data), f"{name}::tuned": as_bits(tuned)}
    return tensors, {"gaps": encoding, "base_sha256": base_sha256()}


def decode(name: str, meta: dict, stored: list[torch.Tensor], where: str):
    gaps, tuned = stored
    dtype = float_dtype(meta["dtype"])
    bits = bits_dtype(dtype.itemsize)
    if gaps.dtype != torch.uint8 or gaps.dim() != 1 or tuned.dtype != bits or tuned.dim() != 1:
        raise PieceError(f"{where}: tensor '{name}' has inconsistent dtypes")
    try:
        idx = torch.from_numpy(decode_indices(gaps.numpy(), meta["gaps"]))
    except ValueError as exc:
        raise PieceError(f"{where}: tensor '{name}': its index gaps do not decode ({exc})") from exc
    if idx.numel() != tuned.numel():
        raise PieceError(f"{where}: tensor '{name}' has arrays of different lengths")
    return idx.to(torch.int64), None, tuned.view(dtype), meta["base_sha256"]
