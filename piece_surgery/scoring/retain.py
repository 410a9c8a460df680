"""What selection must respect: the text a model must keep (the shipped general text, retain
files, or text the model writes itself) and the entries of earlier tasks to leave alone."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from piece_surgery.data.examples import Dataset, Example
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.progress import library_logs_silenced, working
from piece_surgery.runtime.records import AvoidRecord
from piece_surgery.scoring.options import GENERAL, NAMED_SETS, SELF  # noqa: F401 - the names of the sets


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


@dataclass
class ScoringInputs:
    """Retain data and avoided entries, read and checked before the model is loaded."""

    retain: list[Dataset | str] = field(default_factory=list)  # datasets, and SELF where it goes
    avoid: Avoided = field(default_factory=Avoided)
