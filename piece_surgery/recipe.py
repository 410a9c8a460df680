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

from piece_surgery.errors import PieceError

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
        raise PieceError(f"recipe '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from exc
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
