"""Chat records: the parts of their messages (text, images), as transformers' chat form writes
them."""

from __future__ import annotations


def image_paths(messages: list[dict]) -> list[str]:
    """The `path` of every image part of a chat, in order."""
    return [
        part["path"]
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and part.get("type") == "image"
    ]
