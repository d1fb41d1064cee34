"""Channel-wise views: ops that act on each channel alone (:class:`Channelwise`).

:func:`channelwise_source` recognises the ops a per-channel scale can move through — ``f(s ⊙ x)
= s ⊙ f(x)`` — and says whether a per-channel shift passes too (``keeps_constants``):

* layout ops (:mod:`repfx.ir.ops.layout`) and no-ops (:mod:`repfx.ir.ops.identity`);
* average pools (module or ``F.avg_pool*d``; a shift passes unless the pool averages zero padding
  in or overrides its divisor), adaptive average pools, and max pools without ``return_indices``
  (non-negative scales only: a max is positively homogeneous), over the spatial axes;
* ``x.mean(dims)`` / ``torch.mean(x, dims)`` over axes other than the channel axis;
* relu (``nn.ReLU``, ``F.relu`` / ``torch.relu``, ``x.relu()``), for non-negative scales;
* a bias-free linear over the last axis with the channels on another (ResMLP's and MLP-Mixer's
  token-mixing linears).

A hooked module is none of these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..graph import ConstantFolder, arg_of, has_hooks, is_plain, module_of, rank_of
from .identity import identity_input
from .layout import layout_source_axis
from .linear import linear_op, per_dim
from .operands import MISSING
from .pool import avg_pool_settings


@dataclass(frozen=True)
class Channelwise:
    """``node`` computes each channel of its output from the same channel of ``input`` alone,
    and commutes with a per-channel scale: ``f(s ⊙ x) = s ⊙ f(x)`` — for every ``s``, or for
    ``s ≥ 0`` only (``nonnegative_only``: relu, max pools, which are positively homogeneous).

    ``keeps_constants``: ``f(x + t) = f(x) + t`` for a per-channel shift ``t`` too (layout ops,
    eval dropout, an average pool that divides by the taps it reads, a mean over other axes); a
    pool that averages zero padding in, or a relu, does not.
    """

    node: fx.Node
    input: fx.Node
    axis: int | None  # the channel axis in the input's coordinates (None: a uniform scale)
    keeps_constants: bool
    nonnegative_only: bool = False


_ADAPTIVE_AVG_POOLS = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}
_ADAPTIVE_AVG_POOL_FUNCS = {
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
    torch._C._nn.adaptive_avg_pool2d: 2, torch._C._nn.adaptive_avg_pool3d: 3,
}  # fmt: skip
_MAX_POOLS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_MAX_POOL_FUNCS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, torch.max_pool2d: 2}
_RELU_FUNCS = {F.relu, torch.relu}


def channelwise_source(
    gm: fx.GraphModule, node: fx.Node, axis: int | None, consts: ConstantFolder
) -> Channelwise | None:
    """View ``node`` as a :class:`Channelwise` op for the channel ``axis`` of its output
    (counted from the right), or ``None``."""
    found = layout_source_axis(node, axis)
    if found is not None:
        return Channelwise(node, found[0], found[1], keeps_constants=True)
    same = identity_input(gm, node)
    if isinstance(same, fx.Node):
        return Channelwise(node, same, axis, keeps_constants=True)
    if node.op == "call_module" and has_hooks(module_of(gm, node)):
        return None
    for view in (_pool_channelwise, _mean_channelwise, _relu_channelwise):
        found = view(gm, node, axis)
        if found is not None:
            return found
    return _token_linear(gm, node, axis, consts)


def _spatial_pool_axis(axis: int | None, dims: int) -> bool:
    """A pool over the last ``dims`` axes keeps channel ``axis`` apart."""
    return axis is None or axis == -(dims + 1)


def _pool_channelwise(gm: fx.GraphModule, node: fx.Node, axis: int | None) -> Channelwise | None:
    avg = avg_pool_settings(gm, node)
    if avg is not None and isinstance(avg[0], fx.Node) and _spatial_pool_axis(axis, avg[1].dims):
        pool = avg[1]
        padding = per_dim(pool.padding, pool.dims)
        zeros_counted = padding is None or (any(padding) and pool.count_include_pad is not False)
        keeps = not zeros_counted and pool.divisor_override is None
        return Channelwise(node, avg[0], axis, keeps_constants=keeps)
    dims, x = _pool_input(gm, node, _ADAPTIVE_AVG_POOLS, _ADAPTIVE_AVG_POOL_FUNCS)
    if dims and _spatial_pool_axis(axis, dims):
        return Channelwise(node, x, axis, keeps_constants=True)
    dims, x = _pool_input(gm, node, _MAX_POOLS, _MAX_POOL_FUNCS)
    if dims and _spatial_pool_axis(axis, dims) and not _returns_indices(gm, node):
        return Channelwise(node, x, axis, keeps_constants=True, nonnegative_only=True)
    return None


def _pool_input(
    gm: fx.GraphModule, node: fx.Node, modules: dict[type, int], functions: dict[Any, int]
) -> tuple[int, fx.Node | None]:
    """(spatial dims, input) of a pool module of ``modules`` or a call of ``functions``."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(x, fx.Node):
        return 0, None
    if node.op == "call_module" and is_plain(m := module_of(gm, node), tuple(modules)):
        return next(d for t, d in modules.items() if isinstance(m, t)), x
    if node.op == "call_function" and node.target in functions:
        return functions[node.target], x
    return 0, None


def _returns_indices(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return bool(getattr(module_of(gm, node), "return_indices", False))
    return arg_of(node, 6, "return_indices", False) is not False


def _mean_channelwise(gm: fx.GraphModule, node: fx.Node, axis: int | None) -> Channelwise | None:
    """``x.mean(dims)`` / ``torch.mean(x, dims)`` over axes other than the channel axis."""
    if not _is_mean(node):
        return None
    x = node.args[0]
    r_in, r_out = rank_of(x), rank_of(node)
    reduction = _mean_reduction(node, r_in, r_out)
    if reduction is None:
        return None
    reduced, keepdim = reduction
    if axis is None:
        return Channelwise(node, x, None, keeps_constants=True)
    kept = [d for d in range(r_in) if keepdim or d not in reduced]  # input axis of each output
    if not 0 <= axis + r_out < len(kept) or kept[axis + r_out] in reduced:
        return None
    return Channelwise(node, x, kept[axis + r_out] - r_in, keeps_constants=True)


def _is_mean(node: fx.Node) -> bool:
    """``x.mean(...)`` or ``torch.mean(x, ...)``."""
    return (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and node.target is torch.mean
    )


def _mean_reduction(
    node: fx.Node, r_in: int | None, r_out: int | None
) -> tuple[set[int], bool] | None:
    """The input axes (counted from the left) a mean call reduces, and its ``keepdim``;
    ``None`` unless both ranks are known and the axes and ``keepdim`` are literals."""
    dims, keepdim = arg_of(node, 1, "dim", MISSING), arg_of(node, 2, "keepdim", False)
    if node.kwargs.keys() - {"dim", "keepdim"} or type(keepdim) is not bool:
        return None
    dims = (dims,) if type(dims) is int else dims
    if r_in is None or r_out is None or not _int_sequence(dims):
        return None
    return {d % r_in for d in dims}, keepdim


def _int_sequence(value: Any) -> bool:
    """A non-empty tuple or list of plain ints."""
    return isinstance(value, (tuple, list)) and bool(value) and all(type(v) is int for v in value)


def _relu_channelwise(gm: fx.GraphModule, node: fx.Node, axis: int | None) -> Channelwise | None:
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node) or len(node.args) != 1:
        return None
    is_relu = (
        (node.op == "call_module" and is_plain(module_of(gm, node), nn.ReLU))
        or (node.op == "call_function" and node.target in _RELU_FUNCS and not node.kwargs)
        or (node.op == "call_method" and node.target == "relu")
    )
    return Channelwise(node, x, axis, False, nonnegative_only=True) if is_relu else None


def _token_linear(
    gm: fx.GraphModule, node: fx.Node, axis: int | None, consts: ConstantFolder
) -> Channelwise | None:
    """A bias-free linear over the last axis, with the channels on another axis (ResMLP's and
    MLP-Mixer's token-mixing linears): each channel's row is mixed alone. (With a bias,
    ``s ⊙ (x Wᵀ + b)`` needs the bias scaled per channel *and* per token: not a linear's.)"""
    lin = linear_op(gm, node, consts)
    if lin is None or lin.kind != "linear" or lin.bias is not None:
        return None
    if axis is None or axis == -1 or rank_of(node) is None or axis < -rank_of(node):
        return None
    return Channelwise(node, lin.input, axis, keeps_constants=False)
