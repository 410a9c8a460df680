"""Hugging Face checkpoints: find one (folder or Hub id), read its layout and tensors lazily, load its
tokenizer, data and model, and write sharded safetensors.

`open_checkpoint` is the one loader every command uses: it reads headers only, and the returned
`Checkpoint` loads the tokenizer, datasets and model when asked, so cheap checks run first.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from piece_surgery.data.dataset import Dataset, load_dataset, load_tokenizer, pad_id
from piece_surgery.data.images import ImageChats, load_processor
from piece_surgery.io.hub import Resolved, resolve
from piece_surgery.models.parts import is_vision_language
from piece_surgery.runtime.dtypes import SAFETENSORS_DTYPES, float_dtype, numel
from piece_surgery.runtime.errors import PieceError, first_line, no_device
from piece_surgery.runtime.options import check_device_name
from piece_surgery.runtime.progress import Progress, working
from piece_surgery.runtime.records import CheckpointIdentity, read_json

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Besides its weights and index, the files that belong to a model: its config, generation config,
# tokenizer (in any of its forms), chat template, processor (image, video) configs, card and licence,
# and the code of a model with custom code. A merged folder copies these from its base and nothing
# else: no stale pickle weights, adapters or optimizer states a loader might pick up instead.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "README.md",
)
_MODEL_FILE_PREFIXES = ("tokenizer", "vocab", "spiece", "sentencepiece", "chat_template", "LICENSE", "NOTICE")
_MODEL_FILE_SUFFIXES = (".tiktoken", ".jinja")


def model_files(folder: Path) -> list[Path]:
    """The files of `folder` that belong to the model besides its weights (MODEL_FILES, tokenizer
    and licence files by name; `.py` files when the config names custom code in `auto_map`)."""
    custom_code = any(
        isinstance(document, dict) and "auto_map" in document
        for document in (_json_or_none(folder / name) for name in ("config.json", "tokenizer_config.json"))
    )
    found = []
    for item in sorted(Path(folder).iterdir()):
        name = item.name
        if not item.is_file() or name.startswith("."):
            continue
        if (
            name in MODEL_FILES
            or name.startswith(_MODEL_FILE_PREFIXES)
            or name.endswith(_MODEL_FILE_SUFFIXES)
            or (custom_code and name.endswith(".py"))
        ):
            found.append(item)
    return found


def _json_or_none(path: Path):
    try:
        return read_json(path, str(path)) if path.is_file() else None
    except PieceError:
        return None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


# ---------------------------------------------------------------- files and layout


def weight_files(folder: Path) -> dict[str, str]:
    """Map each tensor name to the safetensors file holding it (sharded or single-file layout)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PieceError(f"checkpoint '{folder}' is not a folder; give a Hugging Face model folder")
    index = folder / INDEX_FILE
    if index.is_file():
        document = read_json(index, f"checkpoint index '{index}'")
        weight_map = document.get("weight_map") if isinstance(document, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise PieceError(f"checkpoint index '{index}': weight_map must map tensor names to file names")
        outside = sorted(f for f in set(weight_map.values()) if Path(f).name != f or f in ("", ".", ".."))
        if outside:
            # a shard is a file of this folder: never follow an index out of it
            raise PieceError(
                f"checkpoint index '{index}' names '{outside[0]}', which is not a file in the folder"
            )
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise PieceError(f"checkpoint '{folder}' is missing shard '{missing[0]}' named in its index")
        return dict(weight_map)
    if (folder / SINGLE_FILE).is_file():
        return {name: SINGLE_FILE for name in _keys(folder / SINGLE_FILE)}
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise PieceError(
            f"checkpoint '{folder}' has only pickle weights (.bin/.pt), which are not read for safety; "
            "convert it to safetensors first"
        )
    raise PieceError(f"no model.safetensors or {INDEX_FILE} in '{folder}'; is it a model folder?")


def _keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise PieceError(f"cannot read '{path}': corrupt or truncated safetensors file") from exc


def read_layout(folder: Path) -> dict[str, TensorInfo]:
    """Names, shapes, dtypes and files of every tensor, read from the headers only."""
    folder = Path(folder)
    layout: dict[str, TensorInfo] = {}
    by_file: dict[str, list[str]] = {}
    for name, file in weight_files(folder).items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(str(folder / file), "pt") as f:
                keys = set(f.keys())
                for name in names:
                    if name not in keys:
                        raise PieceError(f"shard '{file}' lacks tensor '{name}' named in the index")
                    sl = f.get_slice(name)
                    dtype = SAFETENSORS_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise PieceError(
                            f"tensor '{name}' in '{file}' has dtype {sl.get_dtype()}, which this tool "
                            "does not handle"
                        )
                    layout[name] = TensorInfo(name, tuple(sl.get_shape()), dtype, file)
        except (SafetensorError, OSError) as exc:
            raise PieceError(f"cannot read '{folder / file}': corrupt or truncated safetensors file") from exc
    return layout


class ShardReader:
    """Read tensors one at a time, opening each shard lazily (memory-mapped)."""

    def __init__(self, folder: Path, layout: dict[str, TensorInfo]):
        self.folder = Path(folder)
        self.layout = layout
        self._open: dict[str, Any] = {}

    def get(self, name: str) -> torch.Tensor:
        file = self.layout[name].file
        try:
            if file not in self._open:
                self._open[file] = safe_open(str(self.folder / file), "pt")
            return self._open[file].get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise PieceError(f"cannot read tensor '{name}' from '{file}': corrupt file") from exc

    def close(self) -> None:
        self._open.clear()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shard_metadata(folder: Path) -> dict[str, str]:
    """The safetensors header metadata of the first shard (e.g. {'format': 'pt'})."""
    files = sorted(set(weight_files(folder).values()))
    with safe_open(str(Path(folder) / files[0]), "pt") as f:
        return dict(f.metadata() or {})


def save_shard(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def write_index(out: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def fingerprint(folder: Path, layout: dict[str, TensorInfo]) -> str:
    """A cheap identity of a checkpoint's weights: names, shapes, dtypes, first and last row of each.

    Reads a few KB, not the model; it tells apart different fine-tunes of one architecture.
    """
    digest = hashlib.sha256()
    by_file: dict[str, list[str]] = {}
    for name in sorted(layout):
        by_file.setdefault(layout[name].file, []).append(name)
    for file in sorted(by_file):
        with safe_open(str(Path(folder) / file), "pt") as f:
            for name in by_file[file]:
                info = layout[name]
                digest.update(f"{name}|{list(info.shape)}|{info.dtype}|".encode())
                if info.numel and not info.shape:  # a scalar (a stored buffer): read whole
                    digest.update(f.get_tensor(name).reshape(1).view(torch.uint8).numpy().tobytes())
                elif info.numel:
                    sl = f.get_slice(name)
                    rows = info.shape[0]
                    for part in (sl[0:1], sl[rows - 1 : rows]):
                        digest.update(part.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- devices and dtypes


def storage_dtype(layout: dict[str, TensorInfo]) -> torch.dtype:
    """The dtype most of the floating-point weights are stored in."""
    counts: dict[torch.dtype, int] = {}
    for info in layout.values():
        if info.dtype.is_floating_point:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    return max(counts, key=counts.get) if counts else torch.float32


def pick_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    check_device_name(name)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise no_device(name)
    if name == "mps" and not _mps_available():
        raise no_device(name)
    return torch.device(name)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


# ---------------------------------------------------------------- the loader


@dataclass
class LoadedModel:
    """A model loaded from a checkpoint's files, and where each of its parameters is stored."""

    module: torch.nn.Module
    keys: dict[str, str]  # model parameter name -> tensor name in the checkpoint's files
    # a tied parameter stored under several names: the name in `keys` -> the others (stored_aliases)
    aliases: dict[str, list[str]] = field(default_factory=dict)
    # a tied parameter stored under fewer names than it has: stored name -> the others (unstored_twins)
    twins: dict[str, list[str]] = field(default_factory=dict)

    def parameters(self, names: Iterable[str] | None = None) -> dict[str, torch.nn.Parameter]:
        """The parameters by stored tensor name (all, or the named ones: KeyError for another)."""
        named = dict(self.module.named_parameters())
        by_key = {key: named[name] for name, key in self.keys.items()}
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
        """The token id batches are padded with (the tokenizer's pad token, else EOS, else 0)."""
        return pad_id(self.load_tokenizer())

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
        if context is not None:  # a text longer than the model's context is cut at it
            max_length = min(max_length, context)
        with Progress(None, f"reading {name or Path(path).name}", quiet=quiet) as bar:
            return load_dataset(
                path,
                tokenizer,
                max_length=max_length,
                max_samples=max_samples,
                progress=bar.advance,
                name=name,
                image_chats=self.image_chats if is_vision_language(self.config()) else None,
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
        except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
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
            except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
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
        """The most positions the model takes, as its config says (None if it does not): past it a
        learned position table (GPT-2's) has no row, and rotary models were never trained."""
        config = self._text_config()
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 1:
                return value
        return None

    def check_token_ids(self, dataset: Dataset) -> None:
        """Every token id of `dataset` is a row of the model's embedding table (a tokenizer with
        added tokens and a model not resized would index past it: a crash, or on a GPU a device
        assert, in the middle of a run)."""
        rows = self.vocab_size()
        largest = max((max(e.input_ids) for e in dataset.examples if e.input_ids), default=-1)
        if rows is not None and largest >= rows:
            raise PieceError(
                f"'{dataset.name}' has token id {largest}, but the model's embedding table has {rows} "
                "rows: the tokenizer has tokens the model lacks; resize the model's embeddings "
                "(and save it), or use the tokenizer the model was trained with"
            )

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

    def load_model(
        self,
        *,
        device: str = "auto",
        dtype: str = "auto",
        quiet: bool = True,
        attn_implementation: str | None = None,
    ) -> LoadedModel:
        """Load the model (load_causal_lm: safetensors only, never pickle) and map its parameters
        to the tensor names of the files."""
        with working(f"loading {self.identity.name}", quiet=quiet):
            module = load_causal_lm(
                self.folder,
                dtype=self.dtype(dtype),
                device=pick_device(device),
                trust_remote_code=self.trust_remote_code,
                layout=self.layout,
                attn_implementation=attn_implementation,
            )
        layout = self.layout
        return LoadedModel(
            module,
            parameter_keys(module, layout),
            stored_aliases(module, layout),
            unstored_twins(module, layout),
        )


def model_dtype(name: str) -> torch.dtype:
    """A dtype a model may be loaded in, by name (float32, bfloat16, float16 and their short names)."""
    dtype = float_dtype(name)
    if dtype is None or dtype == torch.float64:
        raise PieceError(f"unknown dtype '{name}'; use auto, float32, bfloat16 or float16")
    return dtype


def open_checkpoint(ref: str, *, what: str = "model", trust_remote_code: bool = False) -> Checkpoint:
    """Resolve a folder or Hub repo id and read its layout and identity (headers and a few KB only).

    A folder that also holds a PEFT adapter is refused before any work: transformers, given such a
    folder, loads the base the adapter names and the adapter, not the folder's own weights."""
    source = resolve(str(ref), what=what)
    if (source.path / ADAPTER_CONFIG).is_file():
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


def load_causal_lm(
    folder: Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool = False,
    layout: dict[str, TensorInfo] | None = None,
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """Load a causal LM, or a vision-language model (auto_model_class), from safetensors only
    (never pickle), quietly, on `device`.

    Every weight the model has must come from the files: a missing one (transformers would fill
    it with random values) or one of the wrong shape is an error that names it.
    """
    import transformers
    from transformers import AutoConfig

    layout = layout if layout is not None else read_layout(folder)
    transformers.utils.logging.disable_progress_bar()
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        if getattr(config, "quantization_config", None):
            raise PieceError(
                f"'{folder}' has a quantization_config in config.json: transformers would quantize the "
                "weights on loading, so the model would not be the files' weights; give an unquantized "
                "checkpoint"
            )
        _check_shapes(config, layout, trust_remote_code)
        model, info = auto_model_class(config).from_pretrained(
            folder,
            config=config,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            **({"attn_implementation": attn_implementation} if attn_implementation else {}),
        )
    except PieceError:
        raise
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        raise PieceError(f"cannot load a language model from '{folder}': {first_line(exc)}") from exc
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    _check_loading_info(folder, info)
    return model.to(device)


def auto_model_class(config):
    """The transformers Auto class a config's model loads with: AutoModelForImageTextToText for a
    vision-language model (LLaVA, Qwen2-VL, Idefics3, SmolVLM, Gemma 3 with its vision tower),
    AutoModelForCausalLM otherwise. PieceError for a vision-language model under transformers 4:
    its loader renames stored names by rules piece-surgery cannot read, so no pairing is exact."""
    from transformers import AutoModelForCausalLM

    if not is_vision_language(config):
        return AutoModelForCausalLM
    try:
        import transformers.conversion_mapping  # noqa: F401  (transformers 5's loader)
        from transformers import AutoModelForImageTextToText
    except ImportError:
        raise PieceError(
            f"this is a vision-language checkpoint ({getattr(config, 'model_type', 'unknown')}); "
            "piece-surgery reads those with transformers 5 or later: pip install -U transformers"
        ) from None
    return AutoModelForImageTextToText


def model_skeleton(config, *, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model a config describes (auto_model_class), on the meta device: its names, shapes and
    ties, no weights."""
    model_class = auto_model_class(config)
    with torch.device("meta"):
        return model_class.from_config(config, trust_remote_code=trust_remote_code)


def _check_shapes(config, layout: dict[str, TensorInfo], trust_remote_code: bool) -> None:
    """Compare the files' tensor shapes with those the config asks for (on an empty meta model)."""
    skeleton = model_skeleton(config, trust_remote_code=trust_remote_code)
    expected = dict(skeleton.named_parameters())
    for name, key in parameter_keys(skeleton, layout).items():
        if tuple(layout[key].shape) != tuple(expected[name].shape):
            raise PieceError(
                f"tensor '{key}' is {list(layout[key].shape)} in the checkpoint but the config expects "
                f"{list(expected[name].shape)}: the weights and config.json do not match"
            )


def check_weights_match(skeleton: torch.nn.Module, layout: dict[str, TensorInfo], folder: Path) -> None:
    """What loading would find, told from the names alone (on the meta-device skeleton, before any
    weight is read): every weight the model has is stored, under one of its tied names."""
    missing = [names[0] for names, stored in _tied_groups(skeleton, layout) if not stored]
    used = set(parameter_keys(skeleton, layout).values())
    unexpected = [name for name in layout if name not in used] if missing else []
    _check_loading_info(folder, {"missing_keys": missing, "unexpected_keys": unexpected})


def _check_loading_info(folder: Path, info: dict) -> None:
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    if missing and unexpected:
        raise PieceError(
            f"the config in '{folder}' does not match its weights: {len(missing)} of the model's weights "
            f"are not in the files (e.g. '{missing[0]}') and {len(unexpected)} tensors in the files are "
            f"unused (e.g. '{unexpected[0]}')"
        )
    if missing:
        raise PieceError(
            f"checkpoint '{folder}' lacks {len(missing)} of the model's weights (first: '{missing[0]}'); "
            "transformers would fill them with random values"
        )


def parameter_keys(model: torch.nn.Module, layout: dict[str, TensorInfo]) -> dict[str, str]:
    """Map each (deduplicated) model parameter name to its tensor name in the checkpoint files.

    A tied parameter (one tensor under several names, e.g. the input embedding and the LM head)
    appears once in named_parameters(): it maps to the first of its names the files store. Names
    pair as loading pairs them (stored_names): older files without the base-model prefix, and
    vision-language layouts that transformers renames on loading.
    """
    return {names[0]: stored[0] for names, stored in _tied_groups(model, layout) if stored}


def stored_aliases(model: torch.nn.Module, layout: dict[str, TensorInfo]) -> dict[str, list[str]]:
    """For a tied parameter whose files store several of its names (common after fine-tuning):
    the stored name parameter_keys maps it to -> the other stored names. transformers ties them
    again on loading only while their stored values agree, so a change to one is a change to all."""
    return {stored[0]: stored[1:] for _, stored in _tied_groups(model, layout) if len(stored) > 1}


def unstored_twins(model: torch.nn.Module, layout: dict[str, TensorInfo]) -> dict[str, list[str]]:
    """For a tied parameter whose files store some of its names but not all: each stored name ->
    the parameter names the files do not store, which load as it (a head tied to an embedding the
    files store once). A delta records them (`loads_as`): changing the stored tensor changes them."""
    names_stored = stored_names(model, layout)
    return {
        key: [n for n in names if n not in names_stored]
        for names, stored in _tied_groups(model, layout, names_stored)
        for key in stored
        if len(stored) < len(names)
    }


def tied_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """Parameter name -> the other names of the same tensor, for tied parameters."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return {n: [o for o in names if o != n] for names in groups.values() if len(names) > 1 for n in names}


def _tied_groups(
    model: torch.nn.Module, layout: dict[str, TensorInfo], names_stored: dict[str, str] | None = None
) -> list[tuple[list[str], list[str]]]:
    """(every name of a parameter, in named_parameters order; those of them the files store)."""
    names_stored = stored_names(model, layout) if names_stored is None else names_stored
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    out = []
    for names in groups.values():
        stored = [names_stored[n] for n in names if n in names_stored]
        out.append((names, list(dict.fromkeys(stored))))
    return out


def stored_names(model: torch.nn.Module, stored: Iterable[str]) -> dict[str, str]:
    """The model's state_dict names (parameters under every tied name, and buffers) -> the stored
    tensor each loads from, for the names among `stored` that loading uses as they are.

    The pairing is transformers' own: from_pretrained renames each stored name with the model's
    conversion mapping (transformers.conversion_mapping; vision-language models' layouts, legacy
    names) and adds or drops the base-model prefix; this runs the same renaming over the stored
    names and inverts it, so it is exact and needs names only (a meta-device skeleton will do).
    A stored tensor loading converts (experts fused into one tensor: not one-to-one) is left out.
    With transformers 4, which has no conversion mapping, only the prefix rule applies.
    """
    expected = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "") or ""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4
        return _stored_names_by_prefix(expected, prefix, stored)
    transforms = get_model_conversion_mapping(model)  # fresh objects: some carry matching state
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    found: dict[str, str] = {}
    for key in sorted(stored, key=_dot_natural):  # the order loading visits them in
        name, converted = rename_source_key(key, renamings, converters, prefix, expected)
        if name not in expected and key in expected:  # loading's own fallback: the name as stored
            name, converted = rename_source_key(key, [], [], prefix, expected)
        if converted is not None or name not in expected:
            continue
        if name not in found or key == name:  # two stored names for one: the exact one wins
            found[name] = key
    return found


def _dot_natural(name: str) -> list:
    """Sort key: dotted parts, numbers as numbers (`layers.10` after `layers.9`), as loading sorts."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def _stored_names_by_prefix(expected: dict, prefix: str, stored: Iterable[str]) -> dict[str, str]:
    stored = set(stored)
    found = {}
    for name in expected:
        candidates = [name]
        if prefix and name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1 :])
        elif prefix:
            candidates.append(f"{prefix}.{name}")
        key = next((c for c in candidates if c in stored), None)
        if key is not None:
            found[name] = key
    return found


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in backward (transformers' own per-layer checkpointing)."""
    # transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias)
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
        model, "gradient_checkpointing_enable", None
    )
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise PieceError(f"{type(model).__name__} does not support --gradient-checkpointing; leave it off")
    enable()
