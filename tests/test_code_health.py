"""Code health, stated as tests: what a reader of ``repfx/`` can rely on."""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import networkx as nx
from radon.complexity import cc_visit

PACKAGE = Path(__file__).resolve().parents[1] / "repfx"
MAX_COMPLEXITY = 15  # radon's cyclomatic complexity, per function or method
MAX_LINES = 600  # per module: one job each


def _functions(blocks):
    for block in blocks:
        if type(block).__name__ == "Class":
            yield from _functions(block.methods)
        else:
            yield block
            yield from _functions(getattr(block, "closures", []))


def test_no_function_is_above_the_complexity_limit():
    too_complex = [
        f"{path.relative_to(PACKAGE.parent)}:{fn.lineno} {fn.fullname} ({fn.complexity})"
        for path in sorted(PACKAGE.rglob("*.py"))
        for fn in _functions(cc_visit(path.read_text()))
        if fn.complexity > MAX_COMPLEXITY
    ]
    assert too_complex == [], "split these functions:\n" + "\n".join(too_complex)


def test_no_module_is_above_the_size_limit():
    too_long = [
        f"{path.relative_to(PACKAGE.parent)} ({n} lines)"
        for path in sorted(PACKAGE.rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    ]
    assert too_long == [], "split these modules along their jobs:\n" + "\n".join(too_long)


def test_no_module_shadows_the_standard_library():
    names = {path.stem for path in PACKAGE.rglob("*.py")} | {
        path.name for path in PACKAGE.rglob("*") if path.is_dir()
    }
    assert names & set(sys.stdlib_module_names) == set()


INFRASTRUCTURE = {"base", "pipeline", "rewrite"}  # the modules of repfx/passes that are not rules


def test_no_rule_imports_another_rule():
    """A rule (a public module of ``repfx/passes``) builds on the infrastructure (``base``,
    ``pipeline``, ``rewrite``), ``_common`` and the private helpers of its family, never on
    another rule: each one reads on its own."""
    passes = PACKAGE / "passes"
    rules = {p.stem for p in passes.glob("*.py") if not p.stem.startswith("_")} - INFRASTRUCTURE
    imports = {rule: _relative_imports(passes / f"{rule}.py") for rule in rules}
    assert {rule: found & rules for rule, found in imports.items() if found & rules} == {}


def _relative_imports(path: Path) -> set[str]:
    """The sibling modules ``path`` imports (``from .x import …``, ``from . import x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
    return found


# The layers of docs/architecture.md, top to bottom: a module imports its own layer or below.
# Below the public face, each layer is a folder of repfx/.
LAYERS = (
    ("repfx", "repfx.__main__", "repfx.cli", "repfx.sources", "repfx.testing", "repfx.export"),
    ("repfx.fold", "repfx.fold_inside", "repfx.dynamo"),
    ("repfx.capture",),
    ("repfx.passes",),
    ("repfx.proof",),
    ("repfx.report",),
    ("repfx.ir",),
    ("repfx.algebra", "repfx.errors"),
)


def _layer(module: str) -> int | None:
    """The layer of ``module`` (a package's modules share their package's); ``None`` for the
    reference models and recipes, which sit beside the compiler."""
    matches = [
        (len(name), depth)
        for depth, names in enumerate(LAYERS)
        for name in names
        if module == name or (name != "repfx" and module.startswith(name + "."))
    ]
    return max(matches)[1] if matches else None


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _all_modules() -> frozenset[str]:
    return frozenset(_module_name(path) for path in PACKAGE.rglob("*.py"))


def _imported_modules(path: Path, module: str) -> set[str]:
    """The repfx modules ``path`` imports, as dotted names: relative and absolute imports,
    anywhere in the file (at module level, inside a function, under ``if TYPE_CHECKING``).
    ``from .x import y`` names ``x.y`` where ``y`` is a module, else ``x``; importing a module
    does not count as importing the packages above it."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "repfx"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, node.module] if node.module else parts)
            else:
                base = node.module or ""
            if base.split(".")[0] == "repfx":
                names = (f"{base}.{alias.name}" for alias in node.names)
                found |= {name if name in _all_modules() else base for name in names}
    return found


def test_every_module_imports_its_own_layer_or_below():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        if (own := _layer(module)) is None:
            continue
        for target in _imported_modules(path, module):
            if (layer := _layer(target)) is not None and layer < own:
                upward.append(f"{module} imports {target}")
    assert upward == []


def test_no_two_modules_import_each_other():
    """The import graph of ``repfx/`` has no cycle, counting every import of
    :func:`_imported_modules` (a function-level import or one made only for type annotations
    ties two modules together as much as any other): each module reads without the ones
    that read it."""
    graph = nx.DiGraph()
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        graph.add_node(module)
        graph.add_edges_from((module, t) for t in _imported_modules(path, module) if t != module)
    tangles = [group for group in nx.strongly_connected_components(graph) if len(group) > 1]
    cycles = []
    for group in tangles:
        edges = nx.find_cycle(graph.subgraph(group))
        cycles.append(" → ".join([a for a, _ in edges] + [edges[0][0]]))
    assert cycles == [], "import cycles (one per tangle):\n" + "\n".join(sorted(cycles))


def test_no_module_imports_another_modules_private_names():
    """A leading underscore means "this module's own": what another repfx module needs is
    public. (Private names of torch that repfx relies on are another matter: they are imported
    where they are used.)"""
    borrowed = [
        f"{path.relative_to(PACKAGE.parent)}: {alias.name} from {'.' * node.level}{node.module}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.level or node.module.startswith("repfx"))
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]
    assert borrowed == []


def test_test_modules_import_their_helpers_as_the_suite_runs_them():
    """The suite puts tests/ on the path (conftest.py): helpers are ``helpers``, never
    ``tests.helpers``, which only imports where the repository root happens to be on the path
    too (it is not on a clean clone's install)."""
    tests = Path(__file__).resolve().parent
    found = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            found += [f"{path.name}: {n}" for n in names if n == "tests" or n.startswith("tests.")]
    assert found == []
