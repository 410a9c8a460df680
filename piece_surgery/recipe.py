"""Merge recipes: a stack of deltas as a YAML file (`apply --recipe stack.yaml`) that says exactly what
the command line would, so a merge can be reviewed, versioned and run again. Every merged folder
carries the recipe that made it (piece-surgery-recipe.yaml, and a section of its card).

    base: HuggingFaceTB/SmolLM2-135M-Instruct      # a folder or a Hub repo id[@revision]
    deltas:
      - path: deltas/legal                         # folders relative to the recipe's own folder
        scale: 1.0
      - path: user/delta-code@v2
        scale: 0.5
    on_conflict: sum                               # sum, mean, ties or error
    force: false
    allow_duplicates: false
    shard_size: 2GB                                # optional: re-shard the output
    original_base: null                            # optional: see apply --original-base
    output: merged
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from piece_surgery.errors import PieceError, first_line

RECIPE_FILE = "piece-surgery-recipe.yaml"
_KEYS = {
    "base",
    "deltas",
    "on_conflict",
    "force",
    "allow_duplicates",
    "shard_size",
    "original_base",
    "output",
}


@dataclass(frozen=True)
class Recipe:
    base: str
    deltas: list[tuple[str, float]]  # (path or repo id, scale), as written
    output: str
    on_conflict: str = "sum"
    force: bool = False
    allow_duplicates: bool = False
    shard_size: str | None = None
    original_base: str | None = None  # compact deltas onto another base: the base they were made from
    folder: Path = field(default=Path("."), compare=False)  # relative paths are relative to this

    @classmethod
    def from_arguments(
        cls,
        base: str | None,
        deltas: list[str] | None,
        output: str | Path | None,
        *,
        scales: list[float] | None = None,
        on_conflict: str | None = None,
        force: bool = False,
        allow_duplicates: bool = False,
        shard_size: str | int | None = None,
        original_base: str | None = None,
    ) -> Recipe:
        """The recipe an `apply` command line amounts to (every merged folder records one)."""
        missing = [
            name for name, value in (("BASE", base), ("DELTAS", deltas), ("--output", output)) if not value
        ]
        if missing:
            raise PieceError(f"apply needs {', '.join(missing)} (or --recipe)")
        return cls(
            base=base,
            deltas=list(zip(deltas, scales_for(deltas, scales), strict=True)),
            output=str(output),
            on_conflict=on_conflict or "sum",
            force=force,
            allow_duplicates=allow_duplicates,
            shard_size=None if shard_size is None else str(shard_size),
            original_base=original_base,
        )

    @property
    def output_path(self) -> Path:
        return self.folder / self.output

    def resolve(self, ref: str) -> str:
        """A local path relative to the recipe's folder (a Hub repo id stays as it is)."""
        candidate = self.folder / ref
        return str(candidate) if not Path(ref).is_absolute() and candidate.exists() else ref

    def to_yaml(self) -> str:
        import yaml

        document = {
            "base": self.base,
            "deltas": [{"path": path, "scale": scale} for path, scale in self.deltas],
            "on_conflict": self.on_conflict,
            "force": self.force,
            "allow_duplicates": self.allow_duplicates,
            "shard_size": self.shard_size,
            "original_base": self.original_base,
            "output": self.output,
        }
        return yaml.safe_dump(document, sort_keys=False, default_flow_style=False)


def load_recipe(path: Path) -> Recipe:
    """Read and check a recipe file: one line per mistake, naming the key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PieceError(f"recipe '{path}' not found")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PieceError(f"recipe '{path}' is not valid YAML: {first_line(exc)}") from exc
    where = f"recipe '{path}'"
    if not isinstance(document, dict):
        raise PieceError(f"{where} must be a mapping with base, deltas and output")
    unknown = sorted(set(document) - _KEYS)
    if unknown:
        raise PieceError(f"{where}: unknown key '{unknown[0]}'; the keys are {', '.join(sorted(_KEYS))}")
    for key in ("base", "output"):
        if not isinstance(document.get(key), str) or not document[key]:
            raise PieceError(f"{where}: '{key}' must be a path or repo id")
    deltas = document.get("deltas")
    if not isinstance(deltas, list) or not deltas:
        raise PieceError(f"{where}: 'deltas' must be a list of {{path, scale}}")
    parsed = []
    for i, item in enumerate(deltas, 1):
        if isinstance(item, str):
            item = {"path": item}
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("path"), str)
            or set(item) - {"path", "scale"}
        ):
            raise PieceError(f"{where}: delta {i} must be a path, or {{path, scale}}")
        scale = item.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
            raise PieceError(f"{where}: delta {i} has scale {scale!r}; give a finite number")
        parsed.append((item["path"], float(scale)))
    for key in ("force", "allow_duplicates"):
        if not isinstance(document.get(key, False), bool):
            raise PieceError(f"{where}: '{key}' must be true or false")
    for key in ("on_conflict", "shard_size", "original_base"):
        if document.get(key) is not None and not isinstance(document[key], str):
            raise PieceError(f"{where}: '{key}' must be a string")
    return Recipe(
        base=document["base"],
        deltas=parsed,
        output=document["output"],
        on_conflict=document.get("on_conflict") or "sum",
        force=document.get("force", False),
        allow_duplicates=document.get("allow_duplicates", False),
        shard_size=document.get("shard_size"),
        original_base=document.get("original_base"),
        folder=path.parent,
    )


def card_section(recipe: Recipe) -> str:
    """What a merged folder's card says about how it was made."""
    return (
        "\n## Merged with piece-surgery\n\n"
        f"This checkpoint is `{recipe.base}` with {len(recipe.deltas)} sparse delta(s) merged in "
        f"(`piece-surgery apply --recipe {RECIPE_FILE}` makes it again):\n\n"
        f"```yaml\n{recipe.to_yaml()}```\n"
    )


def scales_for(delta_refs: list[str], scales: list[float] | None) -> list[float]:
    """One scale each: none given is 1 each; one given applies to all."""
    scales = [float(s) for s in scales or []]
    for s in scales:
        if not math.isfinite(s):
            raise PieceError(f"--scale {s} is not a finite number")
    if len(scales) == 1 and len(delta_refs) > 1:
        scales = scales * len(delta_refs)
    if not scales:
        scales = [1.0] * len(delta_refs)
    if len(scales) != len(delta_refs):
        raise PieceError(
            f"got {len(scales)} --scale values for {len(delta_refs)} deltas; give one or one each"
        )
    return scales


_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(text: str | int | None) -> int | None:
    """`2GB`, `500MB`, `1.5GiB`, `123` (bytes) -> bytes; an int is bytes; None stays None."""
    if text is None or (isinstance(text, int) and not isinstance(text, bool)):
        return text
    upper = text.strip().upper()
    for unit, factor in _UNITS.items():
        if upper.endswith(unit):
            try:
                return int(float(upper[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(upper)
    except ValueError:
        raise PieceError(f"--shard-size '{text}' is not a size; write e.g. 2GB or 500MB") from None
