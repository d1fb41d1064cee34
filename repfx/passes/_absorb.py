"""Absorbing one per-channel affine ``a(x) = s ⊙ x + t`` into a neighbour — the rule shared by
``fold_bn`` and ``fold_channel_affine``. Tried in order:

1. into its producer ``p`` when ``a`` is ``p``'s only user, looking back through layout ops
   that keep the channel axis (flatten, permute, transpose, view): a conv / linear / transposed
   conv (output side, ``W' = s ⊙_out W``, ``b' = s·b + t``), a norm's ``γ' = s·γ``,
   ``β' = s·β + t``, or another affine (composition: one op instead of two);
2. into its only consumer, a conv / linear (input side, ``W' = W ⊙_in s``, ``b' = b + W∗t``),
   when no zero padding meets a non-zero shift ``t``.

Each candidate is checked first (a failed check is a :class:`Reason`); only a candidate that
passes every check returns a :class:`Plan`, which the commit point proves and applies.
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
from ..graph import has_hooks, module_of, value_users, where
from ..ops import (
    AffineOp,
    LinearOp,
    NormOp,
    affine_op,
    layout_source_axis,
    linear_op,
    merge_axes,
    norm_op,
)
from ..report import Folded, Skipped
from ..rewrite import erase_dead, hint_for, insert_affine, set_slot
from .base import FoldContext, PassResult, Rewrite, apply_rule


class Reason(str):
    """Why a candidate rewrite does not apply."""


@dataclass(frozen=True)
class Plan:
    """A checked candidate: the region it replaces (``outputs`` from ``inputs``) and the
    rewrite, which changes the graph and returns the new output nodes and a description."""

    outputs: list[fx.Node]
    inputs: list[fx.Node]
    rewrite: Rewrite


def describe(ctx: FoldContext, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(ctx.gm.get_submodule(node.target)).__name__
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def absorb(ctx: FoldContext, op: AffineOp, rule: str) -> Folded | str:
    """Fold ``op`` into a neighbour; returns the record, or why no neighbour can take it."""
    location = where(op.node)
    if op.node.op == "call_module" and has_hooks(module_of(ctx.gm, op.node)):
        return f"{describe(ctx, op.node)} has hooks"
    producer = _producer_rewrite(ctx, op)
    plan = producer if not isinstance(producer, Reason) else _consumer_rewrite(ctx, op)
    if isinstance(plan, Reason):
        return f"{producer}; {plan}"
    outcome = ctx.commit(rule, location, plan.outputs, plan.inputs, plan.rewrite)
    return outcome if isinstance(outcome, Folded) else outcome.reason


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


def _fits(op: AffineOp, axis: int | None, channels: int, dtype: torch.dtype) -> str | None:
    if op.dtype is not None and op.dtype != dtype:
        return f"affine constants are {op.dtype}, the op's are {dtype}"
    if op.axis is not None and axis is None:
        return "channel axis of the op is unknown (pass example inputs)"
    if op.axis is not None and op.axis != axis:
        return f"affine acts on axis {op.axis}, the op's channels are on axis {axis}"
    if op.channels not in (1, channels):
        return f"affine has {op.channels} channels, the op has {channels}"
    return None


def affine_dtype(result: fx.Node, ops: list[AffineOp]) -> torch.dtype | None:
    """The dtype a replacement affine computing ``result`` from ``ops`` must hold its constants
    in: ``result``'s recorded dtype, else that of the ops' tensor constants. ``None``: unknown
    (only Python scalars, no shapes propagated) — a constant in a guessed dtype could promote
    the tensor (float16 → float32) or round it (float64 → float32)."""
    meta = result.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "dtype"):
        return meta.dtype
    dtypes = {op.dtype for op in ops if op.dtype is not None}
    return dtypes.pop() if len(dtypes) == 1 else None


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


def _producer_rewrite(ctx: FoldContext, op: AffineOp) -> Plan | Reason:
    """Fold ``op`` into the op producing its input; the region is from that op's input to
    ``op``."""
    moved, walked = _through_layout(op)
    p = moved.input
    if len(users := value_users(p)) != 1:
        return Reason(f"producer {describe(ctx, p)} has {len(users)} users")
    if (lin := linear_op(ctx.gm, p, ctx.consts)) is not None:
        rewrite = _linear_output_rewrite(ctx, moved, lin)
    elif (norm := norm_op(ctx.gm, p, ctx.consts)) is not None:
        rewrite = _norm_rewrite(ctx, moved, norm)
    elif (inner := affine_op(ctx.gm, p, ctx.consts)) is not None:
        rewrite = _compose_rewrite(ctx, inner, moved)
    else:
        return Reason(f"producer {describe(ctx, p)} is not a conv, linear, norm or affine")
    if isinstance(rewrite, Reason):
        return rewrite
    through = ", ".join(describe(ctx, n) for n in walked)
    suffix = f" (through {through})" if walked else ""

    def fold_then_remove() -> tuple[list[fx.Node], str]:
        detail = rewrite()
        return [_remove(ctx, op)], detail + suffix

    return Plan([op.node], _region_inputs(ctx, p), fold_then_remove)


def _region_inputs(ctx: FoldContext, node: fx.Node) -> list[fx.Node]:
    """The non-constant values ``node`` reads: where a region ending at ``node`` starts."""
    return [n for n in node.all_input_nodes if not ctx.consts.is_constant(n)]


def _linear_output_rewrite(
    ctx: FoldContext, op: AffineOp, lin: LinearOp
) -> Callable[[], str] | Reason:
    if (bad := _fits(op, lin.channel_axis, lin.out_channels, lin.weight.dtype)) is not None:
        return Reason(f"producer {lin.kind}: {bad}")
    if (shared := ctx.shared_reason(lin.node, lin.kind)) is not None:
        return Reason(f"producer {shared}")

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


def _norm_rewrite(ctx: FoldContext, op: AffineOp, norm: NormOp) -> Callable[[], str] | Reason:
    if (bad := _fits(op, norm.channel_axis, norm.channels, norm.dtype)) is not None:
        return Reason(f"producer {norm.kind}: {bad}")
    if (shared := ctx.shared_reason(norm.node, norm.kind)) is not None:
        return Reason(f"producer {shared}")

    def rewrite() -> str:
        affine = _expand(op.affine, norm.channels)
        gamma, beta = fold_affine_into_norm(norm.weight, norm.bias, affine, norm.dtype)
        hint = hint_for(norm.node)
        set_slot(ctx.gm, norm.weight_slot, gamma, f"{hint}_weight")
        set_slot(ctx.gm, norm.bias_slot, beta, f"{hint}_bias")
        return f"into {norm.kind} {where(norm.node)}"

    return rewrite


def _compose_rewrite(
    ctx: FoldContext, inner: AffineOp, outer: AffineOp
) -> Callable[[], str] | Reason:
    axis = merge_axes(inner.axis, outer.axis)
    if axis is False:
        return Reason("producer affine acts on another channel axis")
    if len({inner.channels, outer.channels} - {1}) > 1:
        return Reason("producer affine has a different channel count")
    if (shared := ctx.shared_reason(inner.node, inner.kind)) is not None:
        return Reason(f"producer {shared}")  # e.g. a BN with hooks, which would not run
    dtype = affine_dtype(outer.node, [inner, outer])
    if dtype is None:
        return Reason("the affines' dtype is unknown (pass example inputs)")

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


def _consumer_rewrite(ctx: FoldContext, op: AffineOp) -> Plan | Reason:
    """Fold ``op`` into its only consumer; the region is from ``op``'s input to the consumer."""
    users = value_users(op.node)
    if len(users) != 1:
        return Reason(f"output has {len(users)} users")
    c = users[0]
    lin = linear_op(ctx.gm, c, ctx.consts)
    if lin is None or lin.input is not op.node:
        return Reason(f"consumer {describe(ctx, c)} is not a conv or linear")
    if lin.kind == "conv_transpose":
        return Reason("consumer is a transposed conv (input-side fold not supported)")
    if (bad := _fits(op, lin.channel_axis, lin.in_channels, lin.weight.dtype)) is not None:
        return Reason(f"consumer {lin.kind}: {bad}")
    if lin.zero_padded and op.affine.has_shift():
        return Reason("consumer conv zero-pads its input: a shift before it is not exact")
    if (shared := ctx.shared_reason(c, lin.kind)) is not None:
        return Reason(f"consumer {shared}")

    def rewrite() -> tuple[list[fx.Node], str]:
        affine = _expand(op.affine, lin.in_channels)
        w, b = fold_affine_into_conv_input(lin.weight, lin.bias, affine, lin.groups)
        hint = hint_for(c)
        set_slot(ctx.gm, lin.weight_slot, w, f"{hint}_weight")
        if b is not None:
            set_slot(ctx.gm, lin.bias_slot, b, f"{hint}_bias")
        _remove(ctx, op)
        return [c], f"into the input of {lin.kind} {where(c)}"

    return Plan([c], _region_inputs(ctx, op.node), rewrite)


# --------------------------------------------------------------------------- the pass loop


Selector = Callable[[FoldContext, fx.Node], "AffineOp | str | None"]


def absorb_each(gm: fx.GraphModule, rule: str, select: Selector) -> PassResult:
    """Try :func:`absorb` on every affine that ``select`` picks (it returns the view, a reason
    the node is not a candidate worth reporting, or ``None`` to ignore the node)."""

    def visit(ctx: FoldContext, node: fx.Node) -> Folded | Skipped | None:
        picked = select(ctx, node)
        if picked is None:
            return None
        location = where(node)
        outcome = picked if isinstance(picked, str) else absorb(ctx, picked, rule)
        return Skipped(rule, location, outcome) if isinstance(outcome, str) else outcome

    return apply_rule(gm, visit)
