"""Copy a safetensors file while changing a few entries: only the pages that hold changed entries go
through memory; every other byte is copied inside the kernel."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from piece_surgery.dtypes import FLOAT_DTYPES, SAFETENSORS_DTYPES
from piece_surgery.errors import PieceError
from piece_surgery.records import parse_json

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
    size = Path(src).stat().st_size
    with open(src, "rb") as fin:
        header_len = int.from_bytes(fin.read(8), "little")
        try:
            header = parse_json(fin.read(header_len).decode("utf-8"), f"the header of '{src}'")
        except UnicodeDecodeError as exc:
            raise PieceError(f"cannot read '{src}': corrupt safetensors header") from exc
        start = 8 + header_len
        if any(not _is_float(header[name]["dtype"]) for name in patches):
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
                dtype = SAFETENSORS_DTYPES[header[name]["dtype"]]
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
    done, length = 0, len(view)
    while done < length:  # one call returns at most ~2 GiB on Linux
        step = os.preadv(fd, [view[done:]], offset + done)
        if step == 0:
            raise PieceError(f"cannot read tensor '{name}': truncated safetensors file")
        done += step


def _write_all(fd: int, view, offset: int) -> None:
    done, length = 0, len(view)
    while done < length:
        done += os.pwrite(fd, view[done:], offset + done)


def _copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Copy `length` bytes at `offset` of one file to the same offset of another, in the kernel
    where the OS can."""
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


def _is_float(safetensors_dtype: str) -> bool:
    """A dtype deltas can hold (fp32, bf16, fp16, fp64)."""
    return SAFETENSORS_DTYPES.get(safetensors_dtype) in FLOAT_DTYPES.values()
