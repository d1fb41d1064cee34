"""What README.md promises about its own snippets (tests/test_docs.py runs them all).

The README shows the snippets it documents; its torch.compile snippet runs the model through
``backend="repfx"`` and checks that result, rather than computing it and dropping it; and the
output under the quick start is the output of the quick start's own command.
"""

from __future__ import annotations

import ast
import shlex

from test_docs import BLOCKS, REPO, steps_of

README = [block for block in BLOCKS if block.doc == REPO / "README.md"]


def sources(lang: str) -> list[str]:
    """The README's blocks of ``lang``, in order."""
    return [block.source for block in README if block.lang == lang]


def assignments(tree: ast.AST) -> list[tuple[set[str], ast.expr]]:
    """Each ``name = value`` of ``tree``: the names it binds and the value."""
    return [
        ({t.id for t in node.targets if isinstance(t, ast.Name)}, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
    ]


def names_bound_by(binds: list[tuple[set[str], ast.expr]], accepts) -> set[str]:
    """The names of ``binds`` given a value for which ``accepts(value)`` holds."""
    return {name for names, value in binds if accepts(value) for name in names}


def is_repfx_compile(value: ast.expr) -> bool:
    """``torch.compile(..., backend="repfx")``."""
    if not isinstance(value, ast.Call) or ast.unparse(value.func) != "torch.compile":
        return False
    backend = {k.arg: k.value for k in value.keywords}.get("backend")
    return isinstance(backend, ast.Constant) and backend.value == "repfx"


def is_call_of(value: ast.expr, functions: set[str]) -> bool:
    """``f(...)`` for an ``f`` in ``functions``."""
    return isinstance(value, ast.Call) and ast.unparse(value.func) in functions


def names_in_assertions(tree: ast.AST) -> set[str]:
    """The names read by the arguments of calls to an ``assert…`` function."""
    asserts = [
        n for n in ast.walk(tree) if isinstance(n, ast.Call) and "assert" in ast.unparse(n.func)
    ]
    return {name.id for call in asserts for name in ast.walk(call) if isinstance(name, ast.Name)}


def test_the_readme_has_the_snippets_it_documents():
    python = sources("python")
    assert any("repfx.fold(model, (x,))" in s for s in python)
    assert any('torch.compile(model, backend="repfx")' in s for s in python)
    assert any("RIFormerDistiller(" in s for s in python)
    console = "".join(sources("console"))
    for command in ("repfx optimize riformer_s12", "--json", "echo $?", "--arch"):
        assert command in console


def test_the_compile_snippet_checks_what_backend_repfx_computed():
    """The model compiled with ``backend="repfx"`` is called, an assertion reads what it
    returned, and nothing rebinds that name to another value (a result overwritten before use
    would leave inductor's run unchecked)."""
    [source] = [s for s in sources("python") if 'backend="repfx"' in s]
    binds = assignments(ast.parse(source))
    compiled = names_bound_by(binds, is_repfx_compile)
    assert compiled, "no `torch.compile(..., backend='repfx')` bound to a name"
    results = names_bound_by(binds, lambda value: is_call_of(value, compiled))
    assert results, "the compiled model is never called"
    assert results & names_in_assertions(ast.parse(source)), f"no assertion reads {results}"
    rebound = [ns for ns, value in binds if ns & results and not is_call_of(value, compiled)]
    assert not rebound, f"{rebound} rebound to another value"


def test_the_quick_start_output_is_that_of_its_command():
    quick_start = sources("bash")[0]
    first_command = quick_start.splitlines()[0].split("&&")[1]
    shown = steps_of(sources("console")[0])[0].command
    assert shlex.split(first_command, comments=True) == shlex.split(shown)
