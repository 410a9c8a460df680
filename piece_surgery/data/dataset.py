"""Training and scoring data: a data source read (files.py), tokenized (tokenize.py), its examples
with no loss-bearing token skipped and counted, and its digest (the images' bytes included).

Sources: `.txt` (every non-empty line is one example, loss on every token); `.jsonl` (an object a
line), `.json` (an array of objects), `.parquet`, `.arrow` and `datasets` folders (a row each),
whose objects map onto three records by their shape (shapes.py): `text`; `prompt` + `response`
(loss on the response only); `messages` (a chat, each content a string or a list of {"type":
"text", "text"} parts, rendered with the tokenizer's chat template; loss on exactly the assistant
turns of the whole chat as the template renders it: tokenize.py, chat_labels.py). For a
vision-language model a content list may hold {"type": "image", "path": ...} parts too (images.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

from piece_surgery.data.examples import Dataset
from piece_surgery.data.files import check_record, read_data
from piece_surgery.data.images import ImageChats, images_digest
from piece_surgery.data.shapes import without_nulls
from piece_surgery.data.tokenize import tokenize_record
from piece_surgery.runtime.errors import PieceError


def load_dataset(
    path: Path,
    tokenizer,
    *,
    max_length: int = 512,
    max_samples: int | None = None,
    progress=None,
    name: str | None = None,
    image_chats: Callable[[], ImageChats] | None = None,
    context: int | None = None,
) -> Dataset:
    """Read and tokenize a data file; examples with no loss-bearing token are skipped and counted.
    `context`: the model's positions, when `max_length` was cut to them (errors say so).
    `name` is how records name it (default: the file's name). `image_chats` tokenizes records with
    images (a vision-language model's processor; None: they are refused). The digest covers the
    images' bytes too (images.images_digest)."""
    if max_length < 2:
        raise PieceError("--max-length must be at least 2")
    if max_samples is not None and max_samples < 1:
        raise PieceError("--max-samples must be at least 1")
    read = read_data(path, max_samples)
    records = read.records
    examples = []
    for where, record in records:
        try:
            examples.append(
                tokenize_record(
                    record, tokenizer, max_length, image_chats=image_chats, data_folder=read.folder
                )
            )
        except PieceError as exc:
            raise PieceError(f"{where}: {exc}") from exc
        if progress:
            progress(1)
    kept = [e for e in examples if e.loss_tokens > 0]
    if not kept:
        raise PieceError(
            nothing_to_learn(f"example in '{path}'", [r for _, r in records], examples, max_length, context)
        )
    return Dataset(
        kept,
        name or Path(path).name,
        images_digest(read.sha256, records, read.folder),
        len(records),
        len(records) - len(kept),
        max_length,
    )


def dataset_from_records(
    records: Iterable,
    tokenizer,
    *,
    max_length: int = 512,
    name: str = "records",
    image_chats: Callable[[], ImageChats] | None = None,
    data_folder: Path | None = None,
) -> Dataset:
    """Records given in memory (strings, or objects in the .jsonl records' shapes: a list, or the
    rows of a `datasets.Dataset`) tokenized as a data file's are; examples with no loss-bearing
    token are skipped and counted. The digest is the sha256 of the records as canonical JSON
    lines (sorted keys, UTF-8), so the same records give the same digest however they arrive.
    Fields that are None in a row (a dataset's column another shape uses) are left out, at any depth."""
    if max_length < 2:
        raise PieceError("max_length must be at least 2")
    checked, digest = [], hashlib.sha256()
    for i, row in enumerate(records, 1):
        record = without_nulls(row)
        checked.append(check_record(record, f"{name}, record {i}"))
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    if not checked:
        raise PieceError(f"{name} holds no records")
    examples = []
    for i, r in enumerate(checked, 1):
        try:
            examples.append(
                tokenize_record(r, tokenizer, max_length, image_chats=image_chats, data_folder=data_folder)
            )
        except PieceError as exc:  # named as check_record names a record
            raise PieceError(f"{name}, record {i}: {exc}") from exc
    kept = [e for e in examples if e.loss_tokens > 0]
    if not kept:
        raise PieceError(nothing_to_learn(f"record of {name}", checked, examples, max_length))
    return Dataset(kept, name, digest.hexdigest(), len(checked), len(checked) - len(kept), max_length)


def nothing_to_learn(
    which: str, records: list, examples: list, max_length: int, context: int | None = None
) -> str:
    """Why no example of a source has a loss-bearing token, in one line: truncation, where an
    example was cut (`context`: max_length is the model's positions); chats with no assistant turn
    (nothing is labelled, cut or not); else what each shape needs."""
    if any(len(e.input_ids) >= max_length for e in examples):
        cut = f"{max_length} tokens, the model's context" if context else f"{max_length} tokens"
        advice = "shorten the prompts" if context else "raise --max-length or shorten the prompts"
        return f"no {which} has a loss-bearing token after truncation to {cut}; {advice}"
    if records and all(_is_chat_without_assistant(r) for r in records):
        return f"no {which} has an assistant turn, the turns trained on; add the assistant's replies"
    return (
        f"no {which} has a loss-bearing token (a text needs two tokens or more, a prompt a non-empty "
        "response, a chat an assistant turn)"
    )


def _is_chat_without_assistant(record) -> bool:
    messages = record.get("messages") if isinstance(record, dict) else None
    return isinstance(messages, list) and not any(
        isinstance(m, dict) and m.get("role") == "assistant" for m in messages
    )


def load_tokenizer(folder: Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise PieceError(
            f"cannot load the tokenizer from '{folder}'; the checkpoint needs tokenizer files"
        ) from exc


def check_token_ids(dataset: Dataset, rows: int | None) -> None:
    """Every token id of `dataset` is a row of the model's embedding table (`rows`; None: not
    known). A tokenizer with added tokens and a model not resized would index past it: a crash, or
    on a GPU a device assert, in the middle of a run."""
    largest = max((max(e.input_ids) for e in dataset.examples if e.input_ids), default=-1)
    if rows is not None and largest >= rows:
        raise PieceError(
            f"'{dataset.name}' has token id {largest}, but the model's embedding table has {rows} "
            "rows: the tokenizer has tokens the model lacks; resize the model's embeddings "
            "(and save it), or use the tokenizer the model was trained with"
        )
