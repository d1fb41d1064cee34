"""cleanup: remove ops that are the identity in eval mode.

``nn.Identity``, eval-mode ``Dropout*`` / ``DropPath`` / ``StochasticDepth`` (and any of them with
probability 0), ``F.dropout(training=False)``, and ``x * 1``, ``x / 1``, ``x + 0``, ``x - 0`` on a
floating tensor: ``f(x) = x``, so every use of ``f(x)`` becomes a use of ``x``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from ..ir.match import Fail
from ..ir.ops import identity_input
from .base import FoldContext, NodeRule, Region
from .rewrite import replace_node


@dataclass
class _NoOp:
    node: fx.Node  # f(x)
    input: fx.Node  # x


class Cleanup(NodeRule):
    name = "cleanup"
    words = "no-op removed"  # one fold, in a report

    def match(self, ctx: FoldContext, node: fx.Node) -> _NoOp | Fail | None:
        """An op that is the identity in eval mode; why not, for one that looks like it (a
        dropout in training mode)."""
        found = identity_input(ctx.gm, node)
        return found if found is None or isinstance(found, Fail) else _NoOp(node, found)

    # no checks: the pattern is the identity

    def region(self, ctx: FoldContext, no_op: _NoOp) -> Region:
        return Region([no_op.node], [no_op.input])

    def rewrite(self, ctx: FoldContext, no_op: _NoOp) -> tuple[list[fx.Node], str]:
        replace_node(no_op.node, no_op.input)
        return [no_op.input], "removed no-op"
