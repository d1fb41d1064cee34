"""fold_affine_mixer: a sum or difference of two per-channel affine chains of the same tensor
becomes one per-channel affine of that tensor.

If ``u = a_k ∘ … ∘ a_1 (r)`` and ``v = b_m ∘ … ∘ b_1 (r)`` (either chain may be empty) and every
intermediate node feeds only the next one, then ``u ± α·v = (A ± α·B)(r)`` with ``A, B`` the
composed affines. This is RIFormer's token mixer: ``A(N(x)) − N(x)`` with ``A`` a depthwise
1×1 conv becomes ``(s − 1) ⊙ N(x) + t``, which ``fold_channel_affine`` then composes with the
LayerScale and absorbs into the norm: the block ``x + ls·(A(N(x)) − N(x))`` turns into
``x + N'(x)`` with ``γ' = ls·γ·(s − 1)``, ``β' = ls·(β·(s − 1) + t)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from ..algebra import ChannelAffine
from ..ir.graph import has_hooks, module_of, value_users, where
from ..ir.match import Fail
from ..ir.ops import AffineOp, affine_op, merge_axes
from ..report.fold_report import Folded, Skipped
from ._absorb import affine_dtype
from ._common import join_operands
from .base import FoldContext, NodeRule
from .rewrite import hint_for, insert_affine, replace_join


@dataclass
class _Chain:
    root: fx.Node
    affine: ChannelAffine  # the chain as one affine of root
    ops: list[AffineOp]  # from the join back towards the root


def _chain(ctx: FoldContext, start: fx.Node, join: fx.Node) -> _Chain:
    """Follow single-use per-channel affines from ``start`` back towards their root, as long as
    they act on one channel axis with one channel count (else they do not compose)."""
    ops: list[AffineOp] = []
    affine = ChannelAffine.of(None, None, 1)
    axis, node, consumer = None, start, join
    while value_users(node) == [consumer]:
        op = affine_op(ctx.gm, node, ctx.consts)
        if op is None or isinstance(merge_axes(axis, op.axis), Fail):
            break
        if len({affine.channels, op.channels} - {1}) > 1:
            break
        axis = merge_axes(axis, op.axis)
        affine = op.affine.then(affine)
        ops.append(op)
        node, consumer = op.input, node
    return _Chain(node, affine, ops)


class FoldAffineMixer(NodeRule):
    name = "fold_affine_mixer"
    words = "affine mixer folded"  # one fold, in a report

    def _visit(self, ctx: FoldContext, node: fx.Node) -> Folded | Skipped | None:
        operands = join_operands(node)
        return None if operands is None else self._collapse(ctx, node, *operands)

    def _collapse(
        self, ctx: FoldContext, join: fx.Node, u: fx.Node, v: fx.Node, weight: float
    ) -> Folded | Skipped | None:
        if u is v:
            return None  # x ± x: nothing to remove
        left, right = _chain(ctx, u, join), _chain(ctx, v, join)
        if left.root is not right.root or not (left.ops or right.ops):
            return None  # not a fork-join of one tensor: e.g. a residual x + f(x)
        if any(
            op.node.op == "call_module" and has_hooks(module_of(ctx.gm, op.node))
            for op in left.ops + right.ops
        ):
            return Skipped(self.name, where(join), "a branch module has hooks")
        axis = None
        for op in left.ops + right.ops:
            axis = merge_axes(axis, op.axis)
            if isinstance(axis, Fail):
                return Skipped(self.name, where(join), "branches act on different channel axes")
        channels = {op.channels for op in left.ops + right.ops} - {1}
        if len(channels) > 1:
            return Skipped(self.name, where(join), "branches have different channel counts")
        combined = left.affine.plus(right.affine, weight)
        dtype = affine_dtype(join, left.ops + right.ops)
        if dtype is None:
            return Skipped(
                self.name, where(join), "the affines' dtype is unknown (pass example inputs)"
            )
        hint = hint_for((left.ops or right.ops)[-1].node)
        kinds = ", ".join(op.kind for op in left.ops + right.ops)

        def rewrite() -> tuple[list[fx.Node], str]:
            new = insert_affine(ctx.gm, left.root, combined, axis, dtype, join, hint)
            replace_join(join, new, [op.node for op in left.ops + right.ops])
            return [new], f"merged branches ({kinds}) into one affine"

        return ctx.commit(self.name, where(join), [join], [left.root], rewrite)
