"""Answers a model writes to prompts (`generate`): how (GenerateOptions: greedy by default, seeded
sampling on request) and the writing itself, through transformers' `generate`.

A text prompt goes through the tokenizer's chat template as one user turn, with the generation
prompt added, where the tokenizer has a template (`raw` gives it as it is, as does an `AsIs` prompt:
one read from a record training reads untemplated); a chat prompt needs one. A text given as it is
gets the special tokens training puts before a text (a BOS where the tokenizer adds one), none after.
Every answer starts from `torch.manual_seed(seed)`, so the base and each candidate draw their samples
from the same random stream, and a run repeats exactly on the same machine.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from piece_surgery.data.prompts import AsIs
from piece_surgery.data.tokenize import special_tokens
from piece_surgery.models.loading import context_length
from piece_surgery.runtime.errors import PieceError, first_line
from piece_surgery.runtime.options import check_seed
from piece_surgery.runtime.progress import library_logs_silenced
from piece_surgery.runtime.records import JsonRecord


@dataclass(frozen=True)
class GenerateOptions(JsonRecord):
    """How `generate` writes: greedy (the most likely token each time) unless `sample`."""

    max_new_tokens: int = field(default=64, metadata={"help": "Tokens to write per answer, at most."})
    sample: bool = field(
        default=False,
        metadata={"help": "Sample (seeded by --seed) instead of greedy decoding.", "flag": True},
    )
    temperature: float | None = field(
        default=None, metadata={"help": "With --sample: the softmax temperature. [default: 1]"}
    )
    top_p: float | None = field(
        default=None, metadata={"help": "With --sample: nucleus sampling's mass. [default: 1, all tokens]"}
    )
    seed: int = field(default=0, metadata={"help": "Seed of --sample (every answer starts from it)."})
    raw: bool = field(
        default=False,
        metadata={"help": "Give text prompts as they are, without the chat template.", "flag": True},
    )

    def __post_init__(self) -> None:
        check_seed(self.seed)
        if self.max_new_tokens < 1:
            raise PieceError("--max-new-tokens must be at least 1")
        if not self.sample:
            for name in ("temperature", "top_p"):
                if getattr(self, name) is not None:
                    flag = name.replace("_", "-")
                    raise PieceError(f"--{flag} shapes --sample; give --sample too, or leave --{flag} out")
        if self.temperature is not None and not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise PieceError(f"--temperature must be a positive, finite number, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise PieceError(f"--top-p must be in (0, 1], got {self.top_p}")


def prompt_ids(prompt: str | list[dict], tokenizer, *, raw: bool = False) -> tuple[list[int], bool]:
    """(the prompt's token ids, whether the chat template rendered it). PieceError for a chat
    prompt without a template, or a template that fails on it."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(prompt, str) and (raw or not template or isinstance(prompt, AsIs)):
        before, _ = special_tokens(tokenizer)  # as training reads a text: no EOS to end it at once
        return before + tokenizer(prompt, add_special_tokens=False)["input_ids"], False
    if not template:
        raise PieceError("a chat prompt needs a chat template, and the tokenizer has none")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # a template is user code
        raise PieceError(f"the tokenizer's chat template failed on a prompt: {first_line(exc)}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"], True


def check_prompt_ids(ids: list[int], *, rows: int | None, context: int | None, what: str) -> None:
    """A prompt the model can read: every token id a row of its embedding table (`rows`), and
    room for at least one new token within its `context` positions. PieceError otherwise: past
    either, the model indexes past a table (a crash, or on a GPU a device assert); and a prompt of
    no token (an empty text, to a tokenizer that adds no BOS): nothing to start an answer from."""
    if not ids:
        raise PieceError(f"{what} has no token to start from (an empty text?): give it some text")
    if rows is not None and ids and max(ids) >= rows:
        raise PieceError(
            f"{what} has token id {max(ids)}, but the model's embedding table has {rows} rows: the "
            "tokenizer has tokens the model lacks; resize the model's embeddings (and save it), or use "
            "the tokenizer the model was trained with"
        )
    if context is not None and len(ids) >= context:
        raise PieceError(f"{what} takes {len(ids)} tokens, and the model reads at most {context}: shorten it")


def embedding_rows(model: torch.nn.Module) -> int | None:
    """Rows of the model's input embedding table (None where the model does not say)."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return getattr(embedding, "num_embeddings", None)


def room_for_answer(model: torch.nn.Module, prompt_tokens: int, wanted: int) -> int:
    """At most `wanted` new tokens, and no more than the model's positions leave after a prompt of
    `prompt_tokens` (a learned position table, GPT-2's, has no row past them)."""
    config = getattr(model, "config", None)
    context = context_length(config) if config is not None else None
    return wanted if context is None else max(1, min(wanted, context - prompt_tokens))


def write_answer(
    model: torch.nn.Module, ids: list[int], options: GenerateOptions, *, pad_id: int, eos_id: int | None
) -> list[int]:
    """The tokens `model` writes after `ids` (at most options.max_new_tokens, and at most what the
    model's positions leave after the prompt; up to and without its end-of-sequence token): greedy,
    or sampled from torch.manual_seed(options.seed)."""
    device = next(model.parameters()).device
    inputs = torch.tensor([ids], device=device)
    settings = {
        "do_sample": options.sample,
        "max_new_tokens": room_for_answer(model, len(ids), options.max_new_tokens),
    }
    if options.sample:
        settings.update(temperature=options.temperature or 1.0, top_p=options.top_p or 1.0, top_k=0)
    else:  # the model's own generation_config may ask for sampling settings greedy decoding ignores
        settings.update(temperature=None, top_p=None, top_k=None)
    torch.manual_seed(options.seed)
    with torch.no_grad(), library_logs_silenced(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(
            inputs,
            attention_mask=torch.ones_like(inputs),
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            **settings,
        )
    new = out[0, len(ids) :].tolist()
    if eos_id is not None and eos_id in new:
        new = new[: new.index(eos_id)]
    return new
