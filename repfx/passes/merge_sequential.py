"""merge_sequential: a pointwise conv (or a linear) feeding only another conv (or linear)
becomes one op.

``W₂ ∗ (W₁·x + b₁) + b₂ = (W₂·W₁) ∗ x + (b₂ + W₂ ∗ b₁)`` for a 1×…×1, stride-1 first conv with
the same groups as the second, or before a depthwise second
(``repfx.algebra.compose_pointwise_then_conv``); BN or per-channel affines between them are
already folded into the first by ``fold_bn`` / ``fold_channel_affine``. The first conv's own
zero padding carries over (its border is ``b₁``, which the composition reproduces); the second
conv's zero padding is exact only when ``b₁ = 0`` (DBB's 1×1 → BN → K×K trap). Done only when
the composed op costs no more multiply-adds than the two it replaces — composing a
channel-reducing bottleneck would make the model slower.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from ..algebra import ConvKernel, compose_pointwise_then_conv
from ..graph import RANK_KEY, has_hooks, module_of, shape_users, value_users, where
from ..ops import LinearOp, linear_op
from ..report import Folded, Skipped
from ..rewrite import new_conv, replace_node
from .base import FoldContext, PassResult, apply_rule


def kernel_of(op: LinearOp) -> ConvKernel:
    weight = op.weight.detach().to(torch.float64)
    bias = (
        torch.zeros(op.out_channels, dtype=torch.float64)
        if op.bias is None
        else op.bias.detach().to(torch.float64)
    )
    if op.kind == "linear":
        return ConvKernel(weight, bias, (), (), (), 1)
    g = op.geometry
    return ConvKernel(weight, bias, g.stride, g.padding, g.dilation, op.groups)


def _is_pointwise(op: LinearOp) -> bool:
    """1×…×1, stride 1; padding allowed (zeros: its border is the bias)."""
    if op.kind == "linear":
        return True
    g = op.geometry
    return (
        g is not None
        and all(k == 1 for k in op.weight.shape[2:])
        and all(s == 1 for s in g.stride)
        and (g.padding_mode == "zeros" or not any(g.padding))
    )


def has_bias(op: LinearOp) -> bool:
    """A bias that is not all zeros."""
    return op.bias is not None and bool(torch.any(op.bias != 0))


def composition_reason(first: LinearOp, second: LinearOp) -> str | None:
    """Why ``second(first(x))`` is not exactly one conv / linear (``None``: it is)."""
    pairs = {("conv", "conv"), ("linear", "linear"), ("conv", "avg_pool")}
    if (first.kind, second.kind) not in pairs:
        return f"{first.kind} then {second.kind} is not composed"
    if first.spatial_dims != second.spatial_dims:
        return "convs of different spatial dims"
    if not _is_pointwise(first):
        return "first conv is not 1×1 with stride 1"
    if second.kind != "linear" and second.geometry is None:
        return "second conv has no explicit symmetric padding"
    if not _groups_compose(first, second):
        return "convs have different groups"
    if second.zero_padded and has_bias(first):
        return "a bias before a zero-padded conv is not exact"
    if _reflects_padded_border(first, second):
        return "the second conv would pad the first's border by reflection"
    if first.weight.dtype != second.weight.dtype:
        return "convs have different dtypes"
    return None


def _groups_compose(first: LinearOp, second: LinearOp) -> bool:
    """The same groups, or a depthwise second whose channels split evenly into the first's
    groups."""
    depthwise = second.groups == second.in_channels == second.out_channels
    return first.groups == second.groups or (depthwise and second.in_channels % first.groups == 0)


def _reflects_padded_border(first: LinearOp, second: LinearOp) -> bool:
    """Would the second op pad, other than with zeros, the border the first one padded?"""
    first_pads = first.kind == "conv" and any(first.geometry.padding)
    second_pads = second.kind != "linear" and any(second.geometry.padding)
    return first_pads and second_pads and second.geometry.padding_mode != "zeros"


def _reason(ctx: FoldContext, first: LinearOp, second: LinearOp) -> str | None:
    if (reason := composition_reason(first, second)) is not None:
        return reason
    if shape_users(first.node):
        return "the first op's output shape is read elsewhere"
    for op in (first, second):
        if op.node.op == "call_module" and has_hooks(module_of(ctx.gm, op.node)):
            return f"{op.kind} module has hooks"
    if _composed_cost(first, second) > _separate_cost(first, second):
        return "the composed op would cost more multiply-adds than the two ops"
    return None


def _taps(op: LinearOp) -> int:
    return math.prod(op.weight.shape[2:])


def _composed_cost(first: LinearOp, second: LinearOp) -> int:
    """Multiply-adds per output position of the composed op."""
    return second.out_channels * (first.in_channels // first.groups) * _taps(second)


def _separate_cost(first: LinearOp, second: LinearOp) -> int:
    """Multiply-adds per output position of the two ops (the first runs at the input
    resolution, ``prod(stride)`` positions per output position of the second)."""
    stride = math.prod(second.geometry.stride) if second.kind == "conv" else 1
    first_cost = first.out_channels * (first.in_channels // first.groups) * stride
    return first_cost + second.out_channels * (second.in_channels // second.groups) * _taps(second)


def _free_path(gm: fx.GraphModule, base: str) -> str:
    path, i = base, 1
    while True:
        owner, _, name = path.rpartition(".")
        try:
            parent = gm.get_submodule(owner) if owner else gm
        except AttributeError:
            return path
        if not hasattr(parent, name):
            return path
        path, i = f"{base}_{i}", i + 1


class MergeSequential:
    name = "merge_sequential"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        return apply_rule(gm, self._visit)

    def _visit(self, ctx: FoldContext, node: fx.Node) -> Folded | Skipped | None:
        second = linear_op(ctx.gm, node, ctx.consts)
        if second is None or value_users(second.input) != [node]:
            return None
        first = linear_op(ctx.gm, second.input, ctx.consts)
        if first is None:
            return None
        if (reason := _reason(ctx, first, second)) is not None:
            return Skipped(self.name, where(node), reason)
        return self._compose(ctx, first, second)

    def _compose(self, ctx: FoldContext, first: LinearOp, second: LinearOp) -> Folded | Skipped:
        kernel = compose_pointwise_then_conv(kernel_of(first), kernel_of(second))
        # the composed padding is the first's (zeros: its border is b₁) or the second's (its
        # mode: reflecting / replicating commutes with a pointwise conv), never both
        second_pads = second.kind == "conv" and any(second.geometry.padding)
        mode = second.geometry.padding_mode if second_pads else "zeros"
        base = second.node.target if second.node.op == "call_module" else where(second.node)

        def rewrite() -> tuple[list[fx.Node], str]:
            module = new_conv(kernel, second.weight.dtype, mode)
            path = _free_path(ctx.gm, f"{base.replace(':', '_')}_composed")
            ctx.gm.add_submodule(path, module)
            with ctx.gm.graph.inserting_before(second.node):
                new = ctx.gm.graph.call_module(path, (first.input,))
            new.meta.update(second.node.meta)
            new.meta[RANK_KEY] = second.node.meta.get(RANK_KEY)
            detail = f"composed with {where(first.node)} into {path}"
            replace_node(second.node, new)
            return [new], detail

        return ctx.commit(self.name, where(second.node), [second.node], [first.input], rewrite)
