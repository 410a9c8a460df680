"""The CLI's recipes on objects in memory: `score` a loaded model on records (a list, or a
`datasets.Dataset`), `sparsify` it with a mask (then any training loop trains only the masked
entries), and save the delta `train` would write (SparseModel.save_delta)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from piece_surgery.data.batches import pad_id
from piece_surgery.data.dataset import check_token_ids, dataset_from_records, load_dataset
from piece_surgery.data.examples import Dataset
from piece_surgery.evaluation.generation import embedding_rows
from piece_surgery.formats.artifacts import open_mask
from piece_surgery.formats.mask import Mask
from piece_surgery.integrations.models import check_model, check_weights, checkpoint_of, loaded
from piece_surgery.integrations.sparse_model import HOLDER, SparseModel
from piece_surgery.models.checkpoint import Checkpoint
from piece_surgery.models.eligible import DEFAULT_EXCLUDE
from piece_surgery.models.loading import context_length
from piece_surgery.runtime.errors import PieceError, quote
from piece_surgery.runtime.options import RunOptions
from piece_surgery.scoring.inputs import check_data, check_each_set_once
from piece_surgery.scoring.methods import method_named
from piece_surgery.scoring.options import CHAT, GENERAL, NAMED_SETS, SELF, ScoreOptions
from piece_surgery.scoring.retain import general_text, sample_chat, sample_self
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
    include: Sequence[str] | str = (),
    exclude: Sequence[str] | str | None = None,
    seed: int = 0,
    **options: Any,
) -> Mask:
    """The mask `piece-surgery score` would write, for a model loaded in memory: a model that holds
    its checkpoint's weights (checked: check_weights), so the mask records that checkpoint.

    `data`: the domain's records, as `.jsonl` records are (a string is a text; objects with `text`,
    `prompt`+`response` or `messages`): a list, or a `datasets.Dataset` (its rows); or a data file
    as a `pathlib.Path`. Given exactly when the method reads data (not for magnitude or random).
    `retain` (piece-r): "general" (the shipped set, the default), "self" or "chat" (text the model
    writes), records as `data` takes them, a data file as a Path, or a list of these sources
    (`["general", records]`). `checkpoint`: the folder or Hub repo id the model was loaded from
    (default: its config's `name_or_path` when that is a local folder), which names the mask's
    tensors as its files store them and records the model's identity. `tokenizer` defaults to the
    checkpoint's. `include`/`exclude`: a regex or a list of them. Other keyword arguments are
    ScoreOptions fields (retain_labels, retain_damping, self_samples, self_length, normalize, ...).

    Returns a Mask (formats/mask.py; `save_mask(mask, path)` writes it). PieceError, in one line,
    for bad records or options, or a model that is not its checkpoint's (names, shapes, values)."""
    sources = _retain_sources(retain)
    score_options = _score_options(method, density, batch_size, include, exclude, seed, options, sources)
    check_data(method, data, flag="data")
    run = RunOptions(max_length=max_length)  # what the mask records, as the CLI's
    if hasattr(check_model(model), HOLDER):
        raise PieceError("this model is sparsified: score it before sparsify(), or unsparsify() it first")
    ckpt = checkpoint_of(model, checkpoint)
    held = loaded(model, ckpt)
    if ckpt is not None:
        check_weights(held, ckpt)
    tokenizer = tokenizer or _tokenizer(ckpt)
    context = context_length(model.config) if hasattr(model, "config") else None
    max_length = min(max_length, context) if context else max_length  # as the CLI reads data
    needs_data = method_named(method).needs_data
    dataset = _dataset(data, tokenizer, max_length, "data") if needs_data else None
    retain_sets = _retain_sets(sources, score_options, model, tokenizer, max_length)
    for read in [dataset, *retain_sets]:
        if read is not None:
            check_token_ids(read, embedding_rows(model))
    mask, _ = score_model(
        held,
        dataset,
        score_options,
        retain=retain_sets,
        identity=ckpt.identity if ckpt is not None else None,
        run=run,
        pad_id=pad_id(tokenizer, embedding_rows(model)),
    )
    return mask


def sparsify(
    model: torch.nn.Module, mask: Mask | str | Path, *, checkpoint: str | Path | None = None
) -> SparseModel:
    """Make only `mask`'s entries of `model` trainable, in place: every weight is frozen, and the k
    selected values of each masked tensor become fp32 parameters of the model (under
    `model.piece_surgery`), which any optimizer over `p for p in model.parameters() if
    p.requires_grad` trains; the model runs its own forward (gradients reach the values through
    module hooks), and its weights follow the values before every forward pass and state_dict().
    `mask`: a Mask (score, load_mask) or a mask file's path or Hub repo id, as `train --mask` takes.
    Returns the handle that saves the delta and undoes it all (SparseModel). PieceError for a mask
    of another model (its tensors, or the checkpoint it was scored on), or a model that is not its
    checkpoint's. `checkpoint` as for `score`."""
    check_model(model)
    if isinstance(mask, str | Path):
        mask = open_mask(mask)
    elif not isinstance(mask, Mask):
        raise PieceError(
            f"mask must be a Mask (from score or load_mask) or a mask file's path, got {type(mask).__name__}"
        )
    return SparseModel(model, mask, checkpoint_of(model, checkpoint))


def _score_options(method, density, batch_size, include, exclude, seed, options, sources) -> ScoreOptions:
    """The ScoreOptions record of score's arguments (it checks their types and rules)."""
    known = set(ScoreOptions.__dataclass_fields__) - {"given", "retain"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise PieceError(f"score() has no option '{unknown[0]}'; it takes {', '.join(sorted(known))}")
    return ScoreOptions(
        method=method,
        density=density,
        batch_size=batch_size,
        include=_patterns(include, "include"),
        exclude=_patterns(DEFAULT_EXCLUDE if exclude is None else exclude, "exclude"),
        seed=seed,
        **options,
    ).with_retain([_source_name(s) for s in sources])


def _patterns(value: Any, name: str) -> list:
    """A regex or a sequence of them, as a list (a string is one pattern, not its characters)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list | tuple):
        raise PieceError(f"{name} must be a regex or a list of them, got {type(value).__name__}")
    return list(value)


def _retain_sources(retain: Any) -> list:
    """`retain` as a list of sources, each a named set (general, self, chat), a data file (Path) or
    records (a list or a datasets.Dataset). A list whose items are all sources is a list of them;
    a list of records (strings that are not a set's name, objects) is one source."""
    if retain is None:
        return []
    if isinstance(retain, str | Path | Mapping) or _is_dataset(retain):
        return [_source(retain)]
    if not isinstance(retain, list | tuple):
        raise PieceError(
            "retain must be general, self, chat, records (a list, as data takes them), a data file "
            f"(Path) or a list of these, got {type(retain).__name__}"
        )
    sources = [item for item in retain if _is_source(item)]
    if not sources:
        return [list(retain)] if retain else []
    if len(sources) < len(retain):
        raise PieceError(
            "retain mixes sets (general, self, chat, a Path, a list of records) with single records: "
            "give the records as one list of their own, e.g. retain=['general', ['some text']]"
        )
    return list(retain)


def _is_source(item: Any) -> bool:
    if isinstance(item, str):
        return item in NAMED_SETS
    return isinstance(item, Path | list | tuple) or _is_dataset(item)


def _source(item: Any) -> Any:
    if isinstance(item, str) and item not in NAMED_SETS:
        raise PieceError(
            f"retain '{quote(item)}' is not general, self or chat: give texts as records in a list "
            "(['...']), or a data file as a pathlib.Path"
        )
    if isinstance(item, Mapping):
        raise PieceError("retain is one record (a dict): give records in a list ([record] for one)")
    return item


def _source_name(source: Any) -> str:
    """How ScoreOptions names a retain source: a set by its name, a file by its path."""
    return source if isinstance(source, str) else str(source) if isinstance(source, Path) else "records"


def _is_dataset(value: Any) -> bool:
    """A datasets.Dataset (or anything with columns that iterates its rows)."""
    return hasattr(value, "column_names") and hasattr(value, "__iter__")


def _dataset(data: Any, tokenizer, max_length: int, name: str) -> Dataset:
    """Records (or a data file, given as a Path) tokenized as the CLI tokenizes a data file."""
    if isinstance(data, Path):
        return load_dataset(data.expanduser(), tokenizer, max_length=max_length)
    return dataset_from_records(_rows(data, name), tokenizer, max_length=max_length, name=name)


def _rows(data: Any, what: str) -> Iterable:
    if isinstance(data, str | bytes):
        raise PieceError(
            f"{what} is one string: give records in a list (['...'] for one text), or a data file as "
            "a pathlib.Path"
        )
    if isinstance(data, Mapping):
        raise PieceError(f"{what} is one record (a dict): give records in a list ([record] for one)")
    if not isinstance(data, Iterable) or isinstance(data, torch.Tensor):
        raise PieceError(f"{what} must be records (a list or a datasets.Dataset), got {type(data).__name__}")
    return iter(data)


def _retain_sets(sources: list, options: ScoreOptions, model, tokenizer, max_length: int) -> list[Dataset]:
    """The retain sets piece-r reads, as the CLI reads them (text the model writes: written now)."""
    if not method_named(options.method).uses_retain:
        return []
    sets, pad = [], pad_id(tokenizer, embedding_rows(model))
    check_each_set_once(sources or [], flag="retain")
    for i, source in enumerate(sources or [GENERAL]):
        named = source if isinstance(source, str) else None
        if named == SELF:
            length = min(options.self_length, max_length - 1)
            samples, seed = options.self_samples, options.seed
            sets.append(sample_self(model, tokenizer, samples=samples, length=length, seed=seed, pad_id=pad))
        elif named == CHAT:  # an answer takes at most half the positions: the instruction fits beside it
            length = min(options.self_length, max_length // 2)
            sets.append(
                sample_chat(
                    model, tokenizer, length=length, seed=options.seed, max_length=max_length, pad_id=pad
                )
            )
        elif named == GENERAL:
            sets.append(load_dataset(general_text(), tokenizer, max_length=max_length, name=GENERAL))
        else:
            sets.append(_dataset(source, tokenizer, max_length, f"retain {i + 1}"))
    return sets


def _tokenizer(checkpoint: Checkpoint | None):
    if checkpoint is None:
        raise PieceError(
            "the model's checkpoint is not known (no local folder in its config): give tokenizer= "
            "(and checkpoint= for the names its files store)"
        )
    return checkpoint.load_tokenizer()
