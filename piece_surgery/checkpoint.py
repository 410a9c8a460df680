"""Hugging Face checkpoints on disk: tensor layout, lazy shard reading, atomic sharded writing."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from piece_surgery.errors import PieceError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def weight_files(folder: Path) -> dict[str, str]:
    """Map each tensor name to the safetensors file holding it (sharded or single-file layout)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PieceError(f"checkpoint '{folder}' is not a folder; give a Hugging Face model folder")
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise PieceError(f"checkpoint index '{index}' is not valid JSON with a weight_map") from exc
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
                    dtype = _ST_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        dtype = getattr(torch, sl.get_dtype().lower(), torch.uint8)
                    layout[name] = TensorInfo(name, tuple(sl.get_shape()), dtype, file)
        except (SafetensorError, OSError) as exc:
            raise PieceError(f"cannot read '{folder / file}': corrupt or truncated safetensors file") from exc
    return layout


class ShardReader:
    """Read tensors one at a time, opening each shard lazily (memory-mapped)."""

    def __init__(self, folder: Path, layout: dict[str, TensorInfo]):
        self.folder = Path(folder)
        self.layout = layout
        self._open: dict[str, object] = {}

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


@contextmanager
def open_checkpoint(folder: Path) -> Iterator[ShardReader]:
    reader = ShardReader(folder, read_layout(folder))
    try:
        yield reader
    finally:
        reader.close()


# A patch: the sorted flat indices of the entries it changes, and a function that changes them in
# place in the tensor it is given (reading and writing no other entry).
Patch = tuple[torch.Tensor, Callable[[torch.Tensor], None]]

_PAGE = 4096
# Untouched gaps shorter than this are read and written with their neighbours: one system call
# pair costs about as much as copying 64 KiB.
MERGE_GAP = 16 * _PAGE


def copy_with_patches(src: Path, dst: Path, patches: dict[str, Patch]) -> bool:
    """Write `dst` as a byte-for-byte copy of the safetensors file `src`, except for the entries
    that `patches` change.

    Only the pages holding patched entries go through memory (read, patched, written back at their
    offset); all other bytes are copied inside the kernel (copy_file_range). Every byte is copied
    once; header, metadata and layout are kept. Returns False, writing nothing, if a patched
    tensor has a dtype this reader does not know.
    """
    import numpy as np

    size = Path(src).stat().st_size
    with open(src, "rb") as fin:
        try:
            header_len = int.from_bytes(fin.read(8), "little")
            header = json.loads(fin.read(header_len))
        except (ValueError, UnicodeDecodeError) as exc:
            raise PieceError(f"cannot read '{src}': corrupt safetensors header") from exc
        start = 8 + header_len
        if any(_ST_DTYPES.get(header[name]["dtype"]) is None for name in patches):
            return False
        regions = sorted(
            (start + e["data_offsets"][0], start + e["data_offsets"][1], name)
            for name, e in header.items()
            if name != "__metadata__"
        )
        if regions and regions[-1][1] > size:
            raise PieceError(f"cannot read '{src}': truncated safetensors file")
        patched = [region for region in regions if region[2] in patches]
        # One reusable buffer: fresh memory per tensor would be faulted in page by page. Bytes of
        # it that a tensor's spans do not cover are stale, and no patch reads them.
        scratch = np.empty(max((end - begin for begin, end, _ in patched), default=0), dtype=np.uint8)
        with open(dst, "wb") as fout:
            src_fd, dst_fd = fin.fileno(), fout.fileno()
            copied = 0  # bytes [0, copied) of dst are written
            for begin, end, name in patched:
                indices, patch = patches[name]
                dtype = _ST_DTYPES[header[name]["dtype"]]
                spans = touched_spans(indices, dtype.itemsize, begin, end)
                buffer = scratch[: end - begin]
                for lo, hi in spans:
                    _read_all(src_fd, buffer[lo - begin : hi - begin], lo, name)
                patch(torch.from_numpy(buffer).view(dtype))
                for lo, hi in spans:
                    _copy_range(src_fd, dst_fd, copied, lo - copied)
                    _write_all(dst_fd, buffer[lo - begin : hi - begin], lo)
                    copied = hi
            _copy_range(src_fd, dst_fd, copied, size - copied)
    return True


def touched_spans(indices: torch.Tensor, itemsize: int, begin: int, end: int) -> list[tuple[int, int]]:
    """Byte ranges [lo, hi) of the file, within the tensor at [begin, end), that cover the pages
    holding the given entries; ranges closer than MERGE_GAP are joined."""
    import numpy as np

    # numpy, not torch: this runs once per tensor on small arrays, where torch's per-call overhead
    # cost more than the system calls it plans
    first = begin + indices.numpy().astype(np.int64) * itemsize
    if first.size == 0:
        return []
    # indices are sorted, so each entry's first and last page rise with it: a run of pages ends
    # where the next entry starts more than the allowed gap after this one ends
    first_page, last_page = first // _PAGE, (first + itemsize - 1) // _PAGE
    breaks = np.flatnonzero(first_page[1:] - last_page[:-1] > max(MERGE_GAP // _PAGE, 1))
    starts = first_page[np.concatenate([[0], breaks + 1])].tolist()
    ends = last_page[np.concatenate([breaks, [first.size - 1]])].tolist()
    return [(max(s * _PAGE, begin), min((e + 1) * _PAGE, end)) for s, e in zip(starts, ends, strict=True)]


def _read_all(fd: int, view, offset: int, name: str) -> None:
    import os

    done, length = 0, len(view)
    while done < length:  # one call returns at most ~2 GiB on Linux
        step = os.preadv(fd, [view[done:]], offset + done)
        if step == 0:
            raise PieceError(f"cannot read tensor '{name}': truncated safetensors file")
        done += step


def _write_all(fd: int, view, offset: int) -> None:
    import os

    done, length = 0, len(view)
    while done < length:
        done += os.pwrite(fd, view[done:], offset + done)


def _copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Copy `length` bytes at `offset` of one file to the same offset of another, in the kernel
    where the OS can."""
    import os

    done = 0
    while done < length:
        try:
            step = os.copy_file_range(src_fd, dst_fd, length - done, offset + done, offset + done)
        except (AttributeError, OSError):  # no copy_file_range here, or refused across file systems
            chunk = os.pread(src_fd, min(length - done, 1 << 24), offset + done)
            step = os.pwrite(dst_fd, chunk, offset + done) if chunk else 0
        if step == 0:
            raise PieceError("the input file shrank while it was being copied")
        done += step


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


def checkpoint_dtype(folder: Path, layout: dict[str, TensorInfo] | None = None) -> torch.dtype:
    """The dtype most of the floating-point weights are stored in."""
    counts: dict[torch.dtype, int] = {}
    for info in (layout or read_layout(folder)).values():
        if info.dtype.is_floating_point:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    return max(counts, key=counts.get) if counts else torch.float32


def parse_dtype(
    name: str, folder: Path | None = None, layout: dict[str, TensorInfo] | None = None
) -> torch.dtype:
    if name == "auto":
        return checkpoint_dtype(folder, layout) if folder is not None else torch.float32
    if name not in DTYPES:
        raise PieceError(f"unknown dtype '{name}'; use auto, float32, bfloat16 or float16")
    return DTYPES[name]


def pick_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PieceError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise PieceError("--device mps asked for, but MPS is not available; use --device cpu")
    if name != "cpu" and not name.startswith(("cuda", "mps")):
        raise PieceError(f"unknown device '{name}'; use auto, cpu, cuda or mps")
    return torch.device(name)


def load_causal_lm(
    folder: Path, *, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False
) -> torch.nn.Module:
    """Load a causal LM from safetensors only (never pickle), quietly, on `device`."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    weight_files(folder)  # clear error for a folder without safetensors before transformers tries
    transformers.utils.logging.disable_progress_bar()
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            config=config,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except PieceError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PieceError(f"cannot load a causal LM from '{folder}': {first}") from exc
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    return model.to(device)


def parameter_keys(model: torch.nn.Module, layout: dict[str, TensorInfo]) -> dict[str, str]:
    """Map each (deduplicated) model parameter name to its tensor name in the checkpoint files.

    Tied parameters appear once in named_parameters() and once in the file; older files may drop or
    add the base-model prefix (e.g. `transformer.`), which is matched here explicitly.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    keys: dict[str, str] = {}
    for name, _ in model.named_parameters():
        candidates = [name]
        if prefix and name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1 :])
        elif prefix:
            candidates.append(f"{prefix}.{name}")
        found = next((c for c in candidates if c in layout), None)
        if found is not None:
            keys[name] = found
    return keys


def fingerprint(folder: Path, layout: dict[str, TensorInfo] | None = None) -> str:
    """A cheap identity of a checkpoint's weights: names, shapes, dtypes, first and last row of each.

    Reads a few KB, not the model; it tells apart different fine-tunes of one architecture.
    """
    import hashlib

    layout = layout or read_layout(folder)
    digest = hashlib.sha256()
    by_file: dict[str, list[str]] = {}
    for name in sorted(layout):
        by_file.setdefault(layout[name].file, []).append(name)
    for file in sorted(by_file):
        with safe_open(str(Path(folder) / file), "pt") as f:
            for name in by_file[file]:
                info = layout[name]
                digest.update(f"{name}|{list(info.shape)}|{info.dtype}|".encode())
                if info.numel:
                    sl = f.get_slice(name)
                    rows = info.shape[0] if info.shape else 1
                    for part in (sl[0:1], sl[rows - 1 : rows]) if info.shape else (sl[:],):
                        digest.update(part.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def identity(source, layout: dict[str, TensorInfo] | None = None) -> dict:
    """Who a checkpoint is, for masks and deltas: name, repo id, revision and weight fingerprint."""
    return {
        "name": source.name,
        "repo_id": source.repo_id,
        "revision": source.revision,
        "fingerprint": fingerprint(source.path, layout),
    }


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in backward (transformers' own per-layer checkpointing)."""
    # transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias)
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
        model, "gradient_checkpointing_enable", None
    )
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise PieceError(f"{type(model).__name__} does not support --gradient-checkpointing; leave it off")
    enable()
