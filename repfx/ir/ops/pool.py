"""Average pools: their settings, and the depthwise conv an average pool is.

:func:`avg_pool_settings` reads the input and settings (kernel size, stride, padding, ceil mode,
``count_include_pad``, divisor override) of a plain ``nn.AvgPool1d/2d/3d`` called on one
argument or of an ``F.avg_pool1d/2d/3d`` call (the stride defaults to the kernel size).
:func:`avg_pool_op` views an average pool as the :class:`~repfx.ir.ops.linear.LinearOp` it is,
a depthwise conv with the uniform ``1/k`` kernel, when that is exact: zeros counted in the
average (or no padding), floor mode, no divisor override, and a channel count known from shape
propagation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..graph import arg_of, is_plain, known_dtype, module_of, static_shape
from .linear import ConvGeometry, LinearOp, per_dim
from .operands import MISSING

_AVG_POOLS = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
# F.avg_pool2d / 3d are these builtins themselves (what dynamo's graphs call); F.avg_pool1d is
# torch.avg_pool1d.
_AVG_POOL_FUNCS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
_AVG_POOL_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")


@dataclass(frozen=True)
class _AvgPool:
    """An average pool's settings, from its module or from its functional call."""

    dims: int
    kernel_size: Any
    stride: Any
    padding: Any
    ceil_mode: Any
    count_include_pad: Any
    divisor_override: Any


def avg_pool_settings(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, _AvgPool] | None:
    """The input and settings of an average pool, module or function; ``None`` otherwise."""
    if node.op == "call_module":
        return _avg_pool_module_settings(gm, node)
    if node.op == "call_function" and node.target in _AVG_POOL_FUNCS:
        return _avg_pool_function_settings(node)
    return None


def _avg_pool_module_settings(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, _AvgPool] | None:
    """The input and settings of a plain ``nn.AvgPool*d`` called on one argument."""
    if len(node.args) != 1 or node.kwargs:
        return None
    m = module_of(gm, node)
    if not is_plain(m, tuple(_AVG_POOLS)):
        return None
    dims = _AVG_POOLS[next(t for t in _AVG_POOLS if isinstance(m, t))]
    values = [getattr(m, a) for a in _AVG_POOL_ARGS]
    divisor = getattr(m, "divisor_override", None)
    return node.args[0], _AvgPool(dims, *values, divisor)


def _avg_pool_function_settings(node: fx.Node) -> tuple[Any, _AvgPool] | None:
    """The input and settings of an ``F.avg_pool*d`` call (``None``: no kernel size given)."""
    dims = _AVG_POOL_FUNCS[node.target]
    defaults = (MISSING, None, 0, False, True)
    pairs = zip(_AVG_POOL_ARGS, defaults, strict=True)
    values = [arg_of(node, i + 1, name, default) for i, (name, default) in enumerate(pairs)]
    divisor = arg_of(node, 6, "divisor_override", None) if dims > 1 else None
    if values[1] is None or (isinstance(values[1], (list, tuple)) and not values[1]):
        values[1] = values[0]  # the stride defaults to the kernel size
    if values[0] is MISSING:
        return None
    return arg_of(node, 0, "input", MISSING), _AvgPool(dims, *values, divisor)


def avg_pool_op(gm: fx.GraphModule, node: fx.Node) -> LinearOp | None:
    """View an average pool (module or ``F.avg_pool*d``) as the depthwise conv it is (``1/k``
    uniform kernel), when that is exact — zeros counted in the average (or no padding), floor
    mode, no divisor override — and its channel count is known from shape propagation. The view
    has no slots: there is no weight to rewrite."""
    found = avg_pool_settings(gm, node)
    if found is None or not isinstance(found[0], fx.Node):
        return None
    x, pool = found
    dims = pool.dims
    shape, dtype = static_shape(node), known_dtype(node)
    if shape is None or dtype is None or len(shape) < dims + 1:
        return None
    windows = (pool.kernel_size, pool.stride, pool.padding)
    size, stride, padding = (per_dim(v, dims) for v in windows)
    if pool.ceil_mode is not False or pool.divisor_override is not None or None in (size, stride):
        return None
    if padding is None or (any(padding) and pool.count_include_pad is not True):
        return None  # the border divides by fewer taps: not a conv
    channels = shape[-(dims + 1)]
    weight = torch.full((channels, 1, *size), 1.0 / math.prod(size), dtype=dtype)
    geometry = ConvGeometry(stride, padding, (1,) * dims)
    return LinearOp(
        node, "avg_pool", x, weight, None, None, None, channels, dims, any(padding), geometry,
    )  # fmt: skip
