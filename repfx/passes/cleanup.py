"""cleanup: remove ops that are the identity in eval mode.

``nn.Identity``, eval-mode ``Dropout*`` / ``DropPath`` / ``StochasticDepth`` (and any of them with
probability 0), ``F.dropout(training=False)``, and ``x * 1``, ``x / 1``, ``x + 0``, ``x - 0`` on a
floating tensor: ``f(x) = x``, so every use of ``f(x)`` becomes a use of ``x``.
"""

from __future__ import annotations

from torch import fx

from ..graph import where
from ..ops import identity_input
from ..report import Folded, Skipped
from ..rewrite import replace_node
from .base import PassResult


class Cleanup:
    name = "cleanup"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        result = PassResult(modified=False)
        for node in list(gm.graph.nodes):
            found = identity_input(gm, node)
            if isinstance(found, str):
                result.skipped.append(Skipped(self.name, where(node), found))
            elif found is not None:
                result.folded.append(Folded(self.name, where(node), "removed no-op"))
                replace_node(node, found)
                result.modified = True
        return result
