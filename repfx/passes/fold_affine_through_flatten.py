"""fold_affine_through_flatten: a per-channel affine whose only reader is ``flatten(·, 1)``,
whose only reader is a linear, folds into that linear.

For ``x`` of shape ``(N, C, *S)`` with ``P = ∏S`` positions per channel, ``flatten(x, 1)``
puts channel ``c`` at features ``c·P … c·P + P − 1``. With ``a(x) = s ⊙ x + t`` along the
channels and ``W`` viewed as ``(out, C, P)``::

    W · flatten(s ⊙ x + t) + b  =  W' · flatten(x) + b',
    W'[o, c, p] = W[o, c, p] · s[c],    b'[o] = b[o] + Σ_{c,p} W[o, c, p] · t[c].

The affine goes; the linear keeps its shape (a bias-free one gains a bias when ``t ≠ 0``).
Classifier heads of VGG-style CNNs end this way (``features → flatten → fc``), where
``fold_channel_affine`` cannot help: the flatten mixes the channel axis into the features.

Checks: the affine acts on axis 1 (or uniformly) of a tensor whose shape is known; the
flatten runs from axis 1 to the last; each op is the only reader of the one before; the linear
is not shared or hooked, nor the affine's module hooked; the dtypes agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..algebra import ChannelAffine
from ..ir.graph import arg_of, has_hooks, module_of, static_shape, value_users, where
from ..ir.match import Fail
from ..ir.ops import AffineOp, LinearOp, affine_op, linear_op
from .base import FoldContext, NodeRule, Region
from .rewrite import hint_for, replace_node, set_slot


def fold_affine_into_flattened_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, affine: ChannelAffine, positions: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``W · flatten(a(x)) + b`` as one linear of ``flatten(x)``: ``a`` acts on the ``C``
    channels of ``x``, each spread over ``positions`` consecutive features. Computed in
    float64, returned in ``weight``'s dtype; the bias stays ``None`` when there is neither a
    bias nor a shift."""
    out = weight.shape[0]
    w = weight.detach().to(torch.float64).reshape(out, affine.channels, positions)
    new_weight = (w * affine.scale.view(1, -1, 1)).reshape(weight.shape)
    if bias is None and not affine.has_shift():
        return new_weight.to(weight.dtype), None
    new_bias = (w * affine.shift.view(1, -1, 1)).sum(dim=(1, 2))
    if bias is not None:
        new_bias = new_bias + bias.detach().to(torch.float64)
    return new_weight.to(weight.dtype), new_bias.to(weight.dtype)


def _flattened_from_channels(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The tensor ``node`` flattens from axis 1 to its last (``torch.flatten(x, 1)``,
    ``x.flatten(1)``, ``nn.Flatten()``), or ``None``."""
    if node.op == "call_module":
        module = module_of(gm, node)
        spans = isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) == (1, -1)
        return node.args[0] if spans and len(node.args) == 1 and not node.kwargs else None
    if (node.op, node.target) not in (("call_function", torch.flatten), ("call_method", "flatten")):
        return None
    spans = arg_of(node, 1, "start_dim", 0) == 1 and arg_of(node, 2, "end_dim", -1) == -1
    return arg_of(node, 0, "input", None) if spans else None


@dataclass
class _Flattened:
    """``linear(flatten(affine(x), 1))``."""

    node: fx.Node  # the affine, which the fold removes
    affine: AffineOp
    linear: LinearOp

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The shape of the affine's output, which the flatten flattens."""
        return static_shape(self.affine.node)


class FoldAffineThroughFlatten(NodeRule):
    name = "fold_affine_through_flatten"
    words = "per-channel affine folded into a linear through a flatten"  # one fold, in a report

    def match(self, ctx: FoldContext, node: fx.Node) -> _Flattened | None:
        """A linear reading ``flatten(a, 1)`` of a per-channel affine ``a``, each the only
        value reader of the one before."""
        lin = linear_op(ctx.gm, node, ctx.consts)
        if lin is None or lin.kind != "linear" or value_users(lin.input) != [node]:
            return None
        source = _flattened_from_channels(ctx.gm, lin.input)
        op = affine_op(ctx.gm, source, ctx.consts) if isinstance(source, fx.Node) else None
        if op is None or value_users(op.node) != [lin.input]:
            return None
        return _Flattened(op.node, op, lin)

    def check(self, ctx: FoldContext, candidate: _Flattened) -> Fail | None:
        op, lin, shape = candidate.affine, candidate.linear, candidate.shape
        if shape is None or len(shape) < 3:
            return Fail("the shape before the flatten is unknown")
        if op.axis is not None and len(shape) + op.axis != 1:
            return Fail(
                f"the affine acts on axis {op.axis}, not on the channels the flatten spreads"
            )
        if op.channels not in (1, shape[1]) or lin.weight.shape[1] != math.prod(shape[1:]):
            return Fail("the linear's features are not the flattened channels")
        if op.dtype is not None and op.dtype != lin.weight.dtype:
            return Fail(f"affine constants are {op.dtype}, the linear's are {lin.weight.dtype}")
        if op.node.op == "call_module" and has_hooks(module_of(ctx.gm, op.node)):
            return Fail("the affine's module has hooks")
        return ctx.shared_reason(lin.node, "linear")

    def region(self, ctx: FoldContext, candidate: _Flattened) -> Region:
        return Region([candidate.linear.node], [candidate.affine.input])

    def rewrite(self, ctx: FoldContext, candidate: _Flattened) -> tuple[list[fx.Node], str]:
        op, lin, shape = candidate.affine, candidate.linear, candidate.shape
        affine = ChannelAffine.of(op.affine.scale, op.affine.shift, shape[1])
        w, b = fold_affine_into_flattened_linear(lin.weight, lin.bias, affine, math.prod(shape[2:]))
        hint = hint_for(lin.node)
        set_slot(ctx.gm, lin.weight_slot, w, f"{hint}_weight")
        if b is not None:
            set_slot(ctx.gm, lin.bias_slot, b, f"{hint}_bias")
        replace_node(op.node, op.input)
        return [lin.node], f"folded into linear {where(lin.node)} through the flatten"
