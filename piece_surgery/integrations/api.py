"""The CLI's recipes on objects in memory: `score` a loaded model on records (a list, or a
`datasets.Dataset`), `sparsify` it with a mask (then any training loop trains only the masked
entries), and save the delta `train` would write (SparseModel.save_delta)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from piece_surgery.data.batches import pad_id
from piece_surgery.data.dataset import dataset_from_records, load_dataset
from piece_surgery.data.examples import Dataset
from piece_surgery.formats.mask import Mask
from piece_surgery.integrations.models import checkpoint_of, loaded
from piece_surgery.integrations.sparse_model import SparseModel
from piece_surgery.models.eligible import DEFAULT_EXCLUDE
from piece_surgery.models.loading import context_length
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.options import RunOptions
from piece_surgery.scoring.methods import method_named
from piece_surgery.scoring.options import GENERAL, SELF, ScoreOptions
from piece_surgery.scoring.retain import general_text, sample_self
from piece_surgery.scoring.selection import score_model


def score(
    model: torch.nn.Module,
    data: Any = None,
    *,
    tokenizer=None,
    method: str = "piece-r",
    density: float = 0.001,
    retain: Any = None,
    checkpoint: str | Path | None = None,
    batch_size: int = 1,
    max_length: int = 512,
    include: Sequence[str] = (),
    exclude: Sequence[str] | None = None,
    seed: int = 0,
    **options: Any,
) -> Mask:
    """The mask `piece-surgery score` would write, for a model loaded in memory (its weights as they
    are now: a model still at its checkpoint's weights scores as the checkpoint).

    `data`: the domain's records, as `.jsonl` records are (a string is text; objects with `text`,
    `prompt`+`response` or `messages`): a list, or a `datasets.Dataset` (its rows). `retain`
    (piece-r): a source or a list of them, each "general" (the shipped set, the default), "self",
    a data file's path, or records as `data` takes them. `checkpoint`: the folder or Hub repo id
    the model was loaded from (default: its config's `name_or_path` when that is a local folder),
    which names the mask's tensors as its files store them and records the model's identity.
    `tokenizer` defaults to the checkpoint's. Other keyword arguments are ScoreOptions fields
    (retain_labels, retain_damping, self_samples, self_length, normalize, ...).

    Returns a Mask (formats/mask.py; `save_mask(mask, path)` writes it). PieceError for bad
    records, options or a model that is not its checkpoint's."""
    named = [s for s in _sources(retain) if isinstance(s, str | Path)]
    score_options = ScoreOptions(
        method=method,
        density=density,
        batch_size=batch_size,
        include=list(include),
        exclude=list(DEFAULT_EXCLUDE if exclude is None else exclude),
        seed=seed,
        **options,
    ).with_retain([str(s) for s in named] + ["records"] * (len(_sources(retain)) - len(named)))
    ckpt = checkpoint_of(model, checkpoint)
    tokenizer = tokenizer or _tokenizer(ckpt)
    context = context_length(model.config) if hasattr(model, "config") else None
    run = RunOptions(max_length=max_length)  # what the mask records, as the CLI's
    max_length = min(max_length, context) if context else max_length  # as the CLI reads data
    dataset = None
    if method_named(method).needs_data:
        if data is None:
            raise PieceError(f"method {method} scores on data: give the domain's records")
        dataset = dataset_from_records(_rows(data), tokenizer, max_length=max_length, name="data")
    retain_sets = _retain_sets(retain, score_options, model, tokenizer, max_length)
    mask, _ = score_model(
        loaded(model, ckpt),
        dataset,
        score_options,
        retain=retain_sets,
        identity=ckpt.identity if ckpt is not None else None,
        run=run,
        pad_id=pad_id(tokenizer),
    )
    return mask


def sparsify(model: torch.nn.Module, mask: Mask, *, checkpoint: str | Path | None = None) -> SparseModel:
    """Make only `mask`'s entries of `model` trainable, in place: every weight is frozen, and the k
    selected values of each masked tensor become fp32 parameters of the model (under
    `model.piece_surgery`), which any optimizer over `p for p in model.parameters() if
    p.requires_grad` trains; the model runs its own forward (gradients reach the values through
    module hooks), and its weights follow the values before every forward pass. Returns the
    handle that saves the delta and undoes it all (SparseModel). PieceError for a mask of another
    model. `checkpoint` as for `score`."""
    return SparseModel(model, mask, checkpoint_of(model, checkpoint))


def _sources(retain: Any) -> list:
    if retain is None:
        return []
    if isinstance(retain, str | Path) or _is_records(retain):
        return [retain]
    return list(retain)


def _is_records(value: Any) -> bool:
    """A datasets.Dataset, or a list whose items are records (not sources)."""
    if hasattr(value, "column_names") and hasattr(value, "__iter__"):
        return True
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def _rows(data: Any) -> Iterable:
    if isinstance(data, str | Path):
        raise PieceError("score takes records in memory; for a data file, use score_checkpoint or the CLI")
    return iter(data)


def _retain_sets(retain: Any, options: ScoreOptions, model, tokenizer, max_length: int) -> list[Dataset]:
    if not method_named(options.method).uses_retain:
        return []
    sets = []
    for i, source in enumerate(_sources(retain) or [GENERAL]):
        if str(source) == SELF:
            length = min(options.self_length, max_length - 1)
            samples = options.self_samples
            sets.append(sample_self(model, tokenizer, samples=samples, length=length, seed=options.seed))
        elif str(source) == GENERAL:
            sets.append(load_dataset(general_text(), tokenizer, max_length=max_length, name=GENERAL))
        elif isinstance(source, str | Path):
            sets.append(load_dataset(Path(source), tokenizer, max_length=max_length))
        else:
            name = f"retain {i + 1}"
            sets.append(dataset_from_records(iter(source), tokenizer, max_length=max_length, name=name))
    return sets


def _tokenizer(checkpoint):
    if checkpoint is None:
        raise PieceError(
            "the model's checkpoint is not known (no local folder in its config): give tokenizer= "
            "(and checkpoint= for the names its files store)"
        )
    return checkpoint.load_tokenizer()
