"""The package's shape: layer folders that import only downward, no import cycle of any kind
(imports inside functions and under TYPE_CHECKING count), a shallow import graph, and no function
too long to read in one sitting. docs/architecture.md shows the tree."""

import ast
from functools import cache
from pathlib import Path

import piece_surgery

PACKAGE = Path(piece_surgery.__file__).parent
MAX_BODY_LINES = 60
MAX_HEIGHT = 10  # imports on the longest chain of them (a module that imports none is at height 0)

# Top to bottom: a module may import modules of its own folder and of the folders below its own.
LAYERS = (
    "cli",
    "recipes",
    "integrations",
    "training",
    "scoring",
    "merging",
    "evaluation",
    "formats",
    "models",
    "io",
    "data",
    "runtime",
)
# The package root: __main__ runs the CLI; __init__ names the public API, importing on first use.
ROOT_MODULES = {"piece_surgery", "piece_surgery.__main__"}


def module_imports(path: Path) -> set[str]:
    """The piece_surgery modules a file imports, wherever the import is: at the top, inside
    functions, and under `if TYPE_CHECKING:` (an annotation's import is a dependency too), and
    the modules the root package's public API table names."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("piece_surgery"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("piece_surgery"):
            # `from piece_surgery.io import hub` and `from piece_surgery.cli import common` name modules
            folder = PACKAGE.parent.joinpath(*node.module.split("."))
            for alias in node.names:
                is_module = (folder / f"{alias.name}.py").is_file() or (folder / alias.name).is_dir()
                found.add(f"{node.module}.{alias.name}" if is_module else node.module)
        elif path == PACKAGE / "__init__.py" and _names_a_module(node):
            found.add(f"piece_surgery.{node.value}")  # _HOMES: name -> the module defining it
    return found


def _names_a_module(node: ast.AST) -> bool:
    """A string like "formats.delta" that names a module of the package (the public API table)."""
    if not (isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value):
        return False
    return PACKAGE.joinpath(*node.value.split(".")).with_suffix(".py").is_file()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def import_graph() -> dict[str, frozenset[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        # a package's own __init__ is imported with any of its modules: not an import of theirs
        graph[name] = frozenset(module_imports(path) - {name})
    return graph


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest chain of imports (graph must have no cycle)."""
    memo: dict[str, list[str]] = {}

    def chain(node: str) -> list[str]:
        if node not in memo:
            below = [chain(n) for n in sorted(graph.get(node, ())) if n in graph]
            memo[node] = [node, *max(below, key=len, default=[])]
        return memo[node]

    return max((chain(n) for n in sorted(graph)), key=len)


def test_every_module_lives_in_a_layer_folder():
    graph = import_graph()
    assert len(graph) > 30 and any(graph.values())  # the walk found the modules and their imports
    homeless = [m for m in graph if m not in ROOT_MODULES and layer_of(m) is None]
    assert not homeless, homeless


def test_imports_only_go_down_the_layers():
    wrong = []
    for module, imports in sorted(import_graph().items()):
        mine = layer_of(module)
        for imported in sorted(imports):
            theirs = layer_of(imported)
            if module in ROOT_MODULES:
                continue
            if theirs is None or theirs < mine:
                wrong.append(f"{module} -> {imported}")
    assert not wrong, wrong


def test_the_package_has_no_import_cycle_and_a_shallow_graph():
    graph = import_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    chain = longest_chain({m: set(i) for m, i in graph.items()})
    assert len(chain) - 1 <= MAX_HEIGHT, " -> ".join(chain)


def test_the_checks_find_what_they_look_for():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert longest_chain({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == ["a", "b", "c"]
    assert layer_of("piece_surgery.cli.common") == 0 and layer_of("piece_surgery.runtime.errors") == 11
    lazy = module_imports(PACKAGE / "cli" / "model_commands.py")  # its recipes are imported in functions
    assert any(m.startswith("piece_surgery.recipes.") for m in lazy)


def test_no_function_is_too_long():
    """Body lines (the signature and docstring not counted: Typer commands declare many options)."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = node.body
                if (
                    isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant)
                    and len(body) > 1
                ):
                    body = body[1:]
                lines = node.end_lineno - body[0].lineno + 1
                if lines > MAX_BODY_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({lines} lines)")
    assert not long, long
