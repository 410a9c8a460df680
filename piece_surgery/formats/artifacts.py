"""Masks and deltas as artifacts a user names by path or Hub repo id: which kind a reference holds,
loading and checking it, summarising it (`inspect`) and sharing it with its card (`push`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from piece_surgery.formats.card import GENERATED_MARK, delta_card, mask_card
from piece_surgery.formats.delta import CARD, DESCRIPTION, Delta, load_delta
from piece_surgery.formats.mask import Mask, load_mask
from piece_surgery.io import hub
from piece_surgery.models.naming import breakdown
from piece_surgery.runtime.dtypes import numel
from piece_surgery.runtime.errors import PieceError

MASK_FILE = "mask.safetensors"  # a mask's name inside a folder or Hub repo
_ARTIFACT_FILES = ["*.safetensors", "*.json", "*.md"]


@dataclass
class Artifact:
    """A mask or a delta, loaded and checked, and where it came from."""

    ref: str  # as the user named it
    source: hub.Resolved
    path: Path  # the mask file, or the delta folder
    mask: Mask | None = None
    delta: Delta | None = None

    @property
    def kind(self) -> str:
        return "mask" if self.mask is not None else "delta"


def open_artifact(ref: str | Path, *, want: str | None = None) -> Artifact:
    """Resolve `ref` (path or Hub repo id), tell a mask from a delta, load and check it.

    `want` ("mask" or "delta") refuses the other kind with a message about the one asked for.
    """
    ref = str(ref)
    source = hub.resolve(ref, what=want or "mask or delta", patterns=_ARTIFACT_FILES)
    path = source.path
    if path.is_dir() and (path / DESCRIPTION).is_file() and want != "mask":
        return Artifact(ref, source, path, delta=load_delta(path, name=f"delta '{ref}'"))
    if path.is_dir() and (path / MASK_FILE).is_file() and want != "delta":
        path = path / MASK_FILE
    if path.is_file() and path.suffix == ".safetensors" and want != "delta":
        return Artifact(ref, source, path, mask=load_mask(path))
    if want == "delta":
        raise PieceError(f"delta '{ref}' is not a delta folder (needs {DESCRIPTION} and delta.safetensors)")
    if want == "mask":
        raise PieceError(f"mask '{ref}' is not a mask file (.safetensors) or a folder with {MASK_FILE}")
    raise PieceError(f"'{ref}' is neither a mask (.safetensors) nor a delta folder (with {DESCRIPTION})")


def open_mask(ref: str | Path) -> Mask:
    return open_artifact(ref, want="mask").mask


def open_delta(ref: str | Path) -> Delta:
    return open_artifact(ref, want="delta").delta


# ---------------------------------------------------------------- inspect


def mask_breakdown(mask: Mask) -> dict:
    """Entries, tensors and norm share of a mask, and per layer and module kind (naming.breakdown)."""
    counts = {n: int(i.numel()) for n, i in mask.indices.items()}
    return breakdown(counts, {n: numel(s) for n, s in mask.shapes.items()})


def summarize(artifact: Artifact) -> dict:
    """What `inspect --json` prints of a mask or a delta (schema in docs/cli.md): entries per layer
    and module kind, size and provenance."""
    if artifact.mask is not None:
        mask = artifact.mask
        info = mask.info
        return {
            "kind": "mask",
            **mask_breakdown(mask),
            "method": info.method,
            "density": info.density,
            "eligible": mask.eligible,
            "model": info.model.to_json() if info.model else None,
            "data": info.data.to_json() if info.data else None,
            "file_bytes": artifact.path.stat().st_size,
        }
    delta = artifact.delta
    counts = {n: int(t.indices.numel()) for n, t in delta.tensors.items()}
    sizes = {n: numel(t.shape) for n, t in delta.tensors.items()}
    return {
        "kind": "delta",
        **breakdown(counts, sizes),
        "base": delta.info.base.to_json() if delta.info.base else None,
        "provenance": delta.info.provenance.to_json() if delta.info.provenance else None,
        "tensor_bytes": delta.tensor_bytes,
        "bytes_per_entry": delta.tensor_bytes / max(delta.count, 1),
        "evaluations": delta.info.evaluations,
    }


# ---------------------------------------------------------------- push


def push(
    path: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    create_pr: bool = False,
    base_model: str | None = None,
    quiet: bool = True,
) -> dict:
    """Upload a delta folder (or a mask file) to a Hub model repo, creating the repo if missing.

    The artifact is loaded and checked first: a corrupt one is refused before anything is uploaded.
    The model card is generated when the folder has none or has one this tool wrote; a card the
    user wrote is uploaded as it is. The local folder is never modified.
    """
    path = Path(path)
    if base_model is not None and (not hub.looks_like_repo_id(base_model) or Path(base_model).exists()):
        raise PieceError(f"--base-model '{base_model}' must be a Hub repo id (user/name), not a local path")
    if not path.exists():
        raise PieceError(f"'{path}' not found: give a delta folder or a mask file")
    if not (path.is_dir() and (path / DESCRIPTION).is_file()) and not (
        path.is_file() and path.suffix == ".safetensors"
    ):
        raise PieceError(
            f"'{path}' is neither a delta folder (with {DESCRIPTION}) nor a mask file (.safetensors)"
        )
    artifact = open_artifact(path)
    files: dict[str, Path | bytes] = {}
    if artifact.delta is not None:
        for item in sorted(path.iterdir()):
            if item.is_file() and not item.name.startswith("."):
                files[item.name] = item
        card = (path / CARD).read_text() if (path / CARD).is_file() else None
        if card is None or GENERATED_MARK in card:
            files[CARD] = delta_card(artifact.delta, base_model=base_model, repo_id=repo_id).encode()
    else:
        files[MASK_FILE] = path
        files[CARD] = mask_card(artifact.mask, base_model=base_model, repo_id=repo_id).encode()
    return hub.upload(
        repo_id,
        files,
        private=private,
        revision=revision,
        commit_message=commit_message or f"Upload {path.name} with piece-surgery",
        token=token,
        create_pr=create_pr,
        quiet=quiet,
    )
