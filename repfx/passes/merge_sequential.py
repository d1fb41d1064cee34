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
from dataclasses import dataclass

from torch import fx

from ..algebra import compose_pointwise_then_conv
from ..ir.graph import RANK_KEY, has_hooks, module_of, shape_users, value_users, where
from ..ir.match import Fail
from ..ir.ops import LinearOp, linear_op
from ._common import composition_reason, kernel_of
from .base import FoldContext, NodeRule, Region
from .rewrite import new_conv, replace_node


def _reason(ctx: FoldContext, first: LinearOp, second: LinearOp) -> Fail | None:
    """Why ``second(first(x))`` is not worth composing into one op (``None``: it is)."""
    if (fail := composition_reason(first, second)) is not None:
        return fail
    if shape_users(first.node):
        return Fail("the first op's output shape is read elsewhere")
    for op in (first, second):
        if op.node.op == "call_module" and has_hooks(module_of(ctx.gm, op.node)):
            return Fail(f"{op.kind} module has hooks")
    if _composed_cost(first, second) > _separate_cost(first, second):
        return Fail("the composed op would cost more multiply-adds than the two ops")
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


@dataclass
class _Sequence:
    """``second(first(x))``, two convs or linears."""

    node: fx.Node  # the second op, which the composed op replaces
    first: LinearOp
    second: LinearOp


class MergeSequential(NodeRule):
    name = "merge_sequential"
    words = "sequential convs merged"  # one fold, in a report

    def match(self, ctx: FoldContext, node: fx.Node) -> _Sequence | None:
        """A conv or linear whose input is only read by it, computed by another one."""
        second = linear_op(ctx.gm, node, ctx.consts)
        if second is None or value_users(second.input) != [node]:
            return None
        first = linear_op(ctx.gm, second.input, ctx.consts)
        return None if first is None else _Sequence(node, first, second)

    def check(self, ctx: FoldContext, pair: _Sequence) -> Fail | None:
        return _reason(ctx, pair.first, pair.second)

    def region(self, ctx: FoldContext, pair: _Sequence) -> Region:
        return Region([pair.second.node], [pair.first.input])

    def rewrite(self, ctx: FoldContext, pair: _Sequence) -> tuple[list[fx.Node], str]:
        first, second = pair.first, pair.second
        kernel = compose_pointwise_then_conv(kernel_of(first), kernel_of(second))
        # the composed padding is the first's (zeros: its border is b₁) or the second's (its
        # mode: reflecting / replicating commutes with a pointwise conv), never both
        second_pads = second.kind == "conv" and any(second.geometry.padding)
        mode = second.geometry.padding_mode if second_pads else "zeros"
        base = second.node.target if second.node.op == "call_module" else where(second.node)
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
