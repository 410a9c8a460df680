"""The `push` recipe: upload a delta folder or a mask file, with its model card, to a Hub repo."""

from __future__ import annotations

from pathlib import Path

from piece_surgery.formats.artifacts import open_artifact
from piece_surgery.formats.card import GENERATED_MARK
from piece_surgery.formats.delta_folder import delta_card
from piece_surgery.formats.mask import mask_card
from piece_surgery.io import hub
from piece_surgery.io.sniff import CARD, DELTA, DELTA_DESCRIPTION, MASK, MASK_FILE, sniff
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.paths import not_there, what_is


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
    if what_is(path) not in ("a file", "a folder"):
        raise PieceError(f"'{path}' {not_there(path)}: give a delta folder or a mask file")
    kinds = sniff(path)
    if not (DELTA in kinds or (MASK in kinds and path.is_file())):
        raise PieceError(
            f"'{path}' is neither a delta folder (with {DELTA_DESCRIPTION}) nor a mask file (.safetensors)"
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
