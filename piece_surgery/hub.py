"""The Hugging Face Hub: resolve `user/name[@rev]` references to local folders, and push folders."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from piece_surgery.errors import PieceError

# What a command needs from a repo: weights, configs, tokenizer files, cards. Never pickles.
CHECKPOINT_FILES = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.md"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class Resolved:
    """A local folder or file, and the Hub repo it came from (if any)."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None

    @property
    def name(self) -> str:
        """How to name the source in metadata: the repo id, else the local path as given."""
        if self.repo_id:
            return self.repo_id if not self.revision else f"{self.repo_id}@{self.revision}"
        return str(self.path)


def split_repo_ref(ref: str) -> tuple[str, str | None]:
    """`user/name@rev` -> (`user/name`, `rev`); no `@` -> revision None."""
    repo_id, _, revision = ref.partition("@")
    return repo_id, (revision or None)


def looks_like_repo_id(ref: str) -> bool:
    return bool(_REPO_ID.match(ref)) and not ref.startswith((".", "/"))


def resolve(ref: str, *, what: str = "checkpoint", patterns: list[str] | None = None) -> Resolved:
    """Return a local path for `ref`: an existing path as is, else a Hub repo id downloaded to cache."""
    path = Path(ref).expanduser()
    if path.exists():
        return Resolved(path)
    if not looks_like_repo_id(ref):
        raise PieceError(f"{what} '{ref}' not found: give an existing path or a Hub repo id (user/name)")
    repo_id, revision = split_repo_ref(ref)
    local = download(repo_id, revision, patterns or CHECKPOINT_FILES, what=what)
    return Resolved(Path(local), repo_id, revision)


def download(repo_id: str, revision: str | None, patterns: list[str], *, what: str) -> str:
    """Download (or reuse from the cache) the files of a repo matching `patterns`."""
    from huggingface_hub import snapshot_download

    with hub_errors(f"{what} {repo_id}" + (f"@{revision}" if revision else "")):
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns)


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
) -> dict:
    """Upload a delta folder (or a mask file) to a Hub model repo, creating the repo if missing.

    The model card is generated when the folder has none or has one this tool wrote; a card the
    user wrote is uploaded as it is. The local folder is never modified.
    """
    import json

    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    from piece_surgery.card import GENERATED_MARK, delta_card, mask_card

    path = Path(path)
    if not looks_like_repo_id(repo_id) or "@" in repo_id:
        raise PieceError(
            f"'{repo_id}' is not a Hub repo id; write it as user/name (and the branch as --revision)"
        )
    if base_model is not None and (not looks_like_repo_id(base_model) or Path(base_model).exists()):
        raise PieceError(f"--base-model '{base_model}' must be a Hub repo id (user/name), not a local path")
    uploads: dict[str, Path | bytes] = {}
    if path.is_dir() and (path / "delta.json").is_file():
        from piece_surgery.delta import load_delta

        load_delta(path)  # a corrupt delta is refused here, not discovered by its users
        for item in sorted(path.iterdir()):
            if item.is_file() and not item.name.startswith("."):
                uploads[item.name] = item
        card = (path / "README.md").read_text() if (path / "README.md").is_file() else None
        if card is None or GENERATED_MARK in card:
            description = json.loads((path / "delta.json").read_text())
            uploads["README.md"] = delta_card(description, base_model=base_model, repo_id=repo_id).encode()
    elif path.is_file() and path.suffix == ".safetensors":
        from piece_surgery.mask import load_mask

        mask = load_mask(path)
        info = {**mask.info, "k": mask.k, "eligible": mask.eligible}
        uploads = {
            "mask.safetensors": path,
            "README.md": mask_card(info, base_model=base_model, repo_id=repo_id).encode(),
        }
    else:
        raise PieceError(
            f"'{path}' is neither a delta folder (with delta.json) nor a mask file (.safetensors)"
        )
    token = token or get_token()
    if not token:
        raise PieceError("no Hub token: run `hf auth login`, set HF_TOKEN, or pass --token")
    api = HfApi(token=token)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(src) if isinstance(src, Path) else src)
        for name, src in uploads.items()
    ]
    with hub_errors(f"push to {repo_id}"):
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload {path.name} with piece-surgery",
            revision=revision,
            create_pr=create_pr,
        )
    return {
        "repo_id": repo_id,
        "url": str(url),
        "revision": revision or "main",
        "commit": info.oid,
        "commit_url": info.commit_url,
        "pr_url": info.pr_url,
        "files": sorted(uploads),
    }


class hub_errors:  # noqa: N801 - used as a context manager, reads like a statement
    """Turn huggingface_hub exceptions into one-line PieceErrors that say what to do."""

    def __init__(self, subject: str):
        self.subject = subject

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, PieceError):
            return False
        from huggingface_hub import errors as hf

        s = self.subject
        if isinstance(exc, hf.RevisionNotFoundError):
            msg = f"{s}: revision not found; check the branch, tag or commit after '@'"
        elif _status(exc) in (401, 403):
            msg = (
                f"{s}: the Hub refused the token ({_status(exc)}); log in (`hf auth login`, HF_TOKEN or "
                "--token) with a token that has access (write access to push)"
            )
        elif isinstance(exc, hf.GatedRepoError):
            msg = f"{s}: the repo is gated; accept its terms on the Hub and log in (HF_TOKEN)"
        elif isinstance(exc, hf.RepositoryNotFoundError):
            msg = (
                f"{s}: repository not found, or private and your token cannot see it; "
                "check the id, or log in (hf auth login / HF_TOKEN)"
            )
        elif isinstance(exc, hf.LocalTokenNotFoundError):
            msg = f"{s}: no Hub token found; run `hf auth login` or set HF_TOKEN, or pass --token"
        elif isinstance(exc, hf.LocalEntryNotFoundError | hf.OfflineModeIsEnabled):
            msg = (
                f"{s}: not in the local cache and the Hub cannot be reached "
                "(offline, or HF_HUB_OFFLINE=1); connect, or download it first"
            )
        elif isinstance(exc, hf.HfHubHTTPError):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            msg = f"{s}: Hub request failed: {first}"
        elif isinstance(exc, OSError | ConnectionError) or "Connect" in type(exc).__name__:
            msg = f"{s}: cannot reach the Hub ({type(exc).__name__}); check the network or HF_ENDPOINT"
        else:
            return False
        raise PieceError(msg) from exc


def _status(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)
