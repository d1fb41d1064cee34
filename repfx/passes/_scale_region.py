"""Where a per-channel scale goes when the op producing its input cannot take it: back
through the ops that commute with it, into every conv, linear, norm or affine that computes
that input.

For ``y = s ⊙ u`` (a scale, no shift) the *scaled region* is a set of values that can all be
multiplied by ``s`` at once, so that ``u`` itself becomes ``s ⊙ u`` and the multiply goes:

* a sum or difference passes the scale to both operands: ``s ⊙ (a ± b) = s ⊙ a ± s ⊙ b``;
* a channel-wise op (``repfx.ir.ops.channelwise_source``: average / adaptive pools, means over
  other axes, layout ops, eval dropout, bias-free token-mixing linears; relu and max pools
  when ``s ≥ 0``) passes it to its input: ``f(s ⊙ x) = s ⊙ f(x)``;
* a conv, linear, norm or affine *takes* it: ``s ⊙_out W``, ``s·γ, s·β``, or a composition.

Every value of the region must be read only by the ops the scale passes through (or by the
multiply), or by a conv / linear that can undo it on its input side (``W ⊙_in s⁻¹``, when no
entry of ``s`` is 0): a value also read elsewhere would change there. So a scaled shortcut
``s ⊙ a + conv(a)`` folds (``a``'s producer takes ``s``, the conv undoes it), PoolFormer's mixer
``x + ls ⊙ (pool(n) − n)`` with ``n = norm(x)`` folds (the region is {sub, pool, n}; the norm
takes ``ls``; the mixer becomes ``pool(n') − n'``), while a residual scale ``s ⊙ x + f(norm(x))``
does not: the norm reads ``x`` unscaled, and no rewrite gives both ``x`` and ``s ⊙ x`` without
a multiply or a second copy of ``x``'s producer.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from ..ir.graph import op_name, static_shape, value_users
from ..ir.match import Fail
from ..ir.ops import AffineOp, affine_op, channelwise_source, linear_op, norm_op
from .base import FoldContext

MAX_SCALED_VALUES = 64  # a larger region is not a block-local scale: give up early
_SUMS = {operator.add, operator.sub, torch.add, torch.sub, "add", "sub"}


@dataclass
class ScaledRegion:
    """The values that take the scale (``terminals``, each with its channel axis) and the ops
    it passes through unchanged (``through``)."""

    terminals: list[tuple[fx.Node, int | None]]
    through: list[fx.Node]
    undo: list[tuple[fx.Node, int | None]] = field(default_factory=list)  # convs / linears that
    # read a scaled value from outside the region, each with the axis they must undo ``s`` on


def scaled_region(ctx: FoldContext, op: AffineOp) -> ScaledRegion | Fail:
    """The region that takes ``op``'s scale in place of ``op``; or why there is none."""
    nonnegative = bool((op.affine.scale >= 0).all())
    axes: dict[fx.Node, int | None] = {}
    region = ScaledRegion([], [])
    stack = [(op.input, op.axis)]
    while stack:
        node, axis = stack.pop()
        if node in axes:
            if axes[node] != axis:
                return Fail(f"{op_name(ctx.gm, node)} would be scaled along two axes")
            continue
        if len(axes) >= MAX_SCALED_VALUES:
            return Fail(f"the scale reaches more than {MAX_SCALED_VALUES} values")
        axes[node] = axis
        step = _step(ctx, node, axis, nonnegative)
        if isinstance(step, Fail):
            return step
        if step is None:
            region.terminals.append((node, axis))
        else:
            region.through.append(node)
            stack.extend(step)
    readers = {*region.through, op.node}
    invertible = bool((op.affine.scale != 0).all())
    for node, axis in axes.items():
        for user in value_users(node):
            if user in readers or user in dict(region.undo):
                continue
            if not invertible or not _can_undo(ctx, user, node, axis):
                return Fail(
                    f"{op_name(ctx.gm, node)} is also read by {op_name(ctx.gm, user)}, "
                    "which needs it unscaled"
                )
            region.undo.append((user, axis))
    return region


def _can_undo(ctx: FoldContext, user: fx.Node, node: fx.Node, axis: int | None) -> bool:
    """Can ``user`` read ``s ⊙ node`` and undo ``s`` in its input-side weights?"""
    lin = linear_op(ctx.gm, user, ctx.consts)
    return (
        lin is not None
        and lin.input is node
        and lin.kind in ("conv", "linear")
        and (axis is None or axis == lin.channel_axis)
    )


def _step(
    ctx: FoldContext, node: fx.Node, axis: int | None, nonnegative: bool
) -> list[tuple[fx.Node, int | None]] | Fail | None:
    """How the scale crosses ``node``: ``None`` (it stops here: ``node`` takes it), the
    operands it moves to, or why it cannot."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return Fail(f"the scale reaches {node.op} {node.name}, which cannot take it")
    name = op_name(ctx.gm, node)
    lin = linear_op(ctx.gm, node, ctx.consts)
    if lin is not None and (axis is None or axis == lin.channel_axis):
        return None
    if lin is not None and lin.bias is not None:
        return Fail(
            f"{name} mixes along another axis than the channels and adds a bias: the scale "
            "would have to scale that bias per channel and per position"
        )
    if norm_op(ctx.gm, node, ctx.consts) is not None or affine_op(ctx.gm, node, ctx.consts):
        return None
    if node.target in _SUMS and node.op != "call_module":
        return _sum_operands(ctx, node, axis)
    found = channelwise_source(ctx.gm, node, axis, ctx.consts)
    if found is None:
        return Fail(f"{name} does not commute with a per-channel scale")
    if found.nonnegative_only and not nonnegative:
        return Fail(f"{name} commutes only with a non-negative scale")
    return [(found.input, found.axis)]


def _sum_operands(
    ctx: FoldContext, node: fx.Node, axis: int | None
) -> list[tuple[fx.Node, int | None]] | Fail:
    """``a ± b`` (``torch.add(a, b, alpha=k)`` too) of two computed values, neither of them
    broadcast along the channel axis."""
    if len(node.args) != 2 or node.kwargs.keys() - {"alpha"}:
        return Fail(f"{op_name(ctx.gm, node)} has an unexpected signature")
    if type(node.kwargs.get("alpha", 1)) not in (int, float):
        return Fail(f"{op_name(ctx.gm, node)} has a computed alpha")
    operands = list(node.args)
    if not all(isinstance(a, fx.Node) and not ctx.consts.is_constant(a) for a in operands):
        return Fail(f"{op_name(ctx.gm, node)} adds a constant that is not per-channel")
    if axis is not None:
        out = static_shape(node)
        if out is None:
            return Fail("operand shapes are unknown (pass example inputs)")
        for a in operands:
            shape = static_shape(a)
            if shape is None or len(shape) < -axis or shape[axis] != out[axis]:
                return Fail(
                    f"an operand of {op_name(ctx.gm, node)} is broadcast along the channels"
                )
    return [(a, axis) for a in operands]
