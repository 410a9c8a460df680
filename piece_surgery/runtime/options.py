"""The options of every run that loads a model (RunOptions: device, dtype, lengths, attention
kernel, trust, FSDP), and the checks options share: each record is checked when made, so a mistake
fails in milliseconds, before anything is loaded, and carries the help text the CLI shows on its
fields (cli/options.py turns the fields into flags).

Nothing here imports torch: `piece-surgery --help` stays fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.records import JsonRecord

MODEL_DTYPES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")


def check_density(density: float) -> None:
    if not (0.0 < density <= 1.0):
        raise PieceError(f"density {density} is outside (0, 1]; the paper uses 0.001")


def check_device_name(name: str) -> None:
    """A device name this tool takes (whether it is here is checked when it is used)."""
    prefix, _, index = name.partition(":")
    cuda = prefix == "cuda" and (not index or (index.isdigit() and len(index) <= 4))
    if name not in ("auto", "cpu", "mps") and not cuda:
        raise PieceError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps")


MAX_SEED = 2**62  # torch's generators take 64 bits; the data order adds the epoch to the seed


def check_weight(value: float, name: str) -> float:
    """A weight (a penalty's, a loss's): a finite number >= 0, as a float; PieceError naming `name`."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (number and value >= 0 and math.isfinite(value)):  # also refuses nan
        raise PieceError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_fields(record: JsonRecord) -> None:
    """PieceError naming the first field of `record` whose value is not of its type (a record made
    in Python: `density="0.1"`), in one line."""
    try:
        record.check_types()
    except ValueError as exc:
        raise PieceError(str(exc)) from None


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise PieceError(f"--seed {seed} must be a whole number in [0, 2^62]")


def check_model_dtype(name: str) -> None:
    if name != "auto" and name not in MODEL_DTYPES:
        raise PieceError(f"unknown dtype '{name}'; use auto, float32, bfloat16 or float16")


# ---------------------------------------------------------------- a run: where and how to load


ATTENTION = ("eager", "sdpa", "flash_attention_2", "flex_attention")


@dataclass(frozen=True)
class RunOptions(JsonRecord):
    """Where and how a command loads its model and data; checked when made."""

    device: str = field(
        default="auto",
        metadata={
            "help": "auto (cuda, then mps, then cpu), cpu, cuda or mps.",
            "metavar": "auto|cpu|cuda|mps",
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "auto (the checkpoint's), float32, bfloat16 or float16.",
            "metavar": "auto|float32|bfloat16|float16",
        },
    )
    max_length: int = field(
        default=512,
        metadata={
            "help": "Truncate examples to this many tokens (at most the model's context).",
            "metavar": "TOKENS",
        },
    )
    max_samples: int | None = field(
        default=None,
        metadata={
            "help": "Use at most this many examples of --data (retain, eval and general sets are read "
            "whole, so their figures compare between runs).",
            "metavar": "N",
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention kernel: eager, sdpa, flash_attention_2 or flex_attention. "
            "[default: the model's]",
            "metavar": "KERNEL",
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow model code from the checkpoint (off by default).", "flag": True},
    )
    fsdp: bool = field(
        default=False,
        metadata={
            "help": "Shard the model over the ranks (torchrun): for models one device cannot hold.",
            "flag": True,
        },
    )
    quiet: bool = field(default=True, metadata={"transient": True, "cli": False})

    def __post_init__(self) -> None:
        check_fields(self)
        check_device_name(self.device)
        check_model_dtype(self.dtype)
        if self.max_length < 2:
            raise PieceError("--max-length must be at least 2")
        if self.max_samples is not None and self.max_samples < 1:
            raise PieceError("--max-samples must be at least 1")
        if self.attn_implementation is not None and self.attn_implementation not in ATTENTION:
            raise PieceError(
                f"unknown --attn-implementation '{self.attn_implementation}'; use {', '.join(ATTENTION)}"
            )


# ---------------------------------------------------------------- scoring


# ---------------------------------------------------------------- training


# ---------------------------------------------------------------- evaluation
