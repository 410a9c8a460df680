"""Image records for vision-language models: a chat whose content holds image parts.

A record is transformers' chat form, `{"messages": [{"role": "user", "content": [{"type": "image",
"path": "img/1.png"}, {"type": "text", "text": "..."}]}, {"role": "assistant", "content": [...]}]}`;
image paths are relative to the data file. The model's own processor (AutoProcessor) renders the chat
with its template, expands each image placeholder into the image's tokens and computes the pixel
inputs; the loss covers the assistant turns' tokens only, never an image or prompt token. Images are
decoded with Pillow, whose decompression-bomb limit stays on.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from piece_surgery.data.chats import image_paths
from piece_surgery.data.examples import IGNORE
from piece_surgery.runtime.errors import PieceError, first_line, quote
from piece_surgery.runtime.paths import NOTHING, what_is


def open_image(path: Path):
    """The image at `path`, decoded to RGB (PIL.Image). PieceError for a missing, unreadable or
    oversized one (Pillow's decompression-bomb limit, Image.MAX_IMAGE_PIXELS, applies)."""
    from PIL import Image, UnidentifiedImageError

    found = what_is(path)
    if found == NOTHING:
        raise PieceError(f"image '{quote(path)}' not found (image paths are relative to the data file)")
    if found != "a file":
        raise PieceError(f"image '{quote(path)}' is {found}; give an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PieceError(f"image '{path}' is too large to decode safely: {first_line(exc)}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise PieceError(f"image '{path}' cannot be read as an image: {first_line(exc)}") from None


def load_processor(folder: Path, *, trust_remote_code: bool = False):
    """The checkpoint's processor (AutoProcessor: tokenizer, image processor, chat template).
    PieceError, in one line, for a checkpoint without one or one that cannot be built here."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    needs = "" if is_torchvision_available() else " (the Qwen-VL and SmolVLM processors need torchvision)"
    if not any((folder / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        raise PieceError(
            f"'{folder}' has no processor config (processor_config.json or preprocessor_config.json): "
            f"image records need the model's processor; save it beside the weights{needs}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, ImportError, AttributeError) as exc:
        video = "video" in str(exc).lower() or "torchvision" in str(exc).lower()
        hint = "; this family's processor needs torchvision" if video and needs else ""
        raise PieceError(f"cannot load the processor of '{folder}': {first_line(exc)}{hint}") from None


@dataclass
class ImageChats:
    """Tokenizes image records with a model's processor. `image_token_ids`: the ids standing for
    image features (never a label)."""

    processor: object
    image_token_ids: frozenset[int]

    def encode(
        self, messages: list[dict], data_folder: Path, max_length: int, trained_from: int = 0
    ) -> tuple[list[int], list[int], dict[str, torch.Tensor]]:
        """The record's input ids, labels (on the assistant turns from message `trained_from` on;
        IGNORE elsewhere) and other
        model inputs (pixel values, ...), as the processor makes them, cut at `max_length`.
        PieceError for a bad image, a chat the processor refuses, or image tokens past `max_length`."""
        images = [open_image(data_folder / p) for p in image_paths(messages)]
        plain = [_without_paths(m) for m in messages]
        full = self._encode(plain, images, add_generation_prompt=False)
        ids = full.pop("input_ids")[0].tolist()
        full.pop("attention_mask", None)
        labels = [IGNORE] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or i < trained_from:
                continue
            start = self._prefix(plain[:i], images, ids, add_generation_prompt=True) if i else 0
            end = self._prefix(plain[: i + 1], images, ids, add_generation_prompt=False)
            labels[start:end] = ids[start:end]
        labels = [
            IGNORE if t in self.image_token_ids else label for t, label in zip(ids, labels, strict=True)
        ]
        image_at = [k for k, t in enumerate(ids) if t in self.image_token_ids]
        if image_at and image_at[-1] >= max_length:
            raise PieceError(
                f"its images and the text before them take {image_at[-1] + 1} tokens, past the limit of "
                f"{max_length} (--max-length, at most the model's context length): an image cannot be "
                "cut; raise --max-length if it is below the context, or shorten the prompt"
            )
        width = len(ids)
        extras = {k: _cut(v, width, max_length) for k, v in full.items() if isinstance(v, torch.Tensor)}
        return ids[:max_length], labels[:max_length], extras

    def _encode(self, messages: list[dict], images: list, *, add_generation_prompt: bool) -> dict:
        try:
            text = self.processor.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return dict(
                    self.processor(
                        text=[text],
                        images=[images] if images else None,
                        add_special_tokens=False,
                        return_tensors="pt",
                    )
                )
        except PieceError:
            raise
        except Exception as exc:  # a processor and a template are model code: any error is the record's
            raise PieceError(f"the model's processor refused this record: {first_line(exc)}") from None

    def _prefix(
        self, messages: list[dict], images: list, ids: list[int], *, add_generation_prompt: bool
    ) -> int:
        """How many of `ids` the chat `messages` (a first part of the record) render to; they must
        be the first tokens of the whole record (PieceError otherwise)."""
        shown = sum(1 for m in messages for p in _parts(m) if p.get("type") == "image")
        part = self._encode(messages, images[:shown], add_generation_prompt=add_generation_prompt)
        head = part["input_ids"][0].tolist()
        if ids[: len(head)] != head:
            raise PieceError(
                "the chat template renders the first turns differently inside the whole chat, so the "
                "assistant's tokens cannot be told apart; give a template whose turns render alike"
            )
        return len(head)


def _parts(message: dict) -> list:
    content = message.get("content")
    return content if isinstance(content, list) else []


def _without_paths(message: dict) -> dict:
    """The message as the processor's template reads it: image parts without our `path` (the
    images are passed decoded, so no processor opens a path itself)."""
    content = message["content"]
    if not isinstance(content, list):
        return message
    return {**message, "content": [{"type": "image"} if p.get("type") == "image" else p for p in content]}


def _cut(value: torch.Tensor, width: int, max_length: int) -> torch.Tensor:
    """A per-token input (shape (1, width, ...), e.g. Gemma 3's token_type_ids) cut as the ids are;
    image inputs as they are."""
    if value.dim() >= 2 and value.shape[0] == 1 and value.shape[1] == width:
        return value[:, :max_length]
    return value


def images_digest(data_sha256: str, records: list[tuple[int, object]], data_folder: Path) -> str:
    """The data's digest with its images' bytes in: sha256 over the file's digest and, for each
    image part in order, its path as written and its bytes' sha256. Equals the file's digest
    when no record holds an image."""
    paths = [
        p for _, r in records if isinstance(r, dict) and "messages" in r for p in image_paths(r["messages"])
    ]
    if not paths:
        return data_sha256
    digest = hashlib.sha256(data_sha256.encode())
    for path in paths:
        file = data_folder / path
        digest.update(path.encode() + b"\0")
        readable = what_is(file) == "a file"
        digest.update(hashlib.sha256(file.read_bytes()).hexdigest().encode() if readable else b"missing")
    return digest.hexdigest()
