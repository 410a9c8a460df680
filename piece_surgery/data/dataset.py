"""Training and scoring data: a data file read (files.py), tokenized (tokenize.py), its examples
with no loss-bearing token skipped and counted, and its digest (the images' bytes included).

Formats (one example each):
- `.txt`: every non-empty line is one example (plain text, loss on every token).
- `.jsonl`: one JSON object per line with `text`; or `prompt` + `response` (loss on the response
  only); or `messages` (a chat, each content a string or a list of {"type": "text", "text"} parts,
  rendered with the tokenizer's chat template; loss on exactly the assistant turns of the whole chat
  as the template renders it: tokenize.py, chat_labels.py). For a vision-language model
  a content list may hold {"type": "image", "path": ...} parts too (images.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from piece_surgery.data.examples import Dataset
from piece_surgery.data.files import read_records
from piece_surgery.data.images import ImageChats, images_digest
from piece_surgery.data.tokenize import tokenize_record
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.json_files import file_sha256


def load_dataset(
    path: Path,
    tokenizer,
    *,
    max_length: int = 512,
    max_samples: int | None = None,
    progress=None,
    name: str | None = None,
    image_chats: Callable[[], ImageChats] | None = None,
) -> Dataset:
    """Read and tokenize a data file; examples with no loss-bearing token are skipped and counted.
    `name` is how records name it (default: the file's name). `image_chats` tokenizes records with
    images (a vision-language model's processor; None: they are refused). The digest covers the
    images' bytes too (images.images_digest)."""
    if max_length < 2:
        raise PieceError("--max-length must be at least 2")
    if max_samples is not None and max_samples < 1:
        raise PieceError("--max-samples must be at least 1")
    records = read_records(path, max_samples)
    examples = []
    for lineno, record in records:
        try:
            examples.append(
                tokenize_record(
                    record, tokenizer, max_length, image_chats=image_chats, data_folder=Path(path).parent
                )
            )
        except PieceError as exc:
            raise PieceError(f"{path}:{lineno}: {exc}") from exc
        if progress:
            progress(1)
    kept = [e for e in examples if e.loss_tokens > 0]
    if not kept:
        raise PieceError(
            f"no example in '{path}' has a loss-bearing token (after truncation to {max_length} tokens)"
        )
    return Dataset(
        kept,
        name or Path(path).name,
        images_digest(file_sha256(Path(path)), records, Path(path).parent),
        len(records),
        len(records) - len(kept),
        max_length,
    )


def load_tokenizer(folder: Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise PieceError(
            f"cannot load the tokenizer from '{folder}'; the checkpoint needs tokenizer files"
        ) from exc
