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
    shard_size: 2GB                                # optional (null: keep the base's shards)
    original_base: null                            # optional: see apply --original-base
    output: merged

The file is read strictly (docs/cli.md has the schema): keys are strings and appear once, values
have the types above (a scale may be written as YAML reads `1e-3`, a string), only `shard_size` and
`original_base` may be null, and YAML aliases are refused (a recipe needs none, and nested aliases
expand a few hundred bytes into gigabytes).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from piece_surgery.io.hub import looks_like_repo_id
from piece_surgery.runtime.errors import PieceError, first_line, quote
from piece_surgery.runtime.paths import not_there, what_is

RECIPE_FILE = "piece-surgery-recipe.yaml"
CONFLICT_POLICIES = ("sum", "mean", "ties", "error")
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; this is not one
_KEYS = (
    "base",
    "deltas",
    "on_conflict",
    "force",
    "allow_duplicates",
    "shard_size",
    "original_base",
    "output",
)


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
    source: Path | None = field(default=None, compare=False)  # the recipe file, when read from one

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

    def named(self, key: str) -> str:
        """How a message names the setting `key`: its flag (`--original-base`), or, for a recipe
        read from a file (apply --recipe refuses the flags), its key (`original_base`)."""
        return key if self.source is not None else f"--{key.replace('_', '-')}"

    @property
    def output_path(self) -> Path:
        return self.folder / Path(self.output).expanduser()

    def resolve(self, ref: str) -> str:
        """What `ref` names: a path relative to the recipe's folder (`~` expanded), or, when nothing
        is there and it is shaped like one, a Hub repo id. Never a path relative to where the
        command runs: a recipe means the same wherever it is run from."""
        return ref if self.reads_as_repo_id(ref) else str(self.folder / Path(ref).expanduser())

    def reads_as_repo_id(self, ref: str) -> bool:
        """`ref` names nothing beside the recipe and is shaped like a Hub repo id, so it is one."""
        path = Path(ref).expanduser()
        if path.is_absolute() or ref.startswith(("./", "../", "~")) or not looks_like_repo_id(ref):
            return False
        local = self.folder / path
        return not (local.exists() or local.is_symlink())

    def with_output(self, output: str | Path) -> Recipe:
        """This recipe writing elsewhere (`apply --recipe R --output OUT`: OUT as the command line
        gives it, relative to where the command runs)."""
        return replace(self, output=str(Path(output).expanduser().absolute()))

    def recorded(self, output: Path) -> Recipe:
        """The recipe as the merged folder `output` records it: local paths relative to that folder
        (so the file means the same where it lies), Hub repo ids as they are, the output as the
        folder itself (rebuilding it elsewhere: `apply --recipe FILE --output OTHER`)."""
        output = Path(output).absolute()

        def relative(ref: str | None) -> str | None:
            if ref is None:
                return None
            resolved = self.resolve(ref)
            if resolved == ref and not Path(ref).expanduser().exists() and looks_like_repo_id(ref):
                return ref  # a Hub repo id
            return os.path.relpath(Path(resolved).absolute(), output)

        return replace(
            self,
            base=relative(self.base),
            deltas=[(relative(path), scale) for path, scale in self.deltas],
            original_base=relative(self.original_base),
            output=os.path.relpath(output, output),
            folder=output,
            source=None,
        )

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


def _loader():
    """PyYAML's safe loader, stricter: no aliases, string keys that appear once."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(
                    None, None, "aliases (*name) are not allowed in a recipe", mark
                )
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {quote(key, 40)!s} is not a string", key_node.start_mark
                    )
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key '{quote(key, 40)}' appears twice", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep)

    return StrictLoader


def load_recipe(path: Path) -> Recipe:
    """Read and check a recipe file: one line per mistake, naming the key."""
    import yaml

    path = Path(path).expanduser()
    if what_is(path) != "a file":
        raise PieceError(f"recipe '{path}' {not_there(path)}: give the recipe's YAML file")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise PieceError(f"recipe '{path}' is over {MAX_RECIPE_BYTES // 1024} KiB: not a recipe")
    where = f"recipe '{path}'"
    try:
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=_loader())  # noqa: S506 - safe loader
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PieceError(f"{where} is not valid YAML for a recipe: {first_line(exc)}") from exc
    except RecursionError as exc:
        raise PieceError(f"{where} is nested too deeply to be a recipe") from exc
    if not isinstance(document, dict):
        raise PieceError(f"{where} must be a mapping with base, deltas and output")
    unknown = sorted(set(document) - set(_KEYS))
    if unknown:
        raise PieceError(f"{where}: unknown key '{quote(unknown[0], 40)}'; the keys are {', '.join(_KEYS)}")
    for key in ("base", "output"):
        if not isinstance(document.get(key), str) or not document[key].strip():
            raise PieceError(f"{where}: '{key}' must be a path or repo id")
    for key in ("on_conflict", "force", "allow_duplicates"):
        if key in document and document[key] is None:
            raise PieceError(f"{where}: '{key}' is empty; give a value or leave the key out")
    on_conflict = document.get("on_conflict", "sum")
    if on_conflict not in CONFLICT_POLICIES:
        raise PieceError(
            f"{where}: 'on_conflict' is {quote(on_conflict, 40)!r}; use {', '.join(CONFLICT_POLICIES)}"
        )
    for key in ("force", "allow_duplicates"):
        if not isinstance(document.get(key, False), bool):
            raise PieceError(f"{where}: '{key}' must be true or false")
    for key in ("shard_size", "original_base"):
        value = document.get(key)
        if (
            value is not None
            and not (isinstance(value, str) and value.strip())
            and not (key == "shard_size" and isinstance(value, int) and not isinstance(value, bool))
        ):
            raise PieceError(f"{where}: '{key}' must be a string (or null to leave it out)")
    return Recipe(
        base=document["base"],
        deltas=_deltas(document.get("deltas"), where),
        output=document["output"],
        on_conflict=on_conflict,
        force=document.get("force", False),
        allow_duplicates=document.get("allow_duplicates", False),
        shard_size=None if document.get("shard_size") is None else str(document["shard_size"]),
        original_base=document.get("original_base"),
        folder=path.parent,
        source=path,
    )


def _deltas(deltas, where: str) -> list[tuple[str, float]]:
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
        if not item["path"].strip():
            raise PieceError(f"{where}: delta {i} has an empty path")
        if "scale" in item and item["scale"] is None:
            raise PieceError(f"{where}: delta {i} has an empty scale; give a number or leave it out")
        parsed.append((item["path"], _scale(item.get("scale", 1.0), f"{where}: delta {i}")))
    return parsed


def _scale(value, where: str) -> float:
    """A finite number; YAML reads `1e-3` (no dot) as a string, which is read as the number it says."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
        raise PieceError(f"{where} has scale {quote(value, 40)!r}; give a finite number")
    return float(number)


def card_section(recipe: Recipe, output: Path) -> str:
    """What a merged folder's card says about how it was made and how to make it again."""
    name = Path(output).name
    return (
        "\n## Merged with piece-surgery\n\n"
        f"This checkpoint is `{recipe.base}` with {len(recipe.deltas)} sparse delta(s) merged in. "
        f"Its recipe, `{RECIPE_FILE}`, gives paths relative to this folder; from the folder above it,\n"
        f"`piece-surgery apply --recipe {name}/{RECIPE_FILE} --output {name}-again` builds it again:\n\n"
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
MAX_SHARD_BYTES = 2**50  # a petabyte: any larger "size" is a typo


def parse_size(text: str | int | None, name: str = "--shard-size") -> int | None:
    """`2GB`, `500MB`, `1.5GiB`, `123` (bytes) -> bytes; an int is bytes; None stays None.
    PieceError, naming the setting `name`, for anything else, and for a size that is not a positive
    whole number of bytes under a petabyte (`infGB`, `nanMB`, `-1`, `0.1B`)."""
    if text is None:
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        size = float(text)
    else:
        upper, size = str(text).strip().upper(), None
        unit = next((u for u in _UNITS if upper.endswith(u)), "")
        number = upper[: len(upper) - len(unit)].strip() if unit else upper
        try:
            size = float(number) * _UNITS.get(unit, 1)
        except ValueError:
            size = None
    if size is None or not math.isfinite(size) or not 1 <= size <= MAX_SHARD_BYTES:
        raise PieceError(f"{name} '{quote(text, 40)}' is not a size; write e.g. 2GB or 500MB")
    return int(size)
