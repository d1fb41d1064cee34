"""absorb_padding: constant padding of a pointwise conv's output becomes the conv's own padding.

A 1×1, stride-1 conv with zero padding ``p`` outputs its bias ``b`` on the border. So padding
its output ``y = W·x + b`` by ``p`` *with the value* ``b`` (per channel) is the same conv with
``p`` more padding: ``pad_b(W·x + b) = W·pad_0(x) + b``. Two spellings are recognised:

* ``F.pad(y, pads)`` (zeros) when the conv has no bias (or a zero one);
* DBB's ``BNAndPad``: ``torch.where(border, v, F.pad(y, pads))`` with ``border`` the padded
  border (``F.pad(zeros_like(y[:1, :1]), pads, value=c) > t``, ``0 < t < c``) and ``v`` a
  constant equal to the conv's bias once the BN is folded into it.

The conv then feeds the next op directly, where ``merge_sequential`` can compose it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from ..algebra import ConvKernel
from ..ir.graph import value_users
from ..ir.match import Fail
from ..ir.ops import PAD_FUNCTIONS, LinearOp, linear_op
from ..proof.tolerances import constants_match
from ._common import is_pointwise
from .base import FoldContext, NodeRule, Region
from .rewrite import new_conv, replace_node


def _symmetric_pads(pad: fx.Node) -> tuple[fx.Node, tuple[int, ...]] | None:
    """``F.pad(y, [l, r, t, b, …], mode="constant")`` with equal sides → (y, per-dim pads)."""
    if pad.op != "call_function" or pad.target not in PAD_FUNCTIONS or len(pad.args) < 2:
        return None
    pads = pad.args[1]
    mode = pad.args[2] if len(pad.args) > 2 else pad.kwargs.get("mode", "constant")
    if mode != "constant" or not isinstance(pads, (list, tuple)) or len(pads) % 2:
        return None
    if not all(isinstance(v, int) and v >= 0 for v in pads):
        return None
    sides = [(pads[i], pads[i + 1]) for i in range(0, len(pads), 2)]
    if any(a != b for a, b in sides):
        return None
    return pad.args[0], tuple(a for a, _ in reversed(sides))  # outermost spatial dim first


def _pad_value(pad: fx.Node) -> float | None:
    value = pad.args[3] if len(pad.args) > 3 else pad.kwargs.get("value", None)
    return 0.0 if value is None else value if isinstance(value, (int, float)) else None


def _is_border_mask(mask: fx.Node, y: fx.Node, pads: tuple[int, ...]) -> bool:
    """``F.pad(zeros_like(y or y[:1, :1]), pads, value=c) > t`` with ``0 < t < c``."""
    if mask.op != "call_function" or mask.target is not operator.gt or len(mask.args) != 2:
        return False
    padded, threshold = mask.args
    if not isinstance(padded, fx.Node) or not isinstance(threshold, (int, float)):
        return False
    zeros = _padded_above(padded, pads, threshold)
    return zeros is not None and _is_zeros_like(zeros, y)


def _padded_above(padded: fx.Node, pads: tuple[int, ...], threshold: float) -> fx.Node | None:
    """The tensor that ``padded`` pads by ``pads`` with a fill ``c``, ``0 < threshold < c``."""
    found = _symmetric_pads(padded)
    fill = None if found is None else _pad_value(padded)
    if found is None or found[1] != pads or fill is None or not 0 < threshold < fill:
        return None
    return found[0]


def _is_zeros_like(zeros: fx.Node, y: fx.Node) -> bool:
    """``zeros_like(y)`` or ``zeros_like(y[:1, :1])``."""
    if zeros.op != "call_function" or zeros.target is not torch.zeros_like:
        return False
    source = zeros.args[0]
    return source is y or _is_leading_slice_of(source, y)


def _is_leading_slice_of(source: object, y: fx.Node) -> bool:
    """``y[:1, :1]``-style indexing of ``y``'s leading (batch, channel) dims only."""
    return (
        isinstance(source, fx.Node)
        and source.op == "call_function"
        and source.target is operator.getitem
        and source.args[0] is y
        and _leading_slices(source.args[1])
    )


def _leading_slices(index: object) -> bool:
    """``[:1, :1]``-style indexing of the leading (batch, channel) dims only."""
    return isinstance(index, tuple) and len(index) <= 2 and all(isinstance(i, slice) for i in index)


def _pointwise(op: LinearOp | None) -> bool:
    """A 1×…×1 stride-1 conv whose padding, if any, is zeros (its border is its bias)."""
    return (
        op is not None
        and op.kind == "conv"
        and is_pointwise(op)
        and op.geometry.padding_mode == "zeros"
    )


@dataclass
class _Padded:
    """``node`` pads ``conv``'s output by ``pads`` (per spatial dim, outermost first) with the
    value ``constant`` (``None``: zeros); ``padded`` is the pad itself (``node``, or the
    ``F.pad`` inside DBB's ``where``)."""

    node: fx.Node
    padded: fx.Node
    pads: tuple[int, ...]
    constant: torch.Tensor | None
    conv: LinearOp

    @property
    def bias(self) -> torch.Tensor:
        """The conv's bias in float64 (zeros if it has none)."""
        if self.conv.bias is None:
            return torch.zeros(self.conv.out_channels, dtype=torch.float64)
        return self.conv.bias.detach().double()


class AbsorbPadding(NodeRule):
    name = "absorb_padding"
    words = "padding absorbed"  # one fold, in a report

    def match(self, ctx: FoldContext, node: fx.Node) -> _Padded | None:
        """A constant pad of a pointwise conv's output: ``F.pad(y, pads)``, or DBB's
        ``torch.where(border, v, F.pad(y, pads))``."""
        if node.op == "call_function" and node.target is torch.where and len(node.args) == 3:
            mask, value, padded = node.args
            found = _symmetric_pads(padded) if isinstance(padded, fx.Node) else None
            if found is None or not _is_border_mask(mask, found[0], found[1]):
                return None
            return _of_pointwise_conv(ctx, node, padded, found, ctx.consts.value(value))
        found = _symmetric_pads(node)
        if found is None or _pad_value(node) != 0.0:
            return None
        return _of_pointwise_conv(ctx, node, node, found, None)

    def check(self, ctx: FoldContext, pad: _Padded) -> Fail | None:
        """The conv's output is read only padded, and the border value is the conv's bias."""
        conv, bias = pad.conv, pad.bias
        y = conv.node
        # the BNAndPad spelling also reads y's shape for its border mask; a plain pad may not
        # leave y alive (the conv would then run twice)
        mask_ok = pad.constant is not None
        if [u for u in value_users(y) if u is not pad.padded and not (mask_ok and _mask_reader(u))]:
            return Fail("the conv's output is also used unpadded")
        border = (
            torch.zeros_like(bias) if pad.constant is None else pad.constant.double().reshape(-1)
        )
        is_bias = border.numel() in (1, bias.numel()) and constants_match(
            border.expand_as(bias), bias, conv.weight.dtype
        )
        return None if is_bias else Fail("the padding value is not the conv's bias")

    def region(self, ctx: FoldContext, pad: _Padded) -> Region:
        return Region([pad.node], [pad.conv.input])

    def rewrite(self, ctx: FoldContext, pad: _Padded) -> tuple[list[fx.Node], str]:
        """The conv with the pads added to its own padding, in place of the pad."""
        conv, node, pads = pad.conv, pad.node, pad.pads
        g, y = conv.geometry, conv.node
        padding = tuple(p + q for p, q in zip(g.padding, pads, strict=True))
        kernel = ConvKernel(
            conv.weight.detach().double(), pad.bias, g.stride, padding, g.dilation, conv.groups
        )
        path = f"{y.target}_padded" if y.op == "call_module" else f"{y.name}_padded"
        ctx.gm.add_submodule(path, new_conv(kernel, conv.weight.dtype))
        with ctx.gm.graph.inserting_before(node):
            new = ctx.gm.graph.call_module(path, (conv.input,))
        new.meta.update(node.meta)
        replace_node(node, new)
        return [new], f"padding moved into {path}"


def _of_pointwise_conv(
    ctx: FoldContext,
    node: fx.Node,
    padded: fx.Node,
    found: tuple[fx.Node, tuple[int, ...]],
    constant: torch.Tensor | None,
) -> _Padded | None:
    """``node`` (``padded``, or a ``where`` around it) as a candidate, if the tensor ``found``
    pads is the output of a pointwise conv with as many spatial dims as there are pads."""
    y, pads = found
    conv = linear_op(ctx.gm, y, ctx.consts)
    if not _pointwise(conv) or len(pads) != conv.spatial_dims:
        return None
    return _Padded(node, padded, pads, constant, conv)


def _mask_reader(user: fx.Node) -> bool:
    """``zeros_like(y)`` or ``y[:1, :1]`` feeding only ``zeros_like``: reads only the shape."""
    if user.op != "call_function":
        return False
    if user.target is torch.zeros_like:
        return True
    return user.target is operator.getitem and all(
        u.op == "call_function" and u.target is torch.zeros_like for u in user.users
    )
