"""Fork-join regions of an fx graph, found with networkx's dominator tree.

The *fork* of a join node is its immediate dominator: the last node every path from the inputs
to the join passes through. The region is what lies between the two. Passes use it to explain
a join they did not collapse ("a branch contains a non-affine op (relu)").
"""

from __future__ import annotations

from collections.abc import Callable

import networkx as nx
from torch import fx

_ROOT = "__repfx_root__"
MAX_REGION = 256  # nodes examined per region before giving up on an explanation


class Regions:
    def __init__(self, graph: fx.Graph):
        g = nx.DiGraph()
        g.add_node(_ROOT)
        for node in graph.nodes:
            inputs = node.all_input_nodes
            if not inputs:
                g.add_edge(_ROOT, node)
            for source in inputs:
                g.add_edge(source, node)
        self._idom = nx.immediate_dominators(g, _ROOT)

    def fork(self, join: fx.Node) -> fx.Node | None:
        fork = self._idom.get(join)
        return None if fork is None or fork == _ROOT else fork

    def first(self, join: fx.Node, predicate: Callable[[fx.Node], bool]) -> fx.Node | None:
        """The earliest node strictly inside ``join``'s region that satisfies ``predicate``
        (``None`` if there is none, or the region is too large to examine)."""
        fork = self.fork(join)
        if fork is None:
            return None
        seen: set[fx.Node] = set()
        stack = list(join.all_input_nodes)
        while stack and len(seen) < MAX_REGION:
            node = stack.pop()
            if node is fork or node in seen:
                continue
            seen.add(node)
            stack.extend(node.all_input_nodes)
        order = {n: i for i, n in enumerate(join.graph.nodes)}
        inside = sorted((n for n in seen if predicate(n)), key=order.__getitem__)
        return inside[0] if inside else None
