"""Records as the model reads them: text and prompt/response records tokenized (EOS after the text
and the response), chats rendered with the tokenizer's chat template with the loss on the assistant
turns, image chats through the model's processor (images.py). Every example is cut to --max-length;
a huge record costs memory in proportion to --max-length, not to its size.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from piece_surgery.data.chats import image_paths
from piece_surgery.data.examples import IGNORE, Example
from piece_surgery.data.shapes import COMPLETION_FROM
from piece_surgery.runtime.errors import PieceError, first_line


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
    image_chats: Callable[[], Any] | None = None,
    data_folder: Path | None = None,
) -> Example:
    """One record as an Example. A chat with image parts goes through the model's processor
    (`image_chats`, None for a text-only model: PieceError), its paths relative to `data_folder`."""
    if isinstance(record, dict) and "messages" in record and image_paths(record["messages"]):
        if image_chats is None:
            raise PieceError("the record has an image part, but the model is a text-only language model")
        ids, labels, extras = image_chats().encode(
            record["messages"], Path(data_folder or "."), max_length, record.get(COMPLETION_FROM, 0)
        )
        return Example(ids, labels, model_inputs=extras or None)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if isinstance(record, str) or "text" in record:
        text = record if isinstance(record, str) else record["text"]
        ids = _encode(tokenizer, text, max_length, special=True)["input_ids"] + eos
        labels = list(ids)
    elif "messages" in record:
        trained_from = record.get(COMPLETION_FROM, 0)
        ids, labels = _tokenize_chat(record["messages"], tokenizer, max_length, trained_from)
    else:
        prompt = _encode(tokenizer, record["prompt"], max_length, special=True)["input_ids"]
        response = _encode(tokenizer, record["response"], max_length, special=False)["input_ids"] + eos
        ids = prompt + response
        labels = [IGNORE] * len(prompt) + response
    return Example(ids[:max_length], labels[:max_length])


def _tokenize_chat(
    messages: list[dict], tokenizer, max_length: int, trained_from: int = 0
) -> tuple[list[int], list[int]]:
    """Render with the chat template; loss on the characters of each assistant turn from message
    `trained_from` on (a TRL prompt/completion chat: the completion's)."""
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
        if message["role"] != "assistant" or i < trained_from:
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
