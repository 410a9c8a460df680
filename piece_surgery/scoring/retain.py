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


def sample_chat(
    model: torch.nn.Module,
    tokenizer,
    *,
    length: int,
    seed: int,
    max_length: int,
    pad_id: int = 0,
    quiet: bool = True,
) -> Dataset:
    """The model's own answers (sampled at temperature 1, seeded, at most `length` new tokens) to
    the shipped instructions, through its chat template, as chat examples whose loss is on the
    answer: its behaviour in conversation, for the retain Fisher. PieceError for a tokenizer
    without a chat template. The same answers for the same seed; the digest covers them."""
    if not getattr(tokenizer, "chat_template", None):
        raise PieceError("--retain chat needs a tokenizer with a chat template (this model has none)")
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=length)
    config.pad_token_id = pad_id
    device = next(model.parameters()).device
    asked = [json.loads(line)["instruction"] for line in instructions().read_text().splitlines() if line]
    records = []
    was_training = model.training
    model.eval()
    with (
        working(f"writing the model's answers to {len(asked)} instructions", quiet=quiet),
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        library_logs_silenced(),
        torch.no_grad(),
    ):
        torch.manual_seed(seed)
        for instruction in asked:
            messages = [{"role": "user", "content": instruction}]
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
            answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip() or "."
            records.append({"messages": [*messages, {"role": "assistant", "content": answer}]})
    model.train(was_training)
    digest = hashlib.sha256("".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())
    examples = [tokenize_record(r, tokenizer, max_length) for r in records]
    kept = [e for e in examples if e.loss_tokens > 0]
    return Dataset(kept, CHAT, digest.hexdigest(), len(records), len(records) - len(kept), max_length)


@dataclass
class ScoringInputs:
    """Retain data and avoided entries, read and checked before the model is loaded."""

    retain: list[Dataset | str] = field(default_factory=list)  # datasets, and SELF where it goes
    avoid: Avoided = field(default_factory=Avoided)
