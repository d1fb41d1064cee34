"""Every ```python snippet of README.md is complete and runs.

Each block is executed on its own, in a fresh namespace, in the order the README shows them
(one thread, as a user's first try would on a laptop). Before it runs, a static check asserts
that the block reads no name it does not define or import itself: a snippet that relies on a
``model`` or ``x`` from elsewhere fails here even in a branch the run does not take.
"""

from __future__ import annotations

import ast
import builtins
import logging
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line number, source)`` of each ```python block of ``text``."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _FENCE.finditer(text)]


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def unbound_names(source: str) -> set[str]:
    """Names ``source`` reads that it neither binds (assignment, import, def, loop or
    comprehension target, argument, ``except ... as``) nor gets from builtins."""
    bound: set[str] = set(dir(builtins))
    read: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return read - bound


@pytest.fixture
def isolated_process_state():
    """One thread while a snippet runs; torch's thread count, dynamo's caches and the logging
    configuration (levels, root handlers) as they were afterwards."""
    threads = torch.get_num_threads()
    manager = logging.Logger.manager
    levels = {n: lg.level for n, lg in manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    root_handlers, root_level = list(logging.root.handlers), logging.root.level
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
        logging.root.handlers[:] = root_handlers
        logging.root.setLevel(root_level)
        for name, logger in manager.loggerDict.items():
            if isinstance(logger, logging.Logger):
                logger.setLevel(levels.get(name, logging.NOTSET))


def test_the_readme_has_the_snippets_it_documents():
    sources = [source for _, source in BLOCKS]
    assert any("repfx.fold(model, (x,))" in s for s in sources)
    assert any('torch.compile(model, backend="repfx")' in s for s in sources)
    assert any("RIFormerDistiller(" in s for s in sources)


@pytest.mark.parametrize(("line", "source"), BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_readme_snippet_is_self_contained_and_runs(line, source, isolated_process_state):
    missing = unbound_names(source)
    assert not missing, f"README.md:{line} uses names it does not define: {sorted(missing)}"
    namespace: dict[str, object] = {"__name__": f"readme_snippet_{line}"}
    exec(compile(source, f"README.md:{line}", "exec"), namespace)  # raises if the snippet fails


REPO = README.parent
USER_DOCS = [README, *sorted(REPO.glob("docs/*.md")), *sorted(REPO.glob("benchmarks/*.md"))]
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", USER_DOCS, ids=[str(p.relative_to(REPO)) for p in USER_DOCS])
def test_user_docs_are_self_contained(doc):
    """Everything a user reads lives in the repository: no link leaves it (other than to the
    web), every relative link resolves, and nothing speaks of the project's issue tracker."""
    text = doc.read_text(encoding="utf-8")
    for target in _LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        resolved = (doc.parent / target).resolve()
        assert resolved.is_relative_to(REPO.resolve()), f"{target} leaves the repository"
        assert resolved.exists(), f"{target} does not exist"
    assert "../shared" not in text
    assert not re.search(r"\bissues?\b", text, re.IGNORECASE), "speaks of issues"
