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
    """The model's own answers (sampled at temperature 1, seeded, at most `length` new tokens, ended
    at its end-of-turn token) to the shipped instructions, through its chat template, as chat
    examples whose loss is on the answer: its behaviour in conversation, for the retain Fisher.
    Instructions of similar length are answered `batch_size` at a time, left-padded with `pad_id`.
    PieceError for a tokenizer without a chat template. The same answers for the same seed and
    batch size; the digest covers them."""
    if not getattr(tokenizer, "chat_template", None):
        raise PieceError("--retain chat needs a tokenizer with a chat template (this model has none)")
    from transformers import GenerationConfig

    stops = _stop_ids(model, tokenizer)
    config = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=length, pad_token_id=pad_id
    )
    config.eos_token_id = sorted(stops) or None
    asked = [json.loads(line)["instruction"] for line in instructions().read_text().splitlines() if line]
    prompts = [_prompt_ids(tokenizer, instruction) for instruction in asked]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding in a batch
    answers: list[list[int]] = [[] for _ in prompts]
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
        for begin in range(0, len(order), batch_size):
            batch = order[begin : begin + batch_size]
            written = generate_answers(model, [prompts[i] for i in batch], config, pad_id, stops)
            for i, tokens in zip(batch, written, strict=True):
                answers[i] = tokens
    model.train(was_training)
    records = [
        {
            "messages": [
                {"role": "user", "content": instruction},
                {
                    "role": "assistant",
                    "content": tokenizer.decode(tokens, skip_special_tokens=True).strip() or ".",
                },
            ]
        }
        for instruction, tokens in zip(asked, answers, strict=True)
    ]
    digest = hashlib.sha256("".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())
    examples = [tokenize_record(r, tokenizer, max_length) for r in records]
    kept = [e for e in examples if e.loss_tokens > 0]
    return Dataset(kept, CHAT, digest.hexdigest(), len(records), len(records) - len(kept), max_length)


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
    """The tokens that end a turn: the model's generation config's, else the tokenizer's EOS."""
    generation = getattr(model, "generation_config", None)
    found = getattr(generation, "eos_token_id", None)
    if found is None:
        found = tokenizer.eos_token_id
    return set(found if isinstance(found, list) else [] if found is None else [found])


@dataclass
class ScoringInputs:
    """Retain data and avoided entries, read and checked before the model is loaded."""

    retain: list[Dataset | str] = field(default_factory=list)  # datasets, and SELF where it goes
    avoid: Avoided = field(default_factory=Avoided)
