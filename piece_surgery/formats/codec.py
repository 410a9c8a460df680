"""Sorted flat indices stored compactly as gaps (compact deltas, format 2): each index minus the one
before it (the first as it is), in the smallest fixed width that holds every gap, or as LEB128
varints (7 bits a byte, high bit set on all but a value's last byte), whichever is fewer bytes.
Numpy alone decodes them (docs/formats.md has the reader)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from piece_surgery.runtime.errors import PieceError

WIDTHS = {"u8": np.dtype("<u1"), "u16": np.dtype("<u2"), "u32": np.dtype("<u4"), "u64": np.dtype("<u8")}
ENCODINGS = (*WIDTHS, "varint")


def encode_indices(indices: np.ndarray) -> tuple[np.ndarray, str]:
    """(bytes as uint8, encoding name) for sorted unique non-negative indices."""
    gaps = np.diff(indices.astype(np.uint64), prepend=np.uint64(0))
    biggest = int(gaps.max()) if gaps.size else 0
    width = next(name for name, dtype in WIDTHS.items() if biggest <= np.iinfo(dtype).max)
    fixed = gaps.astype(WIDTHS[width]).view(np.uint8)
    varint = _leb128(gaps)
    return (varint, "varint") if varint.size < fixed.size else (fixed, width)


def decode_indices(data: np.ndarray, encoding: str) -> np.ndarray:
    """The int64 indices back; ValueError for bytes that do not decode."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if encoding in WIDTHS:
        if data.size % WIDTHS[encoding].itemsize:
            raise ValueError(f"{data.size} bytes are not whole {encoding} gaps")
        gaps = data.view(WIDTHS[encoding]).astype(np.uint64)
    elif encoding == "varint":
        gaps = _unleb128(data)
    else:
        raise ValueError(f"unknown index encoding '{encoding}'")
    indices = np.cumsum(gaps, dtype=np.uint64)
    if indices.size and int(indices[-1]) >= 2**63:
        raise ValueError("indices overflow")
    return indices.astype(np.int64)


def _leb128(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.uint64)
    lengths = np.ones(values.size, dtype=np.int64)  # bytes per value: one more per 7 bits past the first 7
    for j in range(1, 10):
        lengths += values >= np.uint64(1 << (7 * j))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    out = np.zeros(int(lengths.sum()), dtype=np.uint8)
    for j in range(int(lengths.max()) if values.size else 0):
        has = lengths > j
        chunk = ((values[has] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        more = (lengths[has] > j + 1).astype(np.uint8) << 7
        out[starts[has] + j] = chunk | more
    return out


def _unleb128(data: np.ndarray) -> np.ndarray:
    if data.size and data[-1] & 0x80:
        raise ValueError("the last varint is cut short")
    ends = np.flatnonzero((data & 0x80) == 0)
    value_of_byte = np.concatenate([[0], np.cumsum((data & 0x80) == 0)[:-1]]).astype(np.int64)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    position = np.arange(data.size, dtype=np.int64) - starts[value_of_byte]
    if data.size and int(position.max()) > 9:
        raise ValueError("a varint is longer than 64 bits")
    values = np.zeros(ends.size, dtype=np.uint64)
    np.add.at(values, value_of_byte, (data & 0x7F).astype(np.uint64) << (7 * position).astype(np.uint64))
    return values


def values_digest(bits: np.ndarray) -> str:
    """sha256 of values' raw bit patterns, little-endian, in index order: a compact delta's record
    of the base values it was made from."""
    array = np.ascontiguousarray(bits)
    return hashlib.sha256(array.astype(array.dtype.newbyteorder("<")).tobytes()).hexdigest()


def is_shape(value) -> bool:
    """A JSON shape: a list of non-negative integers (booleans are not sizes)."""
    return isinstance(value, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in value
    )


def validate_indices(idx: torch.Tensor, size: int, where: str) -> None:
    if idx.dim() != 1:
        raise PieceError(f"{where}: indices must be 1-D")
    if idx.numel() == 0:
        return
    if int(idx.min()) < 0 or int(idx.max()) >= size:
        raise PieceError(f"{where}: index out of range for a tensor of {size} entries")
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise PieceError(f"{where}: indices are not sorted and unique")
