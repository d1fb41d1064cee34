"""Affine views: a per-channel affine ``y = s ⊙ x + t`` of one tensor (:class:`AffineOp`).

:func:`affine_op` recognises

* an eval BatchNorm: a plain ``nn.BatchNorm1d/2d/3d`` / ``nn.SyncBatchNorm`` module with running
  statistics, and the calls ``F.batch_norm(input, running_mean, running_var, weight, bias,
  training, momentum, eps)`` and ``torch.batch_norm(input, weight, bias, running_mean,
  running_var, training, momentum, eps, cudnn_enabled)``, each read with its own argument order;
  only ``training=False`` folds. The statistics must be constants, and a weight / bias either
  absent or a constant (a conditional BN's computed γ makes it no view);
* arithmetic with a constant ``c``: ``x * g``, ``g.view(1,-1,1,1) * x``, ``x.mul(g)``,
  ``torch.add`` / ``sub`` (either operand order, with ``alpha=``) and ``div`` (``x / c`` only),
  ``torch.addcmul(t, s, x, value=v)``. The constant must broadcast against ``x`` along at most
  one axis without widening it, and ``x`` must be floating (recorded dtype or the structural
  float flag; unknown is refused), with a dtype that combining it with ``c`` keeps: on integers
  the folded float arithmetic would change the dtype and the rounding;
* a depthwise 1×1 conv (stride 1, no zero padding): a scale and a shift per channel.

:func:`batch_norm_reason` says why a batch norm is no affine (training mode, no running
statistics, a subclass, operands that are not constants), and :func:`merge_axes` gives the
common axis of two affines or :data:`AXES_CLASH`. :data:`MUL`, :data:`ADD`, :data:`SUB` and
:data:`DIV` are the spellings of the four arithmetic ops (function, builtin, method name).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ...algebra import ChannelAffine, batch_norm_affine
from ..graph import ConstantFolder, arg_of, is_floating, is_plain, known_dtype, module_of, rank_of
from ..match import Fail
from .linear import CONV_TYPES, conv_spatial_dims, has_zero_padding
from .operands import MISSING, optional_constant


@dataclass
class AffineOp:
    """``y = s ⊙ x + t`` along ``axis`` (``None`` = uniform), of the single tensor ``input``."""

    node: fx.Node
    kind: str
    input: fx.Node
    affine: ChannelAffine
    axis: int | None
    dtype: torch.dtype | None = None  # dtype of its constants (None: only Python scalars)

    @property
    def channels(self) -> int:
        return self.affine.channels


_BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

# Argument positions: the two functions take the same arguments in different orders.
_BATCH_NORM_POSITIONS: dict[Any, dict[str, int]] = {
    F.batch_norm: dict(
        input=0, running_mean=1, running_var=2, weight=3, bias=4, training=5, momentum=6, eps=7
    ),
    torch.batch_norm: dict(
        input=0, weight=1, bias=2, running_mean=3, running_var=4, training=5, momentum=6, eps=7
    ),
}
_BATCH_NORM_DEFAULTS: dict[Any, dict[str, Any]] = {
    F.batch_norm: dict(weight=None, bias=None, training=False, momentum=0.1, eps=1e-5),
    torch.batch_norm: {},  # every argument is required
}


def _batch_norm_arg(node: fx.Node, name: str) -> Any:
    """Argument ``name`` of an ``F.batch_norm`` / ``torch.batch_norm`` call, in that function's
    own argument order (:data:`~repfx.ir.ops.operands.MISSING` when missing)."""
    index = _BATCH_NORM_POSITIONS[node.target][name]
    return arg_of(node, index, name, _BATCH_NORM_DEFAULTS[node.target].get(name, MISSING))


def is_batch_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Any batch-norm call, foldable or not."""
    if node.op == "call_module":
        return isinstance(module_of(gm, node), _BatchNorm)
    return node.op == "call_function" and node.target in _BATCH_NORM_POSITIONS


def batch_norm_reason(gm: fx.GraphModule, node: fx.Node, consts: ConstantFolder) -> Fail | None:
    """Why a batch-norm node is not an affine (``None`` when it is one, or not a BN at all)."""
    if node.op == "call_module":
        m = module_of(gm, node)
        return _batch_norm_module_reason(m) if isinstance(m, _BatchNorm) else None
    if node.op == "call_function" and node.target in _BATCH_NORM_POSITIONS:
        return _batch_norm_function_reason(node, consts)
    return None


def _batch_norm_module_reason(m: _BatchNorm) -> Fail | None:
    if not is_plain(m, _BATCH_NORM_TYPES):
        return Fail("batch norm subclass that overrides what its forward uses")
    if m.training:
        return Fail("batch norm in training mode (uses batch statistics)")
    if m.running_mean is None or m.running_var is None:
        return Fail("batch norm without running statistics")
    return None


def _batch_norm_function_reason(node: fx.Node, consts: ConstantFolder) -> Fail | None:
    training = _batch_norm_arg(node, "training")
    if training is not False:
        return Fail("batch norm in training mode (uses batch statistics)")
    x = _batch_norm_arg(node, "input")
    eps = _batch_norm_arg(node, "eps")
    if not isinstance(x, fx.Node) or isinstance(eps, fx.Node) or eps is MISSING:
        return Fail("batch norm call not understood")
    for name in ("running_mean", "running_var"):
        stat = _batch_norm_arg(node, name)
        if not isinstance(stat, fx.Node) or consts.value(stat) is None:
            return Fail("batch norm statistics are not constants")
    for name in ("weight", "bias"):
        given = _batch_norm_arg(node, name)
        if given is MISSING or not optional_constant(given, consts)[0]:
            return Fail(f"batch norm {name} is not a constant")
    return None


def affine_op(gm: fx.GraphModule, node: fx.Node, consts: ConstantFolder) -> AffineOp | None:
    """View ``node`` as a per-channel affine of one non-constant tensor, or ``None``."""
    if node.op == "call_module":
        return _affine_module(gm, node, consts)
    if node.op in ("call_function", "call_method"):
        if node.op == "call_function" and node.target in _BATCH_NORM_POSITIONS:
            return _affine_batch_norm_function(gm, node, consts)
        return _affine_arith(node, consts)
    return None


def _affine_module(gm: fx.GraphModule, node: fx.Node, consts: ConstantFolder) -> AffineOp | None:
    m = module_of(gm, node)
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return None
    x = node.args[0]
    if isinstance(m, _BatchNorm):
        if batch_norm_reason(gm, node, consts) is not None:
            return None
        affine = batch_norm_affine(m.running_mean, m.running_var, m.weight, m.bias, m.eps)
        axis = _batch_norm_axis(m, x)
        dtype = m.running_mean.dtype
        if isinstance(axis, Fail):
            return None
        return AffineOp(node, "batch_norm", x, affine, axis, dtype)
    if is_plain(m, CONV_TYPES) and _is_depthwise_pointwise(m):
        affine = ChannelAffine.of(m.weight.reshape(-1), m.bias, m.out_channels)
        axis = -(conv_spatial_dims(m) + 1)
        return AffineOp(node, "depthwise_1x1_conv", x, affine, axis, m.weight.dtype)
    return None


def _is_depthwise_pointwise(m: _ConvNd) -> bool:
    return (
        m.groups == m.in_channels == m.out_channels
        and all(k == 1 for k in m.kernel_size)
        and all(s == 1 for s in m.stride)
        and not has_zero_padding(m.padding, "zeros", m.kernel_size, m.dilation)
        and m.padding_mode == "zeros"
    )


_UNKNOWN_BATCH_NORM_AXIS = Fail("the batch norm's input rank is unknown")


def _batch_norm_axis(m: _BatchNorm, x: fx.Node) -> int | Fail:
    """BN normalises dim 1 of an ``(N, C, *)`` input: that axis, counted from the right (a
    :class:`Fail` when the input's rank is unknown)."""
    fixed = {nn.BatchNorm2d: -3, nn.BatchNorm3d: -4}
    for t, axis in fixed.items():
        if isinstance(m, t):
            return axis
    rank = rank_of(x)
    return _UNKNOWN_BATCH_NORM_AXIS if rank is None or rank < 2 else 1 - rank


def _affine_batch_norm_function(
    gm: fx.GraphModule, node: fx.Node, consts: ConstantFolder
) -> AffineOp | None:
    if batch_norm_reason(gm, node, consts) is not None:
        return None
    x = _batch_norm_arg(node, "input")
    tensors = [
        consts.value(_batch_norm_arg(node, name))
        for name in ("running_mean", "running_var", "weight", "bias")
    ]
    eps = _batch_norm_arg(node, "eps")
    rank = rank_of(x)
    if rank is None or rank < 2:
        return None
    affine = batch_norm_affine(*tensors, eps)
    return AffineOp(node, "batch_norm", x, affine, 1 - rank, tensors[1].dtype)


# The spellings of the four arithmetic ops; identity's no-op view reads them too.
MUL = {operator.mul, torch.mul, "mul"}
ADD = {operator.add, torch.add, "add"}
SUB = {operator.sub, torch.sub, "sub"}
DIV = {operator.truediv, torch.div, "div"}
_ADDCMUL = {torch.addcmul, "addcmul"}


def _affine_arith(node: fx.Node, consts: ConstantFolder) -> AffineOp | None:
    """``x * c``, ``x + c``, ``x - c`` (either operand order; add / sub with ``alpha=``),
    ``x / c`` and ``addcmul`` — ``c`` a constant — as an affine of the tensor ``x``."""
    target = node.target
    if target in _ADDCMUL:
        return _affine_addcmul(node, consts)
    if not any(target in group for group in (MUL, ADD, SUB, DIV)):
        return None
    alpha = _arith_alpha(node)
    if alpha is None:
        return None
    operands = _tensor_and_constant(node, consts)
    if operands is None:
        return None
    x, c, const_first = operands
    if not _keeps_floating_dtype(x, c):
        return None
    layout = _channel_layout(c, x)
    if layout is None:
        return None
    vec, axis = layout
    affine = _arith_affine(target, vec, alpha, const_first)
    if affine is None:
        return None
    dtype = _arith_constant_dtype(node, c, const_first)
    return AffineOp(node, "arith", x, affine, axis, dtype)


def _arith_alpha(node: fx.Node) -> int | float | None:
    """The ``alpha=`` of a two-operand arithmetic call (1 when not given; only add / sub take
    another); ``None`` when the call has other arguments or a non-numeric alpha."""
    if len(node.args) != 2 or (node.kwargs and set(node.kwargs) - {"alpha"}):
        return None
    alpha = node.kwargs.get("alpha", 1)
    if type(alpha) not in (int, float) or (alpha != 1 and node.target not in ADD | SUB):
        return None
    return alpha


def _tensor_and_constant(
    node: fx.Node, consts: ConstantFolder
) -> tuple[fx.Node, torch.Tensor, bool] | None:
    """``(x, c, const_first)``: the tensor operand of a two-operand call, the value of its
    constant operand, and whether the constant comes first; ``None`` unless exactly one operand
    is a constant and the other a node."""
    a, b = node.args
    a_const, b_const = _constant_operand(a, consts), _constant_operand(b, consts)
    if (a_const is None) == (b_const is None):
        return None  # needs exactly one tensor operand and one constant
    x, c, const_first = (b, a_const, True) if a_const is not None else (a, b_const, False)
    return (x, c, const_first) if isinstance(x, fx.Node) else None


def _arith_constant_dtype(node: fx.Node, c: torch.Tensor, const_first: bool) -> torch.dtype | None:
    """The dtype of the constant operand ``c``: its tensor's, ``None`` for a Python scalar."""
    const_arg = node.args[0] if const_first else node.args[1]
    return c.dtype if isinstance(const_arg, fx.Node) else None


def _arith_affine(
    target: Any, vec: torch.Tensor, alpha: float, const_first: bool
) -> ChannelAffine | None:
    """``x·c``, ``x + α·c`` / ``c + α·x``, ``x − α·c`` / ``c − α·x``, ``x / c`` as ``s ⊙ x + t``
    (``torch.add/sub(input, other, alpha=α)`` computes ``input ± α·other``)."""
    one, zero = torch.ones_like(vec), torch.zeros_like(vec)
    if target in MUL:
        return ChannelAffine(vec, zero)
    if target in ADD:
        return ChannelAffine(alpha * one, vec) if const_first else ChannelAffine(one, alpha * vec)
    if target in SUB:
        return ChannelAffine(-alpha * one, vec) if const_first else ChannelAffine(one, -alpha * vec)
    if const_first:
        return None  # c / x is not affine
    return ChannelAffine(1.0 / vec, zero)


def _keeps_floating_dtype(x: fx.Node, c: torch.Tensor) -> bool:
    """``x`` is known to be floating, and combining it with ``c`` keeps its dtype when both are
    known (a 1-d float32 constant would promote a float16 ``x``)."""
    if not is_floating(x):
        return False
    x_dtype = known_dtype(x)
    if x_dtype is None or c.dim() == 0 or not c.is_floating_point():
        return True
    return torch.promote_types(x_dtype, c.dtype) == x_dtype


def _affine_addcmul(node: fx.Node, consts: ConstantFolder) -> AffineOp | None:
    if len(node.args) != 3 or node.kwargs.keys() - {"value"}:
        return None
    value = node.kwargs.get("value", 1)
    t_node, m1, m2 = node.args
    shift = _constant_operand(t_node, consts)
    c1, c2 = _constant_operand(m1, consts), _constant_operand(m2, consts)
    if shift is None or (c1 is None) == (c2 is None) or type(value) not in (int, float):
        return None
    x, scale = (m2, c1) if c1 is not None else (m1, c2)
    if not isinstance(x, fx.Node):
        return None
    if not _keeps_floating_dtype(x, scale) or not _keeps_floating_dtype(x, shift):
        return None
    s_layout, t_layout = _channel_layout(scale, x), _channel_layout(shift, x)
    if s_layout is None or t_layout is None:
        return None
    axis = merge_axes(s_layout[1], t_layout[1])
    if isinstance(axis, Fail):
        return None
    affine = ChannelAffine(value * s_layout[0], t_layout[0] * torch.ones_like(s_layout[0]))
    return AffineOp(node, "addcmul", x, affine, axis, scale.dtype)


# What :func:`merge_axes` returns for two affines on different axes.
AXES_CLASH = Fail("the affines act on different channel axes")


def merge_axes(a: int | None, b: int | None) -> int | Fail | None:
    """The common axis of two affines (``None`` = uniform), or :data:`AXES_CLASH`."""
    if a is None or b is None or a == b:
        return b if a is None else a
    return AXES_CLASH


def _constant_operand(arg: Any, consts: ConstantFolder) -> torch.Tensor | None:
    if type(arg) in (int, float):
        return torch.tensor(float(arg), dtype=torch.float64)
    if isinstance(arg, fx.Node):
        return consts.value(arg)
    return None


def _channel_layout(c: torch.Tensor, x: fx.Node) -> tuple[torch.Tensor, int | None] | None:
    """A constant that broadcasts against ``x`` along at most one axis, and never widens it.

    Returns ``(vector, axis)`` with ``axis`` counted from the right (``None``: a scalar).
    """
    if not c.is_floating_point() and c.dtype not in (torch.int64, torch.int32):
        return None
    non_unit = [d for d, size in enumerate(c.shape) if size != 1]
    if len(non_unit) > 1:
        return None
    if c.dim() > 0:
        rank = rank_of(x)
        # The constant must not add leading dims to x: guaranteed when x has at least c.dim() dims.
        if rank is None or rank < c.dim():
            return None
    vec = c.detach().to(torch.float64).reshape(-1)
    axis = None if not non_unit else non_unit[0] - c.dim()
    return vec, axis
