"""The Hugging Face Hub as transport: resolve `user/name[@rev]` to local files (downloaded through
huggingface_hub's cache), upload files in one commit, and turn Hub failures into one-line errors."""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from piece_surgery.runtime.errors import PieceError, first_line, quote
from piece_surgery.runtime.paths import NOTHING, followable, not_there, what_is
from piece_surgery.runtime.progress import library_logs_silenced

# What a command needs from a repo: weights, configs, tokenizer files, cards. Never pickles.
CHECKPOINT_FILES = [
    "*.safetensors",
    "*.json",
    "*.txt",
    "*.model",
    "*.jinja",
    "*.md",
    # the other tokenizer forms and the licence files a merged folder carries (models/layout.py)
    "*.spm",
    "*.codes",
    "*.tokenizer",
    "*.tiktoken",
    "tokenizer.model.*",
    "LICENSE*",
    "NOTICE*",
    "USE_POLICY*",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class Resolved:
    """A local folder or file, and the Hub repo it came from (if any)."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None

    @property
    def name(self) -> str:
        """How masks and deltas name the source: the repo id[@revision], else the folder's or file's
        own name (a file that may be shared never records a local path)."""
        if self.repo_id:
            return self.repo_id if not self.revision else f"{self.repo_id}@{self.revision}"
        followed = followable(self.path)
        return (followed.name if followed is not None else "") or self.path.name or str(self.path)


def split_repo_ref(ref: str) -> tuple[str, str | None]:
    """`user/name@rev` -> (`user/name`, `rev`); no `@` -> revision None."""
    repo_id, _, revision = ref.partition("@")
    return repo_id, (revision or None)


def looks_like_repo_id(ref: str) -> bool:
    return bool(_REPO_ID.match(ref)) and not ref.startswith((".", "/"))


def resolve(ref: str, *, what: str = "checkpoint", patterns: list[str] | None = None) -> Resolved:
    """Return a local path for `ref`: an existing path as is, else a Hub repo id downloaded to cache."""
    path = Path(ref).expanduser()
    found = what_is(path)
    if found in ("a file", "a folder"):
        return Resolved(path)
    if found != NOTHING:  # a link loop, a FIFO, a device: a local path, never a Hub repo
        raise PieceError(f"{what} '{quote(ref)}' {not_there(path)}: give a folder, a file or a Hub repo id")
    if not looks_like_repo_id(ref) or what_is(Path(ref.split("/")[0]).expanduser()) == "a folder":
        # `runs/mask.safetensors` beside a folder `runs`: a missing local path, not a Hub repo
        raise PieceError(f"{what} '{ref}' not found: give an existing path or a Hub repo id (user/name)")
    repo_id, revision = split_repo_ref(ref)
    local = download(repo_id, revision, patterns or CHECKPOINT_FILES, what=what)
    return Resolved(Path(local), repo_id, revision)


def download(repo_id: str, revision: str | None, patterns: list[str], *, what: str) -> str:
    """Download (or reuse from the cache) the files of a repo matching `patterns`."""
    from huggingface_hub import snapshot_download

    # its log lines ("Ignored error while writing tree cache file ...") would precede our one line
    with hub_errors(f"{what} {repo_id}" + (f"@{revision}" if revision else "")), library_logs_silenced():
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns)


def upload(
    repo_id: str,
    files: dict[str, Path | bytes],
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str,
    token: str | None = None,
    create_pr: bool = False,
    quiet: bool = True,
) -> dict:
    """Upload files (path in repo -> local file or bytes) in one commit, creating the repo (and the
    branch) if missing. An unchanged upload makes no commit."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if not looks_like_repo_id(repo_id) or "@" in repo_id:
        raise PieceError(
            f"'{repo_id}' is not a Hub repo id; write it as user/name (and the branch as --revision)"
        )
    token = token or get_token()
    if not token:
        raise PieceError("no Hub token: run `hf auth login`, set HF_TOKEN, or pass --token")
    api = HfApi(token=token)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(src) if isinstance(src, Path) else src)
        for name, src in files.items()
    ]
    bars_were_off = are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        with (
            hub_errors(f"push to {repo_id}", token_option=True),
            library_logs_silenced() if quiet else nullcontext(),
        ):
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.create_commit(
                repo_id, operations, commit_message=commit_message, revision=revision, create_pr=create_pr
            )
    finally:
        if quiet and not bars_were_off:
            enable_progress_bars()
    return {
        "repo_id": repo_id,
        "url": str(url),
        "revision": revision or "main",
        "commit": info.oid,
        "commit_url": info.commit_url,
        "pr_url": info.pr_url,
        "files": sorted(files),
    }


class hub_errors:  # noqa: N801 - used as a context manager, reads like a statement
    """Turn huggingface_hub exceptions into one-line PieceErrors that say what to do; the advice
    names --token only for a command that takes it (`token_option`: push)."""

    def __init__(self, subject: str, *, token_option: bool = False):
        self.subject = subject
        self.token_option = token_option

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, PieceError):
            return False
        from huggingface_hub import errors as hf

        s = self.subject
        login = "`hf auth login`, HF_TOKEN or --token" if self.token_option else "`hf auth login` or HF_TOKEN"
        if isinstance(exc, hf.RevisionNotFoundError):
            msg = f"{s}: revision not found; check the branch, tag or commit after '@'"
        elif _status(exc) in (401, 403):
            msg = (
                f"{s}: the Hub refused the token ({_status(exc)}); log in ({login}) with a token that "
                "has access (write access to push)"
            )
        elif isinstance(exc, hf.GatedRepoError):
            msg = f"{s}: the repo is gated; accept its terms on the Hub and log in (HF_TOKEN)"
        elif isinstance(exc, hf.RepositoryNotFoundError):
            msg = (
                f"{s}: repository not found, or private and your token cannot see it; "
                "check the id, or log in (hf auth login / HF_TOKEN)"
            )
        elif isinstance(exc, hf.LocalTokenNotFoundError):
            msg = f"{s}: no Hub token found; log in ({login})"
        elif isinstance(exc, hf.LocalEntryNotFoundError | hf.OfflineModeIsEnabled):
            msg = (
                f"{s}: not in the local cache and the Hub cannot be reached "
                "(offline, or HF_HUB_OFFLINE=1); connect, or download it first"
            )
        elif isinstance(exc, hf.HfHubHTTPError):
            msg = f"{s}: Hub request failed: {first_line(exc)}"
        elif isinstance(exc, OSError) and exc.filename and not isinstance(exc, ConnectionError):
            # a file of the local cache, not the network: HF_HOME or HF_HUB_CACHE naming a file, say
            reason = (exc.strerror or type(exc).__name__).lower()
            msg = (
                f"{s}: cannot use the Hub's local cache ({reason}: '{quote(exc.filename)}'); "
                "check HF_HOME and HF_HUB_CACHE"
            )
        elif isinstance(exc, OSError | ConnectionError) or "Connect" in type(exc).__name__:
            msg = f"{s}: cannot reach the Hub ({type(exc).__name__}); check the network or HF_ENDPOINT"
        else:
            return False
        raise PieceError(msg) from exc


def _status(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)
