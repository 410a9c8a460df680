"""Records that masks and deltas carry: who a checkpoint is and which data a run saw.

Each record is a frozen dataclass written as a JSON object (`to_json`) and read back leniently
(`from_json` ignores keys it does not know, so newer files stay readable).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, TypeVar

R = TypeVar("R", bound="JsonRecord")


class JsonRecord:
    """to_json / from_json for a flat dataclass of JSON values."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    @classmethod
    def from_json(cls: type[R], data: Any) -> R | None:
        """None for a missing record (JSON null); ValueError for one of the wrong shape."""
        if data is None:
            return None
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        required = {f.name for f in fields if f.default is dataclasses.MISSING}
        if not isinstance(data, dict) or not required <= data.keys():
            raise ValueError(f"expected an object with {', '.join(sorted(required))}")
        known = {f.name for f in fields}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclasses.dataclass(frozen=True)
class CheckpointIdentity(JsonRecord):
    """Who a checkpoint is: how it was named, the Hub repo and revision it came from (if any), and a
    fingerprint of its weights (see checkpoint.fingerprint)."""

    name: str
    repo_id: str | None = None
    revision: str | None = None
    fingerprint: str | None = None


@dataclasses.dataclass(frozen=True)
class DataRecord(JsonRecord):
    """Which data file a run read (its name and digest, never its local path), and what it kept."""

    file: str
    sha256: str
    examples: int
    skipped: int = 0
    max_length: int | None = None

    @classmethod
    def from_json(cls, data: Any) -> DataRecord | None:
        if isinstance(data, dict) and "file" not in data and "path" in data:  # written by 0.1.0
            data = {**data, "file": Path(str(data["path"])).name}
        return super().from_json(data)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class RetainRecord:
    """What a retain-aware mask kept in mind: the retain text, its labels, and the damping."""

    sources: list[DataRecord]  # files by name and sha256; text the model wrote itself as "self"
    labels: str  # "empirical" (the text's own next tokens) or "sampled" (drawn from the model)
    damping: float  # the quantile of F_retain used as delta
    delta: float  # its value
    fisher_scale: float  # per-token Fisher = F_retain x this (1 / sum over micro-batches of 1/tokens)
    self_sampling: dict[str, int] | None = None  # seed, samples and length of the "self" text

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "sources": [s.to_json() for s in self.sources]}

    @classmethod
    def from_json(cls, data: Any) -> RetainRecord | None:
        if data is None:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("sources"), list):
            raise ValueError("expected an object with sources, labels, damping, delta, fisher_scale")
        for key in ("damping", "delta", "fisher_scale"):
            if not isinstance(data.get(key), int | float) or isinstance(data.get(key), bool):
                raise ValueError(f"'{key}' must be a number")
        sampling = data.get("self_sampling")
        if sampling is not None and not isinstance(sampling, dict):
            raise ValueError("'self_sampling' must be an object")
        return cls(
            sources=[DataRecord.from_json(s) for s in data["sources"]],
            labels=str(data.get("labels")),
            damping=float(data["damping"]),
            delta=float(data["delta"]),
            fisher_scale=float(data["fisher_scale"]),
            self_sampling=sampling,
        )


@dataclasses.dataclass(frozen=True)
class AvoidRecord(JsonRecord):
    """A mask or delta whose entries a mask was told to avoid (an earlier task's)."""

    name: str  # its repo id, or its file or folder name
    kind: str  # "mask" or "delta"
    entries: int
