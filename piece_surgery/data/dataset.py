"""Training and scoring data: read .txt / .jsonl, tokenize, mark loss-bearing tokens, batch.

Formats (one example each):
- `.txt`: every non-empty line is one example (plain text, loss on every token).
- `.jsonl`: one JSON object per line with `text`; or `prompt` + `response` (loss on the response
  only); or `messages` (a chat, each content a string or a list of {"type": "text", "text"} parts,
  rendered with the tokenizer's chat template; loss on assistant turns). For a vision-language model
  a content list may hold {"type": "image", "path": ...} parts too (images.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from piece_surgery.data.images import ImageChats, collate_model_inputs, image_paths, images_digest
from piece_surgery.runtime.errors import PieceError, first_line
from piece_surgery.runtime.records import DataRecord, file_sha256, parse_json

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the token carries no loss
    # an image record's other model inputs, as its processor made them (pixel_values, ...)
    model_inputs: dict[str, torch.Tensor] | None = field(default=None, compare=False)

    @property
    def loss_tokens(self) -> int:
        # Causal LMs predict token t from tokens < t, so the first position never carries loss.
        return sum(1 for t in self.labels[1:] if t != IGNORE)


@dataclass(frozen=True)
class Dataset:
    examples: list[Example]
    name: str  # the file's name (a record never carries a local path)
    sha256: str
    read: int  # records read from the file (after --max-samples)
    skipped: int  # records with no loss-bearing token (after truncation)
    max_length: int

    def record(self) -> DataRecord:
        return DataRecord(self.name, self.sha256, len(self.examples), self.skipped, self.max_length)


def read_records(path: Path, max_samples: int | None = None) -> list[tuple[int, str | dict]]:
    """Parse the file into (line number, record): strings for .txt, checked objects for .jsonl."""
    path = Path(path)
    if not path.exists():
        raise PieceError(f"data file '{path}' not found")
    if not path.is_file():
        raise PieceError(
            f"data file '{path}' is a folder or a device, not a file; give a .txt or .jsonl file"
        )
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json"):
        raise PieceError(f"data file '{path}' must be .txt or .jsonl")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PieceError(f"data file '{path}' is not UTF-8 text") from exc
    records: list[tuple[int, str | dict]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if max_samples is not None and len(records) >= max_samples:
            break
        if not line.strip():
            continue
        if suffix == ".txt":
            records.append((lineno, line))
            continue
        record = parse_json(line, f"{path}:{lineno}:")
        problem = _record_problem(record)
        if problem:
            raise PieceError(f"{path}:{lineno}: {problem}")
        records.append((lineno, record))
    if not records:
        raise PieceError(f"data file '{path}' has no examples")
    return records


def _record_problem(record) -> str | None:
    """What is wrong with a .jsonl record, or None."""
    if not isinstance(record, dict):
        return "expected an object with 'text', 'prompt'+'response' or 'messages'"
    if "text" in record:
        return None if isinstance(record["text"], str) else "'text' must be a string"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list of {role, content} objects"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                return f"message {i + 1} must be an object with a string 'role' and a 'content'"
            problem = _content_problem(m["content"])
            if problem:
                return f"message {i + 1}: {problem}"
        return None
    if {"prompt", "response"} <= record.keys():
        if isinstance(record["prompt"], str) and isinstance(record["response"], str):
            return None
        return "'prompt' and 'response' must be strings"
    return "expected an object with 'text', 'prompt'+'response' or 'messages'"


def _content_problem(content) -> str | None:
    """A message's content: a string, or a list of parts in transformers' chat form
    ({"type": "text", "text": ...}); what is wrong with it, or None."""
    if isinstance(content, str):
        return None
    if not isinstance(content, list) or not content:
        return "'content' must be a string or a non-empty list of {type, text} parts"
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            if not isinstance(part.get("path"), str) or not part["path"]:
                return 'an image part names its file with "path" (relative to the data file)'
            continue
        if kind in ("image_url", "video", "audio"):
            return f'has a part of type \'{kind}\': give images as {{"type": "image", "path": ...}} parts'
        if kind != "text" or not isinstance(part.get("text"), str):
            return 'each part of a \'content\' list must be {"type": "text", "text": "..."}'
    return None


def _message_texts(message: dict) -> list[str]:
    content = message["content"]
    return [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]


# Records are tokenized a growing prefix at a time, so a huge record costs memory in proportion to
# --max-length, not to its size. The margin keeps the prefix cut (which can change the last few
# tokens) past the tokens kept.
_CHARS_PER_TOKEN_GUESS = 8
_MARGIN = 16


def _encode(tokenizer, text: str, limit: int, *, special: bool, offsets: bool = False) -> dict:
    """tokenizer(text) as far as the first `limit` tokens go (exactly those tokens)."""
    chars = (limit + _MARGIN) * _CHARS_PER_TOKEN_GUESS
    while True:
        enc = tokenizer(text[:chars], add_special_tokens=special, return_offsets_mapping=offsets)
        if chars >= len(text) or len(enc["input_ids"]) > limit + _MARGIN:
            return enc
        chars *= 4


def tokenize_record(
    record: str | dict,
    tokenizer,
    max_length: int,
    *,
    image_chats: Callable[[], ImageChats] | None = None,
    data_folder: Path | None = None,
) -> Example:
    """One record as an Example. A chat with image parts goes through the model's processor
    (`image_chats`, None for a text-only model: PieceError), its paths relative to `data_folder`."""
    if isinstance(record, dict) and "messages" in record and image_paths(record["messages"]):
        if image_chats is None:
            raise PieceError("the record has an image part, but the model is a text-only language model")
        ids, labels, extras = image_chats().encode(record["messages"], Path(data_folder or "."), max_length)
        return Example(ids, labels, model_inputs=extras or None)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if isinstance(record, str) or "text" in record:
        text = record if isinstance(record, str) else record["text"]
        ids = _encode(tokenizer, text, max_length, special=True)["input_ids"] + eos
        labels = list(ids)
    elif "messages" in record:
        ids, labels = _tokenize_chat(record["messages"], tokenizer, max_length)
    else:
        prompt = _encode(tokenizer, record["prompt"], max_length, special=True)["input_ids"]
        response = _encode(tokenizer, record["response"], max_length, special=False)["input_ids"] + eos
        ids = prompt + response
        labels = [IGNORE] * len(prompt) + response
    return Example(ids[:max_length], labels[:max_length])


def _tokenize_chat(messages: list[dict], tokenizer, max_length: int) -> tuple[list[int], list[int]]:
    """Render with the chat template; loss on the characters of each assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise PieceError("data has 'messages' but the tokenizer has no chat template")
    full = _render(tokenizer, messages)
    for i, message in enumerate(messages):  # a template that expects the other content form drops it
        missing = next((t for t in _message_texts(message) if t.strip() not in full), None)
        if missing is not None:
            form = "a string" if isinstance(message["content"], str) else "a list of parts"
            raise PieceError(
                f"the tokenizer's chat template drops the text of message {i + 1} "
                f"({missing.strip()[:40]!r}); it gives 'content' as {form}: give it in the form the "
                'template reads (a string, or a list of {"type": "text", "text": ...} parts)'
            )
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        end = len(_render(tokenizer, messages[: i + 1]))
        spans.append((start, end))
    enc = _encode(tokenizer, full, max_length, special=False, offsets=True)
    ids = enc["input_ids"]
    labels = [
        tok if any(s <= a < e for s, e in spans) else IGNORE
        for tok, (a, _) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return ids, labels


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # a template is user code: jinja errors, raise_exception(), ...
        raise PieceError(f"the tokenizer's chat template failed on this chat: {first_line(exc)}") from exc


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


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padding carries no loss and no attention. Image records' pixel
    inputs join the batch as their processor batches them (images.collate_model_inputs)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(e.model_inputs for e in examples):
        batch.update(collate_model_inputs(examples, width))
    return batch


def micro_batches(examples: list[Example], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start : start + batch_size], pad_id)


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def load_tokenizer(folder: Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise PieceError(
            f"cannot load the tokenizer from '{folder}'; the checkpoint needs tokenizer files"
        ) from exc
