"""A Hugging Face checkpoint a command works on: `open_checkpoint` finds it (a folder or a Hub id)
and reads its headers only; the returned `Checkpoint` loads the tokenizer, datasets and model when
asked, so cheap checks run first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from piece_surgery.data.batches import pad_id
from piece_surgery.data.dataset import check_token_ids, load_dataset, load_tokenizer
from piece_surgery.data.examples import Dataset
from piece_surgery.data.images import ImageChats, load_processor
from piece_surgery.io.hub import Resolved, resolve
from piece_surgery.io.sniff import ADAPTER, ADAPTER_CONFIG, sniff
from piece_surgery.models.fused import ParameterSlice, StoredSlice, fused_slices
from piece_surgery.models.layout import ShardReader, TensorInfo, fingerprint, read_layout, storage_dtype
from piece_surgery.models.loading import (
    Placement,
    config_errors,
    context_length,
    load_causal_lm,
    model_dtype,
    model_skeleton,
)
from piece_surgery.models.pairing import parameter_keys, stored_aliases, stored_names, unstored_twins
from piece_surgery.models.parts import is_vision_language
from piece_surgery.runtime.errors import PieceError, first_line
from piece_surgery.runtime.progress import Progress, working
from piece_surgery.runtime.records import CheckpointIdentity


@dataclass
class LoadedModel:
    """A model loaded from a checkpoint's files, and where each of its parameters is stored."""

    module: torch.nn.Module
    keys: dict[str, str]  # model parameter name -> tensor name in the checkpoint's files
    # a tied parameter stored under several names: the name in `keys` -> the others (stored_aliases)
    aliases: dict[str, list[str]] = field(default_factory=dict)
    # a tied parameter stored under fewer names than it has: stored name -> the others (unstored_twins)
    twins: dict[str, list[str]] = field(default_factory=dict)
    # a stored tensor loading fuses into part of a parameter (an expert's): stored name -> its place
    slices: dict[str, StoredSlice] = field(default_factory=dict)

    def parameters(
        self, names: Iterable[str] | None = None
    ) -> dict[str, torch.nn.Parameter | ParameterSlice]:
        """The parameters by stored tensor name (all, or the named ones: KeyError for another); a
        stored tensor that is part of a parameter (`slices`) is a ParameterSlice of it."""
        named = dict(self.module.named_parameters())
        by_key: dict = {key: named[name] for name, key in self.keys.items()}
        by_key.update(
            {key: ParameterSlice(named[s.param], s) for key, s in self.slices.items() if s.param in named}
        )
        return by_key if names is None else {n: by_key[n] for n in names}


@dataclass
class Checkpoint:
    """A checkpoint a command works on: where it is, and its tensor layout and identity (read from
    the headers). The tokenizer, data and model are loaded when asked for."""

    source: Resolved
    layout: dict[str, TensorInfo]
    identity: CheckpointIdentity
    trust_remote_code: bool = False
    _tokenizer: Any = field(default=None, init=False, repr=False)  # loaded once, on first use
    _config: Any = field(default=None, init=False, repr=False)  # read once, on first use
    _image_chats: Any = field(default=None, init=False, repr=False)  # built on the first image record

    @property
    def folder(self) -> Path:
        return self.source.path

    def reader(self) -> ShardReader:
        return ShardReader(self.folder, self.layout)

    def dtype(self, name: str = "auto") -> torch.dtype:
        """`auto`: the dtype the weights are stored in; else a float dtype by name."""
        if name == "auto":
            return storage_dtype(self.layout)
        return model_dtype(name)

    def load_tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.folder, trust_remote_code=self.trust_remote_code)
        return self._tokenizer

    @property
    def pad_id(self) -> int:
        """The token id batches are padded with (the tokenizer's pad token, else EOS, else 0: the
        first that is a row of the model's embedding table)."""
        return pad_id(self.load_tokenizer(), self.vocab_size())

    def load_data(
        self,
        path: Path,
        *,
        max_length: int = 512,
        max_samples: int | None = None,
        quiet: bool = True,
        name: str | None = None,
    ) -> Dataset:
        tokenizer = self.load_tokenizer()
        context = self.context_length()
        cut = context is not None and context < max_length  # a text is cut at the model's context
        max_length = min(max_length, context) if cut else max_length
        with Progress(None, f"reading {name or Path(path).name}", quiet=quiet) as bar:
            return load_dataset(
                path,
                tokenizer,
                max_length=max_length,
                max_samples=max_samples,
                progress=bar.advance,
                name=name,
                image_chats=self.image_chats if is_vision_language(self.config()) else None,
                context=context if cut else None,
            )

    def image_chats(self) -> ImageChats:
        """The tokenizer of image records (the checkpoint's processor), built on first use."""
        if self._image_chats is None:
            config = self.config()
            ids = {getattr(config, k, None) for k in ("image_token_id", "image_token_index")}
            processor = load_processor(self.folder, trust_remote_code=self.trust_remote_code)
            self._image_chats = ImageChats(processor, frozenset(i for i in ids if isinstance(i, int)))
        return self._image_chats

    def skeleton(self) -> torch.nn.Module:
        """The model of this checkpoint's config on the meta device (names, shapes, ties; no
        weights): PieceError for a config transformers cannot build."""
        import transformers
        from transformers import AutoConfig

        verbosity = transformers.utils.logging.get_verbosity()
        transformers.utils.logging.set_verbosity_error()
        try:
            config = AutoConfig.from_pretrained(self.folder, trust_remote_code=self.trust_remote_code)
            return model_skeleton(config, trust_remote_code=self.trust_remote_code)
        except config_errors() as exc:
            raise PieceError(
                f"cannot read the model config of '{self.identity.name}': {first_line(exc)}"
            ) from exc
        finally:
            transformers.utils.logging.set_verbosity(verbosity)

    def config(self):
        """The checkpoint's transformers config (PieceError if it cannot be read); read once."""
        from transformers import AutoConfig

        if self._config is None:
            try:
                self._config = AutoConfig.from_pretrained(
                    self.folder, trust_remote_code=self.trust_remote_code
                )
            except config_errors() as exc:
                raise PieceError(
                    f"cannot read the model config of '{self.identity.name}': {first_line(exc)}"
                ) from exc
        return self._config

    def _text_config(self):
        return self.config().get_text_config()

    def vocab_size(self) -> int | None:
        """Rows of the model's input embedding table, as its config says (None if it does not)."""
        size = getattr(self._text_config(), "vocab_size", None)
        return size if isinstance(size, int) and size > 0 else None

    def context_length(self) -> int | None:
        """The most positions the model takes, as its config says (models.loading.context_length)."""
        return context_length(self.config())

    def check_token_ids(self, dataset: Dataset) -> None:
        """Every token id of `dataset` is a row of the model's embedding table (a tokenizer with
        added tokens and a model not resized would index past it: a crash, or on a GPU a device
        assert, in the middle of a run)."""
        check_token_ids(dataset, self.vocab_size())

    def twins(self) -> dict[str, list[str]]:
        """unstored_twins of this checkpoint's model, from its meta-device skeleton."""
        return unstored_twins(self.skeleton(), self.layout)

    def used_names(self) -> dict[str, str]:
        """The stored tensors the model uses (its parameters and persistent buffers): stored name ->
        the model's name for it. A stored tensor not here is one loading ignores."""
        found = {}
        for name, stored in stored_names(self.skeleton(), self.layout).items():
            found.setdefault(stored, name)
        return found

    def placement(self, device: str = "auto", dtype: str = "auto", attn: str | None = None) -> Placement:
        """Where and how this checkpoint's model runs (models.loading.Placement; `auto` dtype: the
        dtype its weights are stored in)."""
        return Placement.resolve(device, dtype, storage_dtype(self.layout), attn)

    def load_model(
        self,
        *,
        device: str = "auto",
        dtype: str = "auto",
        quiet: bool = True,
        attn_implementation: str | None = None,
        placement: Placement | None = None,
    ) -> LoadedModel:
        """Load the model (load_causal_lm: safetensors only, never pickle) as `placement` says
        (else as `device`, `dtype` and `attn_implementation` do), and map its parameters to the
        tensor names of the files."""
        placement = placement or self.placement(device, dtype, attn_implementation)
        with working(f"loading {self.identity.name}", quiet=quiet):
            module = load_causal_lm(
                self.folder,
                dtype=placement.dtype,
                device=placement.device,
                trust_remote_code=self.trust_remote_code,
                layout=self.layout,
                attn_implementation=placement.attn_implementation,
            )
        layout = self.layout
        slices = fused_slices(module, layout)
        self._check_slices_loaded(module, slices)
        return LoadedModel(
            module,
            parameter_keys(module, layout),
            stored_aliases(module, layout),
            unstored_twins(module, layout),
            slices,
        )

    def _check_slices_loaded(self, module: torch.nn.Module, slices: dict[str, StoredSlice]) -> None:
        """The first and last row of every stored tensor loading fused into a parameter are where
        fused_slices says (a few KB read): a transformers whose loading placed them elsewhere would
        put every mask and delta of them on the wrong entries. PieceError naming the tensor if not."""
        params = dict(module.named_parameters())
        with self.reader() as reader:
            for name, s in slices.items():
                held = s.of(params[s.param].detach())
                for row, stored in zip((0, -1), reader.edge_rows(name), strict=True):
                    if not torch.equal(held[row].cpu(), stored.to(held.dtype)):
                        raise PieceError(
                            f"this transformers loaded '{name}' elsewhere in '{s.param}' than its conversion "
                            "mapping says: piece-surgery cannot pair this checkpoint's experts with it; "
                            "report it, with the transformers version"
                        )


def open_checkpoint(ref: str, *, what: str = "model", trust_remote_code: bool = False) -> Checkpoint:
    """Resolve a folder or Hub repo id and read its layout and identity (headers and a few KB only).

    A folder that also holds a PEFT adapter is refused before any work: transformers, given such a
    folder, loads the base the adapter names and the adapter, not the folder's own weights."""
    source = resolve(str(ref), what=what)
    if ADAPTER in sniff(source.path):
        raise PieceError(
            f"{what} '{ref}' also holds a PEFT adapter ({ADAPTER_CONFIG}): transformers would load the "
            "base the adapter names and the adapter, not this folder's weights; move the adapter's "
            "files out (or give the adapter to `piece-surgery import`)"
        )
    layout = read_layout(source.path)
    identity = CheckpointIdentity(
        name=source.name,
        repo_id=source.repo_id,
        revision=source.revision,
        fingerprint=fingerprint(source.path, layout),
    )
    return Checkpoint(source, layout, identity, trust_remote_code=trust_remote_code)
