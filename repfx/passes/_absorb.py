"""Absorbing one per-channel affine ``a(x) = s ⊙ x + t`` into a neighbour — the rule shared by
``fold_bn`` and ``fold_channel_affine``. Tried in order:

1. into its producer ``p`` when ``a`` is ``p``'s only user:
   conv / linear / transposed conv (output side), a norm's ``γ, β``, or another affine
   (composition ``a ∘ p``, one op instead of two);
2. into its only consumer, a conv / linear (input side), when no zero padding meets a non-zero
   shift ``t``.

Each returns either a :class:`Folded` record or the reason it does not apply.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from ..algebra import (
    ChannelAffine,
    fold_affine_into_conv_input,
    fold_affine_into_conv_output,
    fold_affine_into_conv_transpose_output,
    fold_affine_into_norm,
)
from ..graph import where
from ..ops import AffineOp, LinearOp, NormOp, affine_op, linear_op, merge_axes, norm_op
from ..report import Folded, Skipped
from ..rewrite import erase_dead, hint_for, insert_affine, replace_node, set_slot
from .base import FoldContext, PassResult


def describe(ctx: FoldContext, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(ctx.gm.get_submodule(node.target)).__name__
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def absorb(ctx: FoldContext, op: AffineOp, rule: str) -> Folded | str:
    """Fold ``op`` into a neighbour; returns the record, or why no neighbour can take it."""
    producer = _into_producer(ctx, op)
    if not isinstance(producer, _Reason):
        return Folded(rule, where(op.node), producer)
    consumer = _into_consumer(ctx, op)
    if not isinstance(consumer, _Reason):
        return Folded(rule, where(op.node), consumer)
    return f"{producer}; {consumer}"


class _Reason(str):
    """A string that means 'not done, because ...' (a plain ``str`` is a fold's detail)."""


def _expand(affine: ChannelAffine, channels: int) -> ChannelAffine:
    return ChannelAffine(
        affine.scale.expand(channels).clone(), affine.shift.expand(channels).clone()
    )


def _fits(op: AffineOp, axis: int | None, channels: int) -> str | None:
    if op.axis is not None and axis is not None and op.axis != axis:
        return f"affine acts on axis {op.axis}, the op's channels are on axis {axis}"
    if op.axis is not None and axis is None:
        return "channel axis of the op is unknown (pass example inputs)"
    if op.channels not in (1, channels):
        return f"affine has {op.channels} channels, the op has {channels}"
    return None


def _dtype_of(op: AffineOp) -> torch.dtype:
    meta = op.node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "dtype"):
        return meta.dtype
    return op.dtype or torch.get_default_dtype()


# --------------------------------------------------------------------------- producer side


def _into_producer(ctx: FoldContext, op: AffineOp) -> str:
    """The fold's detail when it is done, else a :class:`_Reason`."""
    p = op.input
    if len(p.users) != 1:
        return _Reason(f"producer {describe(ctx, p)} has {len(p.users)} users")
    if (lin := linear_op(ctx.gm, p, ctx.consts)) is not None:
        return _into_linear_output(ctx, op, lin)
    if (norm := norm_op(ctx.gm, p, ctx.consts)) is not None:
        return _into_norm(ctx, op, norm)
    if (inner := affine_op(ctx.gm, p, ctx.consts)) is not None:
        return _compose(ctx, inner, op)
    return _Reason(f"producer {describe(ctx, p)} is not a conv, linear, norm or affine")


def _into_linear_output(ctx: FoldContext, op: AffineOp, lin: LinearOp) -> str:
    if (bad := _fits(op, lin.channel_axis, lin.out_channels)) is not None:
        return _Reason(f"producer {lin.kind}: {bad}")
    if (shared := ctx.shared_reason(lin.node, lin.kind)) is not None:
        return _Reason(f"producer {shared}")
    affine = _expand(op.affine, lin.out_channels)
    if lin.kind == "conv_transpose":
        w, b = fold_affine_into_conv_transpose_output(lin.weight, lin.bias, affine, lin.groups)
    else:
        w, b = fold_affine_into_conv_output(lin.weight, lin.bias, affine)
    hint = hint_for(lin.node)
    set_slot(ctx.gm, lin.weight_slot, w, f"{hint}_weight")
    set_slot(ctx.gm, lin.bias_slot, b, f"{hint}_bias")
    replace_node(op.node, lin.node)
    return f"into {lin.kind} {where(lin.node)}"


def _into_norm(ctx: FoldContext, op: AffineOp, norm: NormOp) -> str:
    if (bad := _fits(op, norm.channel_axis, norm.channels)) is not None:
        return _Reason(f"producer {norm.kind}: {bad}")
    if (shared := ctx.shared_reason(norm.node, norm.kind)) is not None:
        return _Reason(f"producer {shared}")
    affine = _expand(op.affine, norm.channels)
    gamma, beta = fold_affine_into_norm(norm.weight, norm.bias, affine, norm.dtype)
    hint = hint_for(norm.node)
    set_slot(ctx.gm, norm.weight_slot, gamma, f"{hint}_weight")
    set_slot(ctx.gm, norm.bias_slot, beta, f"{hint}_bias")
    replace_node(op.node, norm.node)
    return f"into {norm.kind} {where(norm.node)}"


def _compose(ctx: FoldContext, inner: AffineOp, outer: AffineOp) -> str:
    axis = merge_axes(inner.axis, outer.axis)
    if axis is False:
        return _Reason("producer affine acts on another axis")
    if inner.channels not in (1, outer.channels) and outer.channels != 1:
        return _Reason("producer affine has a different channel count")
    combined = inner.affine.then(outer.affine)
    new = insert_affine(
        ctx.gm, inner.input, combined, axis, _dtype_of(outer), outer.node, hint_for(inner.node)
    )
    replace_node(outer.node, new)
    return f"composed with {inner.kind} {where(inner.node)}"


# --------------------------------------------------------------------------- consumer side


def _into_consumer(ctx: FoldContext, op: AffineOp) -> str:
    users = list(op.node.users)
    if len(users) != 1:
        return _Reason(f"output has {len(users)} users")
    c = users[0]
    lin = linear_op(ctx.gm, c, ctx.consts)
    if lin is None or lin.input is not op.node:
        return _Reason(f"consumer {describe(ctx, c)} is not a conv or linear")
    if lin.kind == "conv_transpose":
        return _Reason("consumer is a transposed conv (input-side fold not supported)")
    if (bad := _fits(op, lin.channel_axis, lin.in_channels)) is not None:
        return _Reason(f"consumer {lin.kind}: {bad}")
    if lin.zero_padded and op.affine.has_shift():
        return _Reason("consumer conv zero-pads its input: a shift before it is not exact")
    if (shared := ctx.shared_reason(c, lin.kind)) is not None:
        return _Reason(f"consumer {shared}")
    affine = _expand(op.affine, lin.in_channels)
    w, b = fold_affine_into_conv_input(lin.weight, lin.bias, affine, lin.groups)
    hint = hint_for(c)
    set_slot(ctx.gm, lin.weight_slot, w, f"{hint}_weight")
    if b is not None:
        set_slot(ctx.gm, lin.bias_slot, b, f"{hint}_bias")
    c.replace_input_with(op.node, op.input)
    erase_dead(op.node)
    return f"into the input of {lin.kind} {where(c)}"


Selector = Callable[[FoldContext, fx.Node], "AffineOp | str | None"]


def absorb_each(gm: fx.GraphModule, rule: str, select: Selector) -> PassResult:
    """Try :func:`absorb` on every affine that ``select`` picks (it returns the view, a reason
    the node is not a candidate worth reporting, or ``None`` to ignore the node)."""
    result = PassResult(modified=False)
    ctx = FoldContext(gm)
    for node in list(gm.graph.nodes):
        if node._erased:
            continue
        picked = select(ctx, node)
        if picked is None:
            continue
        outcome = picked if isinstance(picked, str) else absorb(ctx, picked, rule)
        if isinstance(outcome, str):
            result.skipped.append(Skipped(rule, where(node), outcome))
            continue
        result.folded.append(outcome)
        result.modified = True
        ctx.refresh()
    return result
