"""Where a per-channel scale goes when the op producing its input cannot take it: back
through the ops that commute with it, into every conv, linear, norm or affine that computes
that input.

For ``y = s ⊙ u`` (a scale, no shift) the *scaled region* is a set of values that can all be
multiplied by ``s`` at once, so that ``u`` itself becomes ``s ⊙ u`` and the multiply goes:

* a sum or difference passes the scale to both operands: ``s ⊙ (a ± b) = s ⊙ a ± s ⊙ b``;
* a channel-wise op (``repfx.ir.ops.channelwise_source``: average / adaptive pools, means over
  other axes, layout ops, eval dropout, bias-free token-mixing linears; relu and max pools
  when ``s ≥ 0``) passes it to its input: ``f(s ⊙ x) = s ⊙ f(x)``;
* a product of two computed values (a gate) passes it to one factor:
  ``s ⊙ (a ⊙ g) = (s ⊙ a) ⊙ g``, as long as ``g`` does not take it too;
* a conv, linear, norm or affine *takes* it: ``s ⊙_out W``, ``s·γ, s·β``, or a composition.

Every value of the region must be read only by the ops the scale passes through (or by the
multiply), or by a conv / linear that can undo it on its input side (``W ⊙_in s⁻¹``, when no
entry of ``s`` is 0), directly or through channel-wise ops read only by the next one (an
excitation gate: ``(W ⊙_in s⁻¹)·mean(s ⊙ a) = W·mean(a)``): a value also read elsewhere
would change there. So a scaled shortcut
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
_PRODUCTS = {operator.mul, torch.mul, "mul"}


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
    walked = _walk(ctx, op, nonnegative)
    if isinstance(walked, Fail):
        return walked
    region, axes = walked
    for product in region.through:
        if product.target in _PRODUCTS and all(a in axes for a in product.all_input_nodes):
            return Fail(f"{op_name(ctx.gm, product)} multiplies two values that take the scale")
    readers = {*region.through, op.node}
    invertible = bool((op.affine.scale != 0).all())
    for node, axis in axes.items():
        for user in value_users(node):
            if user in readers or user in dict(region.undo):
                continue
            undo = _undo_at(ctx, user, node, axis, nonnegative) if invertible else None
            if undo is None:
                return Fail(
                    f"{op_name(ctx.gm, node)} is also read by {op_name(ctx.gm, user)}, "
                    "which needs it unscaled"
                )
            region.undo.append(undo)
    return region


def _walk(
    ctx: FoldContext, op: AffineOp, nonnegative: bool
) -> tuple[ScaledRegion, dict[fx.Node, int | None]] | Fail:
    """The values the scale reaches, back from ``op``'s input, each with its channel axis."""
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
    return region, axes


def _undo_at(
    ctx: FoldContext, user: fx.Node, node: fx.Node, axis: int | None, nonnegative: bool
) -> tuple[fx.Node, int | None] | None:
    """The conv / linear that can undo ``s`` in its input-side weights for ``user``, a reader
    of ``s ⊙ node``: ``user`` itself, or one reached through channel-wise ops each read only
    by the next (an excitation gate: ``(W ⊙_in s⁻¹)·mean(s ⊙ a) = W·mean(a)``); with the axis
    it reads the scale on. ``None``: there is none."""
    for _ in range(MAX_SCALED_VALUES):
        lin = linear_op(ctx.gm, user, ctx.consts)
        if lin is not None:
            fits = lin.input is node and lin.kind in ("conv", "linear")
            return (user, axis) if fits and axis in (None, lin.channel_axis) else None
        crossed = _channelwise_forward(ctx, user, node, axis, nonnegative)
        readers = value_users(user)
        if crossed is None or len(readers) != 1:
            return None
        node, axis, user = user, crossed, readers[0]
    return None


def _channelwise_forward(
    ctx: FoldContext, node: fx.Node, source: fx.Node, axis: int | None, nonnegative: bool
) -> int | None:
    """The axis of ``node``'s output on which ``s`` lands when ``node`` is a channel-wise op
    (:func:`repfx.ir.ops.channelwise_source`) reading ``s ⊙ source`` on ``axis``; or ``None``."""
    shape = static_shape(node)
    candidates = [axis] if shape is None or axis is None else range(-len(shape), 0)
    for out_axis in candidates:
        found = channelwise_source(ctx.gm, node, out_axis, ctx.consts)
        if (
            found is not None
            and found.input is source
            and found.axis == axis
            and (nonnegative or not found.nonnegative_only)
        ):
            return out_axis
    return None


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
    if node.op != "call_module" and node.target in _SUMS | _PRODUCTS:
        operands = _sum_operands if node.target in _SUMS else _product_operand
        return operands(ctx, node, axis)
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
            if not _has_every_channel(static_shape(a), out, axis):
                return Fail(
                    f"an operand of {op_name(ctx.gm, node)} is broadcast along the channels"
                )
    return [(a, axis) for a in operands]


def _product_operand(
    ctx: FoldContext, node: fx.Node, axis: int | None
) -> list[tuple[fx.Node, int | None]] | Fail:
    """``a ⊙ g`` of two computed values (a gate): ``s ⊙ (a ⊙ g) = (s ⊙ a) ⊙ g``, the scale
    moves to ``a``, an operand of the product's whole shape (else one that has every channel;
    ``g`` may be broadcast). ``g`` must not take the scale too (checked once the region is
    known)."""
    if len(node.args) != 2 or node.kwargs:
        return Fail(f"{op_name(ctx.gm, node)} has an unexpected signature")
    operands = list(node.args)
    if not all(isinstance(a, fx.Node) and not ctx.consts.is_constant(a) for a in operands):
        return Fail(f"{op_name(ctx.gm, node)} multiplies by a constant that is not per-channel")
    out = static_shape(node)
    if axis is None:
        return [(operands[0], axis)]
    if out is None:
        return Fail("operand shapes are unknown (pass example inputs)")
    whole = [a for a in operands if static_shape(a) == out]
    every_channel = [a for a in operands if _has_every_channel(static_shape(a), out, axis)]
    if not every_channel:
        return Fail(f"no operand of {op_name(ctx.gm, node)} has every channel")
    return [((whole or every_channel)[0], axis)]


def _has_every_channel(shape: tuple[int, ...] | None, out: tuple[int, ...], axis: int) -> bool:
    """An operand of this ``shape`` is not broadcast along the channel ``axis`` of ``out``."""
    return shape is not None and len(shape) >= -axis and shape[axis] == out[axis]
