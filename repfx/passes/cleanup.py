"""cleanup: remove ops that are the identity in eval mode.

``nn.Identity``, eval-mode ``Dropout*`` / ``DropPath`` / ``StochasticDepth`` (and any of them with
probability 0), ``F.dropout(training=False)``, and ``x * 1``, ``x / 1``, ``x + 0``, ``x - 0`` on a
floating tensor: ``f(x) = x``, so every use of ``f(x)`` becomes a use of ``x``.
"""

from __future__ import annotations

from torch import fx

from ..ir.graph import where
from ..ir.match import Fail
from ..ir.ops import identity_input
from ..report.fold_report import Folded, Skipped
from .base import FoldContext, NodeRule
from .rewrite import replace_node


class Cleanup(NodeRule):
    name = "cleanup"
    words = "no-op removed"  # one fold, in a report

    def _visit(self, ctx: FoldContext, node: fx.Node) -> Folded | Skipped | None:
        found = identity_input(ctx.gm, node)
        if isinstance(found, Fail):
            return Skipped(self.name, where(node), found.reason)
        if found is None:
            return None

        def rewrite() -> tuple[list[fx.Node], str]:
            replace_node(node, found)
            return [found], "removed no-op"

        return ctx.commit(self.name, where(node), [node], [found], rewrite)
