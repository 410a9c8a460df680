"""What selection must respect: the text a model must keep (the shipped general text, retain
files, or text the model writes itself) and the entries of earlier tasks to leave alone."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from piece_surgery.data.examples import Dataset, Example
from piece_surgery.data.tokenize import tokenize_record
from piece_surgery.evaluation.generation import check_prompt_ids, embedding_rows
from piece_surgery.models.loading import context_length
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.progress import library_logs_silenced, working
from piece_surgery.runtime.records import AvoidRecord
from piece_surgery.scoring.options import CHAT, GENERAL, NAMED_SETS, SELF  # noqa: F401 - the names of the sets


def general_text() -> Path:
    """The shipped general-text retain set (piece_surgery/resources/README.md says what it is)."""
    return Path(__file__).parent.parent / "resources" / "general.jsonl"


@dataclass
class Avoided:
    """Entries selection must leave alone (--avoid): earlier tasks' masks or deltas."""

    entries: dict[str, torch.Tensor] = field(default_factory=dict)  # tensor name -> sorted flat indices
    records: list[AvoidRecord] = field(default_factory=list)  # what they came from


def sample_self(
    model: torch.nn.Module,
    tokenizer,
    *,
    samples: int,
    length: int,
    seed: int,
    pad_id: int = 0,
    batch_size: int = 8,
    quiet: bool = True,
) -> Dataset:
    """`samples` texts of `length` tokens the model writes itself (temperature 1, no top-k or
    top-p), each after the tokenizer's BOS token (else EOS); the same texts for the same seed.
    A text never outgrows the model's context: `length` is cut to its positions less the start."""
    from transformers import GenerationConfig

    start = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None), 0)
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 1:
        length = min(length, positions - 1)
    config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_new_tokens=length,
        max_new_tokens=length,
        pad_token_id=pad_id,
    )
    device = next(model.parameters()).device
    texts: list[list[int]] = []
    was_training = model.training
    model.eval()
    with (
        working(f"writing {samples} retain texts with the model", quiet=quiet),
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        library_logs_silenced(),
    ):
        torch.manual_seed(seed)
        with torch.no_grad():
            for begin in range(0, samples, batch_size):
                n = min(batch_size, samples - begin)
                prompt = torch.full((n, 1), start, dtype=torch.long, device=device)
                try:
                    out = model.generate(
                        prompt, attention_mask=torch.ones_like(prompt), generation_config=config
                    )
                except RuntimeError as exc:
                    if "probability tensor" not in str(exc):
                        raise
                    raise PieceError(
                        "the model's next-token probabilities are nan or inf, so it cannot write its "
                        "own retain text (--retain self): check the checkpoint's weights"
                    ) from exc
                texts.extend(out.cpu().tolist())
    model.train(was_training)
    digest = hashlib.sha256(torch.tensor(texts, dtype=torch.int64).numpy().tobytes()).hexdigest()
    examples = [Example(ids, list(ids)) for ids in texts]
    return Dataset(examples, SELF, digest, len(examples), 0, length + 1)


def instructions() -> Path:
    """The shipped general instructions `--retain chat` has the model answer (resources/README.md)."""
    return Path(__file__).parent.parent / "resources" / "instructions.jsonl"


CHAT_BATCH = 16  # answers written at once: 5x faster than one by one (benchmarks/chat_retain_speed.py)


def sample_chat(
    model: torch.nn.Module,
    tokenizer,
    *,
    length: int,
    seed: int,
    max_length: int,
    pad_id: int = 0,
    batch_size: int = CHAT_BATCH,
    quiet: bool = True,
) -> Dataset:
    """The model's own answers (sampled at temperature 1, seeded, ended at its end-of-turn token) to
    the shipped instructions, through its chat template, as chat examples whose loss is on the
    answer: its behaviour in conversation, for the retain Fisher. An answer has at most `length`
    new tokens, and fewer where its instruction and it would pass `max_length` or the model's
    positions. Instructions of similar length are answered `batch_size` at a time, left-padded
    with `pad_id`. The same answers for the same seed and batch size; the digest covers them.
    PieceError for a tokenizer without a chat template, or where no answer fits `max_length`."""
    if not getattr(tokenizer, "chat_template", None):
        raise PieceError("--retain chat needs a tokenizer with a chat template (this model has none)")
    asked = [json.loads(line)["instruction"] for line in instructions().read_text().splitlines() if line]
    prompts = [_prompt_ids(tokenizer, instruction) for instruction in asked]
    config = getattr(model, "config", None)
    positions = context_length(config) if config is not None else None
    room = min(max_length, positions) if positions is not None else max_length
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with (
        working(f"writing the model's answers to {len(asked)} instructions", quiet=quiet),
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        library_logs_silenced(),
        torch.no_grad(),
    ):
        torch.manual_seed(seed)
        answers = _answers(model, tokenizer, prompts, pad_id, length, room, batch_size)
    model.train(was_training)
    records = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": _text(tokenizer, a)}]}
        for q, a in zip(asked, answers, strict=True)
        if a is not None
    ]
    digest = hashlib.sha256("".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())
    examples = [tokenize_record(r, tokenizer, max_length) for r in records]
    kept = [e for e in examples if e.loss_tokens > 0]
    if not kept:
        sizes = sorted(len(p) for p in prompts)
        raise PieceError(
            f"--retain chat: no answer fits in {room} tokens beside its instruction (the shipped "
            f"instructions take {sizes[0]}-{sizes[-1]} tokens in this chat template); raise --max-length"
        )
    return Dataset(kept, CHAT, digest.hexdigest(), len(asked), len(asked) - len(kept), max_length)


def _answers(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[list[int]],
    pad_id: int,
    length: int,
    room: int,
    batch: int,
) -> list[list[int] | None]:
    """Each prompt's answer, written `batch` prompts of similar length at a time (less padding),
    at most `length` tokens and at most what `room` leaves beside the batch's longest prompt; None
    for a prompt that leaves no room."""
    from transformers import GenerationConfig

    rows = embedding_rows(model)
    for instruction in prompts:
        check_prompt_ids(
            instruction, rows=rows, context=None, what="--retain chat: an instruction in the chat template"
        )
    stops = _stop_ids(model, tokenizer)
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=pad_id)
    config.eos_token_id = sorted(stops) or None
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[list[int] | None] = [None] * len(prompts)
    for begin in range(0, len(order), batch):
        chosen = [i for i in order[begin : begin + batch] if len(prompts[i]) < room]
        if not chosen:
            continue
        config.max_new_tokens = min(length, room - max(len(prompts[i]) for i in chosen))
        written = generate_answers(model, [prompts[i] for i in chosen], config, pad_id, stops)
        for i, tokens in zip(chosen, written, strict=True):
            answers[i] = tokens
    return answers


def _text(tokenizer, tokens: list[int]) -> str:
    # an answer the model ended at once is kept as one character: a chat turn needs some text
    return tokenizer.decode(tokens, skip_special_tokens=True).strip() or "."


def generate_answers(
    model: torch.nn.Module, prompts: list[list[int]], config, pad_id: int, stops: set[int]
) -> list[list[int]]:
    """Token ids `model.generate` writes after each prompt, the prompts left-padded into one batch
    (the attention mask leaves the padding out); each answer ends before its first stop token."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(ids, attention_mask=mask, generation_config=config)[:, width:].tolist()
    return [row[: next((j for j, t in enumerate(row) if t in stops), len(row))] for row in out]


def _prompt_ids(tokenizer, instruction: str) -> list[int]:
    messages = [{"role": "user", "content": instruction}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def _stop_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """The tokens that end a turn: the model's generation config's EOS (else the tokenizer's), and
    the special token the chat template closes an assistant turn with (Llama 3's <|eot_id|>,
    Gemma's <end_of_turn>, Phi-3's <|end|>), which a base model's config may not name."""
    generation = getattr(model, "generation_config", None)
    found = getattr(generation, "eos_token_id", None)
    if found is None:
        found = tokenizer.eos_token_id
    stops = set(found if isinstance(found, list) else [] if found is None else [found])
    closing = _turn_end_id(tokenizer)
    return stops | ({closing} if closing is not None else set())


def _turn_end_id(tokenizer) -> int | None:
    """The first token the chat template writes after an assistant's text, if it is a special one."""
    from jinja2 import TemplateError

    mark = "\u2063piece-surgery-answer\u2063"
    messages = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": mark}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError):
        return None  # a template that will not render this turn: the config's EOS alone stops it
    if not isinstance(text, str) or mark not in text:
        return None
    after = tokenizer(text[text.rindex(mark) + len(mark) :], add_special_tokens=False)["input_ids"]
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
    return after[0] if after and after[0] in special else None


@dataclass
class ScoringInputs:
    """Retain data and avoided entries, read and checked before the model is loaded."""

    retain: list[Dataset | str] = field(default_factory=list)  # datasets, and SELF where it goes
    avoid: Avoided = field(default_factory=Avoided)
