"""A checkpoint's files: which safetensors file holds each tensor (one file or sharded with an
index), their names, shapes and dtypes read from the headers alone, lazy reading shard by shard,
writing shards, the fingerprint that identifies a checkpoint, and the other files of a model.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from piece_surgery.io.sniff import INDEX_FILE, SINGLE_FILE
from piece_surgery.runtime.dtypes import SAFETENSORS_DTYPES, numel
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.json_files import read_json

# Besides its weights and index, the files of a model that transformers' loaders read: its config
# and generation config; every tokenizer file (tokenizer_config.json, tokenizer.json, the legacy
# special-token and added-token maps, and each vocabulary file a transformers tokenizer class names
# in its `vocab_files_names`, plus the Mistral and tiktoken files it converts); every chat template
# form (chat_template.jinja, the processors' legacy chat_template.json, and the templates of the
# additional_chat_templates/ folder); the processor, image, video and audio-tokenizer configs; and,
# for people, the card and the licence and notice files. A merged folder copies these from its base
# and nothing else: no stale pickle weights, adapters or optimizer states a loader might pick up
# instead. tests/models/test_layout_files.py checks the list against transformers' own loaders.
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "added_tokens.json",
    # the vocabulary files of transformers' tokenizer classes (their vocab_files_names)
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.model",
    "sentencepiece.bpe.model",
    "spm.model",
    "spm_char.model",
    "source.spm",
    "target.spm",
    "bpe.codes",
    "dict.txt",
    "emoji.json",
    "entity_vocab.json",
    "normalizer.json",
    "prophetnet.tokenizer",
    "byte_maps.json",
    "word_pronunciation.json",
    "word_shape.json",
    "target_vocab.json",
    "vocab-src.json",
    "vocab-tgt.json",
    # what transformers converts when a repo has no tokenizer.json (Mistral's, tiktoken's)
    "tekken.json",
    "tiktoken.model",
)
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
CHAT_TEMPLATE_FOLDER = "additional_chat_templates"  # one `<name>.jinja` per named template
PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "audio_tokenizer_config.json",
)
CARD_FILES = ("README.md",)
MODEL_FILES = CONFIG_FILES + TOKENIZER_FILES + CHAT_TEMPLATE_FILES + PROCESSOR_FILES + CARD_FILES
# by name: versioned sentencepiece files (tokenizer.model.v3, ...), tiktoken vocabularies, and the
# licence, notice and use-policy files a licence asks to pass on
_TOKENIZER_PATTERN = re.compile(r"tokenizer\.model\.\w+|.+\.tiktoken")
_MODEL_FILE_PATTERN = re.compile(rf"{_TOKENIZER_PATTERN.pattern}|(LICENSE|NOTICE|USE_POLICY)([._-].*)?")


def model_files(folder: Path) -> list[Path]:
    """The files of `folder` that belong to the model besides its weights, in order: MODEL_FILES,
    the versioned tokenizer files its tokenizer_config.json names (`fast_tokenizer_files`), the
    `.jinja` templates of its additional_chat_templates/ folder (as paths inside it), the tokenizer
    files of a processor's second tokenizer (a folder named `*tokenizer*`), the files
    _MODEL_FILE_PATTERN names, and its `.py` files when its config or tokenizer config names custom
    code (`auto_map`)."""
    folder = Path(folder)
    configs = {name: _json_or_none(folder / name) for name in ("config.json", "tokenizer_config.json")}
    custom_code = any(isinstance(d, dict) and "auto_map" in d for d in configs.values())
    tokenizer_config = configs["tokenizer_config.json"]
    versioned = tokenizer_config.get("fast_tokenizer_files") if isinstance(tokenizer_config, dict) else None
    named = set(MODEL_FILES) | {f for f in versioned or () if isinstance(f, str) and Path(f).name == f}
    found = []
    for item in sorted(folder.iterdir()):
        name = item.name
        if name == CHAT_TEMPLATE_FOLDER and item.is_dir():
            found += [t for t in sorted(item.iterdir()) if t.suffix == ".jinja" and t.is_file()]
        elif item.is_dir() and "tokenizer" in name and not name.startswith("."):
            found += _tokenizer_folder_files(item)
        elif (item.is_file() and not name.startswith(".")) and (
            name in named or _MODEL_FILE_PATTERN.fullmatch(name) or (custom_code and name.endswith(".py"))
        ):
            found.append(item)
    return found


_TOKENIZER_FOLDER_FILES = frozenset(TOKENIZER_FILES + CHAT_TEMPLATE_FILES)


def _tokenizer_folder_files(folder: Path) -> list[Path]:
    """The tokenizer files of a processor's second tokenizer, which transformers saves in a folder
    named after the processor's attribute (InstructBLIP's `qformer_tokenizer/`, say)."""
    found = []
    for item in sorted(folder.iterdir()):
        if item.name == CHAT_TEMPLATE_FOLDER and item.is_dir():
            found += [t for t in sorted(item.iterdir()) if t.suffix == ".jinja" and t.is_file()]
        elif item.is_file() and (
            item.name in _TOKENIZER_FOLDER_FILES or _TOKENIZER_PATTERN.fullmatch(item.name)
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

    def edge_rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The first and the last row of a tensor with at least one dimension (reads those only)."""
        file = self.layout[name].file
        try:
            if file not in self._open:
                self._open[file] = safe_open(str(self.folder / file), "pt")
            piece = self._open[file].get_slice(name)
            rows = self.layout[name].shape[0]
            return piece[0:1][0], piece[rows - 1 : rows][0]
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
    """A safetensors file of `tensors` and header `metadata`: the same inputs give the same bytes."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    if len(metadata or {}) > 1:
        _sort_header_metadata(Path(path))


def _sort_header_metadata(path: Path) -> None:
    """safetensors writes the header's metadata in a hash map's order, which changes from run to run
    (0.8): the header is written again with the metadata sorted. Its JSON keeps its length (the same
    content; safetensors pads a header with spaces), so the tensor data stays where it is."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:  # never longer for the same content; left as written if it were
            f.seek(8)
            f.write(text + b" " * (size - len(text)))


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


def storage_dtype(layout: dict[str, TensorInfo]) -> torch.dtype:
    """The dtype most of the floating-point weights are stored in."""
    counts: dict[torch.dtype, int] = {}
    for info in layout.values():
        if info.dtype.is_floating_point:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    return max(counts, key=counts.get) if counts else torch.float32
