"""A light description of a graph, kept by the report so that a fold can be drawn later.

A :class:`GraphSketch` holds, for each call of a graph whose value depends on an input, its
name, what it computes (a module's class, or a function / method name), the module it belongs
to and the calls it reads: enough to draw any block of the graph before and after a fold
(``repfx.report.draw``), and nothing heavy (no tensors, no reference to the graph itself).
``repfx.fold`` takes one of the graph as captured and one as folded and stores both in the
:class:`~repfx.report.fold_report.FoldReport`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from ..ir.graph import is_guard, op_name


@dataclass(frozen=True)
class SketchNode:
    name: str
    label: str  # what it computes: a module's class, or a function / method name
    path: str  # the module it belongs to ("" at the top level)
    inputs: tuple[str, ...]  # the calls it reads
    is_module: bool = False  # a module call: ``path`` is that module's own


@dataclass(frozen=True)
class GraphSketch:
    """The call nodes of a graph: enough to draw any block of it, nothing heavy."""

    nodes: tuple[SketchNode, ...]

    @staticmethod
    def of(gm: fx.GraphModule) -> GraphSketch:
        calls = _computed_calls(gm)
        paths = _module_paths(calls)
        nodes = tuple(
            SketchNode(
                n.name,
                op_name(gm, n),
                paths[n],
                tuple(i.name for i in n.all_input_nodes if i in paths),
                n.op == "call_module",
            )
            for n in calls
        )
        return GraphSketch(nodes)

    def block(self, prefix: str) -> list[SketchNode]:
        """The nodes that belong to module ``prefix`` or to a module inside it."""
        return [n for n in self.nodes if in_module(n.path, prefix)]


def in_module(path: str, prefix: str) -> bool:
    """Is module ``path`` the module ``prefix`` or inside it (``""``: the whole model)?"""
    return not prefix or path == prefix or path.startswith(prefix + ".")


def _computed_calls(gm: fx.GraphModule) -> list[fx.Node]:
    """The calls whose value depends on an input (not views of parameters), in order."""
    computed: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(i in computed for i in n.all_input_nodes):
            computed.add(n)
    calls = [n for n in gm.graph.nodes if n.op.startswith("call_") and n in computed]
    return [n for n in calls if not is_guard(n)]  # (a rank check computes nothing)


def _module_paths(calls: list[fx.Node]) -> dict[fx.Node, str]:
    """The module each call belongs to; a call a pass created has none of its own and takes a
    reader's (else an input's)."""
    own = {n: _own_path(n) for n in calls}
    paths = {}
    for n in calls:
        near = [m for m in [*n.users, *n.all_input_nodes] if own.get(m)]
        paths[n] = own[n] if own[n] is not None else (own[near[0]] if near else "")
    return paths


def _own_path(node: fx.Node) -> str | None:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack.values()))[0] if stack else None
