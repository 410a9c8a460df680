"""Print the lowest versions pyproject.toml allows for the libraries whose floors CI tests, as pip
pins (`name==version`, one per line): torch, transformers, safetensors, huggingface_hub and peft.

.ci/run installs them in a second environment and runs the tests marked `smoke` there, so the
declared ranges stay true (a floor no test ran on is a promise nobody checked)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: CI runs this on 3.11
    sys.exit("scripts/dependency_floors.py needs Python 3.11 or newer (tomllib)")

GUARDED = ("torch", "transformers", "safetensors", "huggingface_hub", "peft")


def floors(pyproject: Path) -> dict[str, str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    found = {}
    for requirement in requirements:
        match = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", requirement)
        if match and match.group(1).replace("-", "_").lower() in GUARDED:
            found[match.group(1)] = match.group(2)
    missing = [name for name in GUARDED if name not in {k.replace("-", "_").lower() for k in found}]
    if missing:
        sys.exit(f"pyproject.toml declares no '>=' floor for {', '.join(missing)}")
    return found


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    for name, version in floors(root / "pyproject.toml").items():
        print(f"{name}=={version}")
