"""Shared machinery of the passes: views and predicates more than one rule needs.

A rule module imports from here, from ``base`` and from the private helpers of one rule family
(``_absorb``, ``_scale_region``), never from another rule. Nothing here rewrites a graph.

* ``join_operands``: a binary join ``u + α·v`` / ``u − α·v`` as ``(u, v, ±α)``;
* ``kernel_of``: a conv / linear / average pool as a float64 :class:`ConvKernel`;
* ``composition_reason``: whether ``second(first(x))`` is exactly one conv / linear — a
  pointwise (1×…×1, stride-1) first op whose groups compose with the second's, no bias before
  the second's zero padding, no reflected padded border, one dtype.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..algebra import ConvKernel
from ..ir.match import Fail
from ..ir.ops import LinearOp

_JOIN_SIGNS = {
    operator.add: 1.0,
    torch.add: 1.0,
    "add": 1.0,
    operator.sub: -1.0,
    torch.sub: -1.0,
    "sub": -1.0,
}


def join_operands(node: fx.Node) -> tuple[fx.Node, fx.Node, float] | None:
    """``(u, v, weight)`` for ``node = u + weight·v`` (``add`` / ``sub`` with a constant
    ``alpha``, in any spelling) of two graph values; ``None`` for anything else."""
    sign = _JOIN_SIGNS.get(node.target) if node.op in ("call_function", "call_method") else None
    if sign is None or len(node.args) != 2 or node.kwargs.keys() - {"alpha"}:
        return None
    u, v = node.args
    alpha = node.kwargs.get("alpha", 1)
    if not (isinstance(u, fx.Node) and isinstance(v, fx.Node)) or not isinstance(
        alpha, (int, float)
    ):
        return None
    return u, v, sign * alpha


def kernel_of(op: LinearOp) -> ConvKernel:
    """``op``'s weight and bias (zeros if it has none) in float64, with its geometry."""
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


def has_bias(op: LinearOp) -> bool:
    """A bias that is not all zeros."""
    return op.bias is not None and bool(torch.any(op.bias != 0))


def is_pointwise(op: LinearOp) -> bool:
    """A linear, or a 1×…×1 stride-1 op with explicit padding that is zeros (or none)."""
    if op.kind == "linear":
        return True
    g = op.geometry
    return (
        g is not None
        and all(k == 1 for k in op.weight.shape[2:])
        and all(s == 1 for s in g.stride)
        and (g.padding_mode == "zeros" or not any(g.padding))
    )


def composition_reason(first: LinearOp, second: LinearOp) -> Fail | None:
    """Why ``second(first(x))`` is not exactly one conv / linear (``None``: it is)."""
    pairs = {("conv", "conv"), ("linear", "linear"), ("conv", "avg_pool")}
    if (first.kind, second.kind) not in pairs:
        return Fail(f"{first.kind} then {second.kind} is not composed")
    if first.spatial_dims != second.spatial_dims:
        return Fail("convs of different spatial dims")
    if not is_pointwise(first):
        return Fail("first conv is not 1×1 with stride 1")
    if second.kind != "linear" and second.geometry is None:
        return Fail("second conv has no explicit symmetric padding")
    if not _groups_compose(first, second):
        return Fail("convs have different groups")
    if second.zero_padded and has_bias(first):
        return Fail("a bias before a zero-padded conv is not exact")
    if _reflects_padded_border(first, second):
        return Fail("the second conv would pad the first's border by reflection")
    if first.weight.dtype != second.weight.dtype:
        return Fail("convs have different dtypes")
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
