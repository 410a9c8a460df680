"""What is at a path: one answer, by file names alone, for every command that takes a path.

A delta folder holds delta.json; a PEFT adapter, adapter_config.json; a checkpoint, model weights in
safetensors (one file or an index); a mask is a .safetensors file, or a folder (a Hub repo) holding
mask.safetensors; a merge recipe is a .yaml file. The formats/ modules read what each holds.
"""

from __future__ import annotations

from pathlib import Path

DELTA = "delta"
MASK = "mask"
ADAPTER = "adapter"
CHECKPOINT = "checkpoint"
RECIPE = "recipe"

DELTA_DESCRIPTION = "delta.json"  # a delta folder's description (formats/delta_folder.py)
DELTA_WEIGHTS = "delta.safetensors"
CARD = "README.md"
MASK_FILE = "mask.safetensors"  # a mask's name inside a folder or Hub repo
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's names (formats/peft.py)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SINGLE_FILE = "model.safetensors"  # a checkpoint's weights, one file or sharded with an index
INDEX_FILE = "model.safetensors.index.json"
RECIPE_SUFFIXES = (".yaml", ".yml")


def sniff(path: Path) -> list[str]:
    """The kinds of artifact `path` holds, most specific first (a folder may hold several: a
    checkpoint with an adapter beside it, say); empty if none."""
    path = Path(path)
    if path.is_dir():
        found = []
        if (path / DELTA_DESCRIPTION).is_file():
            found.append(DELTA)
        if (path / ADAPTER_CONFIG).is_file():
            found.append(ADAPTER)
        if (path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file():
            found.append(CHECKPOINT)
        if (path / MASK_FILE).is_file():
            found.append(MASK)
        return found
    if path.is_file() and path.suffix == ".safetensors":
        return [MASK]
    if path.is_file() and path.suffix.lower() in RECIPE_SUFFIXES:
        return [RECIPE]
    return []
