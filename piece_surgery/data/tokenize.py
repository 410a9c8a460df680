"""Records as the model reads them: text and prompt/response records tokenized with the special
tokens the tokenizer adds itself, exactly once (a BOS before the text where the tokenizer adds one,
an EOS after the text and after the response, the tokenizer's own or appended where it adds none),
chats rendered with the tokenizer's chat template, whose text holds the special tokens it writes,
with the loss on exactly the assistant turns of the whole conversation as the template renders it
(transformers' assistant masks where the template marks them with {% generation %}, chat_labels.py
otherwise), image chats through the model's processor (images.py). Every example is cut to
--max-length; a text or prompt/response record costs memory in proportion to --max-length, not to
its size (a chat is rendered whole, and tokenized whole where its template marks generation).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from piece_surgery.data.chat_labels import assistant_spans, dropped
from piece_surgery.data.chats import image_paths
from piece_surgery.data.examples import IGNORE, Example
from piece_surgery.data.shapes import COMPLETION_FROM
from piece_surgery.runtime.errors import PieceError, first_line


def _message_texts(message: dict) -> list[str]:
    content = message["content"]
    return [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]


# a template that marks the assistant's turns itself: transformers' assistant masks read them
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


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
    if isinstance(record, str) or "text" in record:
        text = record if isinstance(record, str) else record["text"]
        lead, trail = special_tokens(tokenizer)
        ids = lead + _encode(tokenizer, text, max_length, special=False)["input_ids"] + trail
        labels = list(ids)
    elif "messages" in record:
        trained_from = record.get(COMPLETION_FROM, 0)
        ids, labels = _tokenize_chat(record["messages"], tokenizer, max_length, trained_from)
    else:
        lead, trail = special_tokens(tokenizer)
        prompt = lead + _encode(tokenizer, record["prompt"], max_length, special=False)["input_ids"]
        response = _encode(tokenizer, record["response"], max_length, special=False)["input_ids"] + trail
        ids = prompt + response
        labels = [IGNORE] * len(prompt) + response
    return Example(ids[:max_length], labels[:max_length])


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(before, after): the special tokens that go around a text, each once: those the tokenizer
    adds itself (a BOS before, an EOS after; seen by tokenizing a probe with and without them),
    and an EOS after where it adds nothing after (none where it has no EOS token)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    marked = tokenizer("a", add_special_tokens=True)["input_ids"]
    at = next((k for k in range(len(marked) - len(plain) + 1) if marked[k : k + len(plain)] == plain), None)
    before, after = ([], []) if at is None else (marked[:at], marked[at + len(plain) :])
    if not after and tokenizer.eos_token_id is not None:
        after = [tokenizer.eos_token_id]
    return list(before), list(after)


def _tokenize_chat(
    messages: list[dict], tokenizer, max_length: int, trained_from: int = 0
) -> tuple[list[int], list[int]]:
    """Render with the chat template (its text holds the special tokens it writes, so nothing is
    added); the loss on exactly the assistant turns of the whole chat as the template renders it,
    from message `trained_from` on (a TRL prompt/completion chat: the completion's)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise PieceError("data has 'messages' but the tokenizer has no chat template")
    if isinstance(template, dict):
        template = template.get("default", "")
    render = lambda chat, prompt: _render(tokenizer, chat, prompt)  # noqa: E731
    _check_shown(messages, render(messages, False))
    if _GENERATION_TAG.search(template):
        return _marked_chat(messages, tokenizer, max_length, trained_from)
    full, spans = assistant_spans(messages, render)
    spans = spans[_assistants_before(messages, trained_from) :]
    enc = _encode(tokenizer, full, max_length, special=False, offsets=True)
    labels = [
        tok if any(s <= a < b <= e for s, e in spans) else IGNORE
        for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    return enc["input_ids"], labels


def _check_shown(messages: list[dict], full: str) -> None:
    """A template that expects the other content form drops a message's text: an error, not a
    silent loss (an assistant's text is checked where its turn is found: its template may drop
    the reasoning in it)."""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            continue
        missing = next((t for t in _message_texts(message) if t.strip() not in full), None)
        if missing is not None:
            raise dropped(i, message, missing)


def _assistants_before(messages: list[dict], i: int) -> int:
    return sum(m["role"] == "assistant" for m in messages[:i])


def _marked_chat(
    messages: list[dict], tokenizer, max_length: int, trained_from: int = 0
) -> tuple[list[int], list[int]]:
    """The chat as transformers tokenizes it, the loss where the template's {% generation %} blocks
    put it (return_assistant_tokens_mask), from the assistant turn of message `trained_from` on."""
    try:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
    except Exception as exc:  # a template is user code: jinja errors, raise_exception(), ...
        raise PieceError(f"the tokenizer's chat template failed on this chat: {first_line(exc)}") from exc
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if not any(mask) and any(m["role"] == "assistant" for m in messages):
        raise PieceError(
            "the chat template marks assistant turns with {% generation %}, but none of this chat's: "
            "fix the template's generation blocks"
        )
    mask = _without_first_blocks(mask, _assistants_before(messages, trained_from), messages)
    return ids[:max_length], [t if m else IGNORE for t, m in zip(ids, mask, strict=True)][:max_length]


def _without_first_blocks(mask: list[int], n: int, messages: list[dict]) -> list[int]:
    """`mask` with its first `n` runs of marked tokens (the first n assistant turns) cleared; each
    assistant turn must be one run for the runs to name the turns."""
    if n == 0:
        return mask
    starts = [k for k, m in enumerate(mask) if m and (k == 0 or not mask[k - 1])]
    if len(starts) != sum(m["role"] == "assistant" for m in messages):
        raise PieceError(
            "the chat template's {% generation %} blocks do not mark one run per assistant turn, so "
            "the completion's turns cannot be told from the prompt's: give the chat as 'messages'"
        )
    cut = starts[n] if n < len(starts) else len(mask)
    return [0] * cut + mask[cut:]


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # a template is user code: jinja errors, raise_exception(), ...
        raise PieceError(f"the tokenizer's chat template failed on this chat: {first_line(exc)}") from exc
