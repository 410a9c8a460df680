"""The one table of dtypes: the names users type, the names safetensors headers use, and the integer
type of the same width that carries a float's bit pattern (numpy has no bfloat16)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}

# safetensors header names; the 8-bit float types exist in every torch this package supports
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def float_dtype(name: str) -> torch.dtype | None:
    """`float32`, `bf16`, ... -> the torch dtype; None for a name that is not a float dtype."""
    return FLOAT_DTYPES.get(_ALIASES.get(name, name))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bits_dtype(itemsize: int) -> torch.dtype:
    """The integer dtype of `itemsize` bytes, which holds a float's raw bit pattern."""
    return _BITS[itemsize]


def as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_BITS[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bit-for-bit equality (NaN == NaN with the same payload; -0.0 != +0.0)."""
    return as_bits(a) == as_bits(b)


def numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def index_dtype(size: int) -> torch.dtype:
    """Flat indices into a tensor of `size` entries: int32, or int64 from 2^31 entries on."""
    return torch.int32 if size < 2**31 else torch.int64
