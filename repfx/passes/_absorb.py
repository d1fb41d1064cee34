"""Absorbing one per-channel affine ``a(x) = s ⊙ x + t`` into a neighbour — the rule shared by
``fold_bn`` and ``fold_channel_affine``. Tried in order:

1. into its producer ``p`` when ``a`` is ``p``'s only user, looking back through layout ops
   that keep the channel axis (flatten, permute, transpose, view): a conv / linear / transposed
   conv (output side, ``W' = s ⊙_out W``, ``b' = s·b + t``), a norm's ``γ' = s·γ``,
   ``β' = s·β + t``, or another affine (composition: one op instead of two);
2. into its only consumer, a conv / linear (input side, ``W' = W ⊙_in s``, ``b' = b + W∗t``),
   looking forward through single-use ops that act on each channel alone and commute with
   ``a`` (a mean over other axes, an average pool that divides by the taps it reads, layout
   ops), when no zero padding meets a non-zero shift ``t``;
3. a scale (``t = 0``) only: back through sums and channel-wise ops into every op computing
   its input (``repfx.passes._scale_region``).

Never worse: a bias-free linear does not gain a bias (ONNX Runtime then rewrites its
``MatMul`` as ``Reshape → Gemm → Reshape``).

:class:`AbsorbRule` is the rule: its ``match`` (each rule's own) picks the affine, its ``check``
refuses a hooked one, and its ``plan`` tries the neighbours in that order. Each neighbour is
checked first (a failed check is a :class:`repfx.ir.match.Fail`); only one that passes every
check gives a :class:`~repfx.passes.base.Plan` (the region and the rewrite), which the commit
point proves and applies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import fx

from ..algebra import (
    ChannelAffine,
    fold_affine_into_conv_input,
    fold_affine_into_conv_output,
    fold_affine_into_conv_transpose_output,
    fold_affine_into_norm,
)
from ..ir.graph import has_hooks, module_of, op_name, rank_of, value_users, where
from ..ir.match import Fail
from ..ir.ops import (
    AffineOp,
    Channelwise,
    LinearOp,
    NormOp,
    affine_op,
    channelwise_source,
    layout_source_axis,
    linear_op,
    merge_axes,
    norm_op,
)
from ._scale_region import scaled_region
from .base import FoldContext, NodeRule, Plan, Region
from .rewrite import erase_dead, hint_for, insert_affine, set_slot


class AbsorbRule(NodeRule):
    """A rule that absorbs each per-channel affine its ``match`` picks (an :class:`AffineOp`, a
    :class:`Fail` for a candidate that is no affine, worth reporting, or ``None``) into a
    neighbour."""

    def match(self, ctx: FoldContext, node: fx.Node) -> AffineOp | Fail | None:
        raise NotImplementedError(f"{type(self).__name__} defines no match")

    def check(self, ctx: FoldContext, op: AffineOp) -> Fail | None:
        return unhooked(ctx, op)

    def plan(self, ctx: FoldContext, op: AffineOp) -> Plan | Fail:
        """The plan of the first candidate neighbour that can take ``op`` (producer, consumers,
        the scaled region), or every candidate's reason, in that order."""
        reasons: list[str] = []
        for neighbour in (_producer_plan, _consumer_plan, _scaled_region_plan):
            plan = neighbour(ctx, op)
            if isinstance(plan, Plan):
                return plan
            if plan is not None:
                reasons.append(plan.reason)
        return Fail("; ".join(reasons))


def describe(ctx: FoldContext, node: fx.Node) -> str:
    return op_name(ctx.gm, node)


def unhooked(ctx: FoldContext, op: AffineOp) -> Fail | None:
    """Why ``op`` may not move: its module has hooks, which would no longer run."""
    if op.node.op == "call_module" and has_hooks(module_of(ctx.gm, op.node)):
        return Fail(f"{describe(ctx, op.node)} has hooks")
    return None


def _remove(ctx: FoldContext, op: AffineOp) -> fx.Node:
    """Drop the affine from the graph (its effect has been moved); return what replaced it."""
    replacement = op.input
    if replacement._erased:  # the producer was itself replaced (composition): read what op reads
        replacement = next(n for n in op.node.all_input_nodes if not ctx.consts.is_constant(n))
    op.node.replace_all_uses_with(replacement)
    erase_dead(op.node)
    return replacement


def _expand(affine: ChannelAffine, channels: int) -> ChannelAffine:
    return ChannelAffine(
        affine.scale.expand(channels).clone(), affine.shift.expand(channels).clone()
    )


def _fits(op: AffineOp, axis: int | None, channels: int, dtype: torch.dtype) -> Fail | None:
    """Why ``op`` does not fit an op with ``channels`` channels on ``axis`` holding its
    constants in ``dtype`` (``None``: it fits)."""
    if op.dtype is not None and op.dtype != dtype:
        return Fail(f"affine constants are {op.dtype}, the op's are {dtype}")
    if op.axis is not None and axis is None:
        return Fail("channel axis of the op is unknown (pass example inputs)")
    if op.axis is not None and op.axis != axis:
        return Fail(f"affine acts on axis {op.axis}, the op's channels are on axis {axis}")
    if op.channels not in (1, channels):
        return Fail(f"affine has {op.channels} channels, the op has {channels}")
    return None


def affine_dtype(result: fx.Node, ops: list[AffineOp]) -> torch.dtype | None:
    """The dtype a replacement affine computing ``result`` from ``ops`` must hold its constants
    in: ``result``'s recorded dtype, else that of the ops' tensor constants where it is a
    floating dtype. ``None``: unknown (only Python scalars, no shapes propagated) — a constant
    in a guessed dtype could promote the tensor (float16 → float32) or round it (float64 →
    float32); an integer constant (``x * arange(C)``) scales a float tensor into a float
    result, so its dtype is not the result's (held in it, ``2.5 · k`` would truncate)."""
    meta = result.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "dtype"):
        return meta.dtype
    dtypes = {op.dtype for op in ops if op.dtype is not None}
    if len(dtypes) != 1:
        return None
    dtype = dtypes.pop()
    return dtype if dtype.is_floating_point else None


# --------------------------------------------------------------------------- producer side


def _through_layout(op: AffineOp) -> tuple[AffineOp, list[fx.Node]]:
    """Walk back from ``op`` through single-use layout ops that keep its channel axis; return
    the affine re-expressed at the far end (``input`` and ``axis`` there), and the ops walked."""
    node, axis, walked = op.input, op.axis, []
    while len(value_users(node)) == 1:
        found = layout_source_axis(node, axis)
        if found is None:
            break
        walked.append(node)
        node, axis = found
    return replace(op, input=node, axis=axis), walked


def _producer_plan(ctx: FoldContext, op: AffineOp) -> Plan | Fail:
    """Fold ``op`` into the op producing its input; the region is from that op's input to
    ``op``."""
    moved, walked = _through_layout(op)
    p = moved.input
    if len(users := value_users(p)) != 1:
        return Fail(f"producer {describe(ctx, p)} has {len(users)} users")
    rewrite = _into_producer(ctx, moved, p)
    if isinstance(rewrite, Fail):
        return rewrite
    through = ", ".join(describe(ctx, n) for n in walked)
    suffix = f" (through {through})" if walked else ""

    def fold_then_remove() -> tuple[list[fx.Node], str]:
        detail = rewrite()
        return [_remove(ctx, op)], detail + suffix

    return Plan(Region([op.node], _region_inputs(ctx, p)), fold_then_remove)


def _into_producer(ctx: FoldContext, op: AffineOp, p: fx.Node) -> Callable[[], str] | Fail:
    """The rewrite folding ``op`` (re-expressed at ``p``'s output) into ``p``."""
    if (lin := linear_op(ctx.gm, p, ctx.consts)) is not None:
        return _linear_output_rewrite(ctx, op, lin)
    if (norm := norm_op(ctx.gm, p, ctx.consts)) is not None:
        return _norm_rewrite(ctx, op, norm)
    if (inner := affine_op(ctx.gm, p, ctx.consts)) is not None:
        return _compose_rewrite(ctx, inner, op)
    return Fail(f"producer {describe(ctx, p)} is not a conv, linear, norm or affine")


def _region_inputs(ctx: FoldContext, node: fx.Node) -> list[fx.Node]:
    """The non-constant values ``node`` reads: where a region ending at ``node`` starts."""
    return [n for n in node.all_input_nodes if not ctx.consts.is_constant(n)]


def _linear_output_rewrite(
    ctx: FoldContext, op: AffineOp, lin: LinearOp
) -> Callable[[], str] | Fail:
    if (bad := _fits(op, lin.channel_axis, lin.out_channels, lin.weight.dtype)) is not None:
        return Fail(f"producer {lin.kind}: {bad.reason}")
    if (shared := ctx.shared_reason(lin.node, lin.kind)) is not None:
        return Fail(f"producer {shared.reason}")
    if _would_add_bias(lin, op):
        return Fail(f"producer {_ADDS_BIAS}")

    def rewrite() -> str:
        affine = _expand(op.affine, lin.out_channels)
        if lin.kind == "conv_transpose":
            w, b = fold_affine_into_conv_transpose_output(lin.weight, lin.bias, affine, lin.groups)
        else:
            w, b = fold_affine_into_conv_output(lin.weight, lin.bias, affine)
        hint = hint_for(lin.node)
        set_slot(ctx.gm, lin.weight_slot, w, f"{hint}_weight")
        set_slot(ctx.gm, lin.bias_slot, b, f"{hint}_bias")
        return f"into {lin.kind} {where(lin.node)}"

    return rewrite


def _norm_rewrite(ctx: FoldContext, op: AffineOp, norm: NormOp) -> Callable[[], str] | Fail:
    if (bad := _fits(op, norm.channel_axis, norm.channels, norm.dtype)) is not None:
        return Fail(f"producer {norm.kind}: {bad.reason}")
    if (shared := ctx.shared_reason(norm.node, norm.kind)) is not None:
        return Fail(f"producer {shared.reason}")
    if norm.bias_slot is None and op.affine.has_shift():
        return Fail(f"producer {norm.kind} has no bias to take the shift")

    def rewrite() -> str:
        affine = _expand(op.affine, norm.channels)
        gamma, beta = fold_affine_into_norm(norm.weight, norm.bias, affine, norm.dtype)
        hint = hint_for(norm.node)
        set_slot(ctx.gm, norm.weight_slot, gamma, f"{hint}_weight")
        if norm.bias_slot is not None:
            set_slot(ctx.gm, norm.bias_slot, beta, f"{hint}_bias")
        return f"into {norm.kind} {where(norm.node)}"

    return rewrite


def _compose_rewrite(
    ctx: FoldContext, inner: AffineOp, outer: AffineOp
) -> Callable[[], str] | Fail:
    axis = merge_axes(inner.axis, outer.axis)
    if isinstance(axis, Fail):
        return Fail("producer affine acts on another channel axis")
    if len({inner.channels, outer.channels} - {1}) > 1:
        return Fail("producer affine has a different channel count")
    if (shared := ctx.shared_reason(inner.node, inner.kind)) is not None:
        return Fail(f"producer {shared.reason}")  # e.g. a BN with hooks, which would not run
    dtype = affine_dtype(outer.node, [inner, outer])
    if dtype is None:
        return Fail("the affines' dtype is unknown (pass example inputs)")

    def rewrite() -> str:
        combined = inner.affine.then(outer.affine)
        new = insert_affine(
            ctx.gm, inner.input, combined, axis, dtype, inner.node, hint_for(inner.node)
        )
        inner.node.replace_all_uses_with(new)
        erase_dead(inner.node)
        return f"composed with {inner.kind} {where(inner.node)}"

    return rewrite


# --------------------------------------------------------------------------- consumer side


def _consumer_plan(ctx: FoldContext, op: AffineOp) -> Plan | Fail:
    """Fold ``op`` into its consumers, all of them convs or linears (each takes it on its input
    side: the q, k and v projections reading one norm), reached through single-use channel-wise
    ops that commute with it; the region is from ``op``'s input to the consumers."""
    walked = _walk_forward(ctx, op)
    end, axis = (walked[-1].node, walked[-1].axis) if walked else (op.node, op.axis)
    users = value_users(end)
    if not users:
        return Fail("output has no users")
    consumers = []
    for c in users:
        lin = input_side(ctx, replace(op, axis=axis), c, end)
        if isinstance(lin, Fail):
            return lin if len(users) == 1 else Fail(f"output has {len(users)} users; {lin.reason}")
        consumers.append(lin)
    through = ", ".join(describe(ctx, w.node) for w in walked)
    suffix = f" (through {through})" if walked else ""

    def rewrite() -> tuple[list[fx.Node], str]:
        for lin in consumers:
            fold_into_input(ctx, lin, op.affine)
        _remove(ctx, op)
        into = ", ".join(f"{lin.kind} {where(lin.node)}" for lin in consumers)
        return [lin.node for lin in consumers], f"into the input of {into}{suffix}"

    region = Region([lin.node for lin in consumers], _region_inputs(ctx, op.node))
    return Plan(region, rewrite)


def input_side(ctx: FoldContext, op: AffineOp, c: fx.Node, end: fx.Node) -> LinearOp | Fail:
    """``c`` as a conv / linear that can take ``op`` (re-expressed at ``end``) on its input."""
    lin = linear_op(ctx.gm, c, ctx.consts)
    if lin is None or lin.input is not end:
        return Fail(f"consumer {describe(ctx, c)} is not a conv or linear")
    if lin.kind == "conv_transpose":
        return Fail("consumer is a transposed conv (input-side fold not supported)")
    if (bad := _fits(op, lin.channel_axis, lin.in_channels, lin.weight.dtype)) is not None:
        return Fail(f"consumer {lin.kind}: {bad.reason}")
    if lin.zero_padded and op.affine.has_shift():
        return Fail("consumer conv zero-pads its input: a shift before it is not exact")
    if (shared := ctx.shared_reason(c, lin.kind)) is not None:
        return Fail(f"consumer {shared.reason}")
    if _would_add_bias(lin, op):
        return Fail(f"consumer {_ADDS_BIAS}")
    return lin


def fold_into_input(ctx: FoldContext, lin: LinearOp, affine: ChannelAffine) -> None:
    """``lin`` now computes ``lin(affine(x))`` from ``x``."""
    w, b = fold_affine_into_conv_input(
        lin.weight, lin.bias, _expand(affine, lin.in_channels), lin.groups
    )
    hint = hint_for(lin.node)
    set_slot(ctx.gm, lin.weight_slot, w, f"{hint}_weight")
    if b is not None:
        set_slot(ctx.gm, lin.bias_slot, b, f"{hint}_bias")


@dataclass(frozen=True)
class _Step:
    node: fx.Node
    axis: int | None  # the affine's channel axis at ``node``'s output


def _walk_forward(ctx: FoldContext, op: AffineOp) -> list[_Step]:
    """The single-use channel-wise ops after ``op`` that ``op`` commutes with (with its shift
    too, and with its sign), up to the first that is not one."""
    shift, nonnegative = op.affine.has_shift(), bool((op.affine.scale >= 0).all())
    walked: list[_Step] = []
    node, axis = op.node, op.axis
    while len(users := value_users(node)) == 1 and linear_op(ctx.gm, users[0], ctx.consts) is None:
        step = _channelwise_step(ctx, users[0], node, axis)
        if step is None or (shift and not step[1].keeps_constants):
            break
        if step[1].nonnegative_only and not nonnegative:
            break
        walked.append(_Step(users[0], step[0]))
        node, axis = users[0], step[0]
    return walked


def _channelwise_step(
    ctx: FoldContext, user: fx.Node, node: fx.Node, axis: int | None
) -> tuple[int | None, Channelwise] | None:
    """The output axis at which ``user`` passes channel ``axis`` of ``node`` on, and its view."""
    rank = rank_of(user)
    candidates = [None] if axis is None else range(-rank, 0) if rank else []
    for out_axis in candidates:
        found = channelwise_source(ctx.gm, user, out_axis, ctx.consts)
        if found is not None and found.input is node and found.axis == axis:
            return out_axis, found
    return None


_ADDS_BIAS = (
    "linear has no bias, and the shift would add one (ONNX Runtime would rewrite its MatMul as "
    "Reshape → Gemm → Reshape)"
)


# Affines a bias-free linear may take with their shift: a batch norm (removing it is worth a
# bias), a norm's own γ, β (moved on request: ``fold_norm_affine``).
BIAS_WORTHY = ("batch_norm", "norm_affine")


def _would_add_bias(lin: LinearOp, op: AffineOp) -> bool:
    """Would folding ``op`` give the bias-free linear ``lin`` a bias it is not worth? An
    arithmetic shift (``x + b``, StarReLU's ``s·relu(x)² + b``) costs less left as it is."""
    shift = op.affine.has_shift()
    return lin.kind == "linear" and lin.bias is None and shift and op.kind not in BIAS_WORTHY


# --------------------------------------------------------------------------- back through ops


def _scaled_region_plan(ctx: FoldContext, op: AffineOp) -> Plan | Fail | None:
    """Fold a scale into every op computing its input, through sums and channel-wise ops
    (``None``: ``op`` shifts too, and only a scale moves back through a sum)."""
    if op.affine.has_shift():
        return None
    region = scaled_region(ctx, op)
    if isinstance(region, Fail):
        return region
    rewrites, inputs = [], []
    for node, axis in region.terminals:
        rewrite = _into_producer(ctx, replace(op, input=node, axis=axis), node)
        if isinstance(rewrite, Fail):
            return rewrite
        rewrites.append(rewrite)
        inputs += _region_inputs(ctx, node)
    undo = []
    for node, axis in region.undo:
        lin = linear_op(ctx.gm, node, ctx.consts)
        if (bad := _fits(replace(op, axis=axis), lin.channel_axis, lin.in_channels,
                         lin.weight.dtype)) is not None:  # fmt: skip
            return Fail(f"{lin.kind} reading the scaled value: {bad.reason}")
        if (shared := ctx.shared_reason(node, lin.kind)) is not None:
            return Fail(f"{shared.reason} (it reads the scaled value)")
        undo.append(node)
    inverse = ChannelAffine(1.0 / op.affine.scale, torch.zeros_like(op.affine.shift))

    def fold_all_then_remove() -> tuple[list[fx.Node], str]:
        details = [rewrite() for rewrite in rewrites]
        for node in undo:  # viewed again: it may have taken the scale on its output too
            lin = linear_op(ctx.gm, node, ctx.consts)
            fold_into_input(ctx, lin, inverse)
            details.append(f"undone in the input of {lin.kind} {where(node)}")
        through = sorted({describe(ctx, n) for n in region.through})
        suffix = f" (through {', '.join(through)})" if through else ""
        return [_remove(ctx, op), *preserved], "; ".join(details) + suffix

    # An op that undoes the scale on its input keeps its output, unless it took the scale too.
    preserved = [n for n in undo if n not in dict(region.terminals)]
    inside = {*dict(region.terminals), *region.through}  # (a conv may read a scaled value)
    inputs = [n for n in dict.fromkeys(inputs) if n not in inside]
    return Plan(Region([op.node, *preserved], inputs), fold_all_then_remove)
