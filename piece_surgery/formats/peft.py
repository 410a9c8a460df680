"""PEFT adapters as files: the library (an optional extra), an adapter folder's config and the
tensors its weights file holds, checked against what its config needs.

SHiRA is PEFT's sparse adapter, what `export --to peft` writes (merging/shira.py lays a delta out
as one); any adapter that merges into its base imports as a delta (recipes/import_adapter.py).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError, safe_open

from piece_surgery.io.sniff import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from piece_surgery.runtime.errors import PieceError, quote
from piece_surgery.runtime.json_files import read_json


@contextmanager
def quiet_libraries():
    """PEFT and transformers warn each other about deprecations: nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def peft_library():
    try:
        import peft
    except ImportError as exc:
        raise PieceError("PEFT is not installed: pip install 'piece-surgery[peft]'") from exc
    if not hasattr(peft, "ShiraConfig"):
        raise PieceError(f"PEFT {peft.__version__} has no SHiRA adapters: pip install -U 'peft>=0.17'")
    return peft


def read_adapter(folder: Path, ref: str) -> tuple[dict, set[str]]:
    """The adapter's config (a JSON object naming its PEFT type) and the names in its weights file."""
    if not (folder / ADAPTER_CONFIG).is_file():
        raise PieceError(f"adapter '{ref}' has no {ADAPTER_CONFIG}: is it a PEFT adapter folder?")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise PieceError(f"adapter '{ref}' has no {ADAPTER_WEIGHTS} (pickle weights are not read for safety)")
    config = read_json(folder / ADAPTER_CONFIG, f"adapter '{ref}': {ADAPTER_CONFIG}")
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise PieceError(f"adapter '{ref}': {ADAPTER_CONFIG} must be an object with a 'peft_type' string")
    peft = peft_library()
    if config["peft_type"] not in {kind.value for kind in peft.PeftType}:
        raise PieceError(
            f"adapter '{ref}': {ADAPTER_CONFIG} names peft_type '{quote(config['peft_type'], 40)}', which "
            f"PEFT {peft.__version__} does not know (its types are names like LORA or SHIRA)"
        )
    try:
        with safe_open(str(folder / ADAPTER_WEIGHTS), "pt") as f:
            stored = set(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise PieceError(f"adapter '{ref}': {ADAPTER_WEIGHTS} is not a readable safetensors file") from exc
    return config, stored


def check_adapter_tensors(ref: str, needed: set[str], allowed: set[str], stored: set[str]) -> None:
    missing, unexpected = sorted(needed - stored), sorted(stored - allowed)
    if missing:
        raise PieceError(
            f"adapter '{ref}' lacks {len(missing)} of the tensors its config needs (first: '{missing[0]}'); "
            "PEFT would fill them with random values: the adapter file is incomplete"
        )
    if unexpected:
        raise PieceError(
            f"adapter '{ref}' holds {len(unexpected)} tensors its config does not use (first: "
            f"'{unexpected[0]}'): {ADAPTER_WEIGHTS} does not belong to its {ADAPTER_CONFIG}"
        )
