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
from functools import cached_property

import torch
from torch import fx

from ..algebra import ChannelAffine
from ..ir.graph import has_hooks, module_of, value_users
from ..ir.match import Fail
from ..ir.ops import AffineOp, affine_op, merge_axes
from ._absorb import affine_dtype
from ._common import join_operands
from .base import FoldContext, NodeRule, Region
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


@dataclass
class _Mixer:
    """``node = left ± weight·right``, two affine chains of one root."""

    node: fx.Node  # the join
    left: _Chain
    right: _Chain
    weight: float

    @property
    def ops(self) -> list[AffineOp]:
        return self.left.ops + self.right.ops

    @cached_property
    def axis(self) -> int | Fail | None:
        """The channel axis every op acts on (``None``: any), or a :class:`Fail`."""
        axis = None
        for op in self.ops:
            axis = merge_axes(axis, op.axis)
            if isinstance(axis, Fail):
                return axis
        return axis

    @cached_property
    def dtype(self) -> torch.dtype | None:
        return affine_dtype(self.node, self.ops)


class FoldAffineMixer(NodeRule):
    name = "fold_affine_mixer"
    words = "affine mixer folded"  # one fold, in a report

    def match(self, ctx: FoldContext, node: fx.Node) -> _Mixer | None:
        """``u ± α·v`` with ``u``, ``v`` chains of affines (one may be empty) of one root."""
        operands = join_operands(node)
        if operands is None:
            return None
        u, v, weight = operands
        if u is v:
            return None  # x ± x: nothing to remove
        left, right = _chain(ctx, u, node), _chain(ctx, v, node)
        if left.root is not right.root or not (left.ops or right.ops):
            return None  # not a fork-join of one tensor: e.g. a residual x + f(x)
        return _Mixer(node, left, right, weight)

    def check(self, ctx: FoldContext, mixer: _Mixer) -> Fail | None:
        if any(
            op.node.op == "call_module" and has_hooks(module_of(ctx.gm, op.node))
            for op in mixer.ops
        ):
            return Fail("a branch module has hooks")
        if isinstance(mixer.axis, Fail):
            return Fail("branches act on different channel axes")
        if len({op.channels for op in mixer.ops} - {1}) > 1:
            return Fail("branches have different channel counts")
        if mixer.dtype is None:
            return Fail("the affines' dtype is unknown (pass example inputs)")
        return None

    def region(self, ctx: FoldContext, mixer: _Mixer) -> Region:
        """From the root to the join."""
        return Region([mixer.node], [mixer.left.root])

    def rewrite(self, ctx: FoldContext, mixer: _Mixer) -> tuple[list[fx.Node], str]:
        left, right, join = mixer.left, mixer.right, mixer.node
        combined = left.affine.plus(right.affine, mixer.weight)
        hint = hint_for((left.ops or right.ops)[-1].node)
        new = insert_affine(ctx.gm, left.root, combined, mixer.axis, mixer.dtype, join, hint)
        replace_join(join, new, [op.node for op in mixer.ops])
        kinds = ", ".join(op.kind for op in mixer.ops)
        return [new], f"merged branches ({kinds}) into one affine"
