"""Op views: recognise what a graph node computes, whatever its spelling.

Passes never look at ``node.op`` / ``node.target`` themselves; they ask this module for a
view of a node:

* :class:`LinearOp` — conv / conv-transpose / linear: ``y = W ∗ x + b``;
* :class:`NormOp` — a norm of :mod:`repfx.ir.norms` (LayerNorm, GroupNorm, RMSNorm), with its
  per-channel affine;
* :class:`AffineOp` — a per-channel affine of one tensor: eval BatchNorm, ``x * g``,
  ``g.view(1,-1,1,1) * x``, ``x.mul(g)``, ``torch.add``/sub/div by constants, ``torch.addcmul``,
  a depthwise 1×1 conv.

A view returns ``None`` for a node that is not one of its kind. Where a near-miss deserves a
reason — a training-mode dropout (:func:`identity_input`), a batch norm that is no affine
(:func:`batch_norm_reason`), two affines on different axes (:func:`merge_axes`) — it returns a
:class:`repfx.ir.match.Fail` instead (see ``repfx.ir.match`` for the convention).

Every view carries :class:`Slot` objects naming where each of its tensors lives (a module
attribute or a node argument), so a rewrite can replace them without knowing the spelling.

Channel axes are *negative* (counted from the right) so that they are meaningful whether or not
the batch dimension is present; ``None`` means "uniform over all channels" (a scalar).

Soundness: a view is returned only when the node provably computes it.

* Modules must be *plain* (``repfx.ir.graph.is_plain``): a subclass that overrides anything
  ``forward`` uses (``_conv_forward``, ``_check_input_dim``, a ``weight`` property) is not the
  base op.
* Every tensor operand of a view is a constant (``repfx.ir.graph.ConstantFolder``). An optional
  operand (a norm's or batch norm's weight / bias, a linear's bias) that is *given* but not a
  constant — computed from an activation (conditional BN), or a graph placeholder — makes the
  node no view at all; only an operand that is absent (not passed, or passed as ``None``) means
  γ = 1 / β = 0 / no bias.
* ``F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)`` and
  ``torch.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps,
  cudnn_enabled)`` are read each with its own argument order; only ``training=False`` folds.
* Arithmetic affines (``x * c``, ``torch.add(x, c, alpha=a)``, ``addcmul``) need a floating
  input (recorded dtype or the structural float flag; unknown is refused): on integers the
  folded float arithmetic would change the dtype and the rounding.
* Layout ops only move data: ``x.view(dtype)`` (a bitcast) and casts are not layout ops.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ...algebra import ChannelAffine, batch_norm_affine
from ..graph import (
    ConstantFolder,
    arg_of,
    dtype_argument,
    has_hooks,
    is_floating,
    is_plain,
    known_dtype,
    module_of,
    rank_of,
    static_shape,
)
from ..match import Fail
from ..norms import NORMS, NormKind, norm_kind_of_function

# ----------------------------------------------------------------------------------- slots


@dataclass(frozen=True)
class Slot:
    """Where a tensor of a view lives: ``module.attr`` or argument ``index``/``kwarg`` of a node."""

    node: fx.Node
    attr: str | None = None  # module attribute (call_module)
    index: int | None = None  # positional argument (call_function / call_method)
    kwarg: str | None = None  # keyword argument


# ------------------------------------------------------------------------------ views


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, symmetric padding and dilation of a conv, one entry per spatial dim."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    padding_mode: str = "zeros"


@dataclass
class LinearOp:
    """``y = W ∗ x + b``: conv (``kind="conv"``), transposed conv, linear, or an average pool
    seen as a depthwise conv (``kind="avg_pool"``, from :func:`avg_pool_op` only)."""

    node: fx.Node
    kind: str  # "conv" | "conv_transpose" | "linear"
    input: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    weight_slot: Slot | None  # None: a view with nothing to rewrite (an average pool)
    bias_slot: Slot | None
    groups: int = 1
    spatial_dims: int = 0
    zero_padded: bool = False  # does the op read zeros beyond its input's border?
    geometry: ConvGeometry | None = None  # convs whose padding is symmetric and explicit

    @property
    def channel_axis(self) -> int:
        """Axis of the channels in both input and output, counted from the right."""
        return -1 if self.kind == "linear" else -(self.spatial_dims + 1)

    @property
    def in_channels(self) -> int:
        if self.kind == "conv_transpose":
            return self.weight.shape[0]
        return self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        if self.kind == "conv_transpose":
            return self.weight.shape[1] * self.groups
        return self.weight.shape[0]


@dataclass
class NormOp:
    """A normalisation whose statistics ignore its per-channel affine ``γ ⊙ n + β``."""

    node: fx.Node
    kind: str  # a repfx.ir.norms.NormKind's kind: "layer_norm" | "group_norm" | "rms_norm"
    channels: int
    channel_axis: int | None  # None when the input rank is unknown (group norm)
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    weight_slot: Slot
    bias_slot: Slot | None  # None: the norm has no β (an RMSNorm), a shift cannot go into it
    dtype: torch.dtype


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


# ------------------------------------------------------------------------ recognisers


def _conv_spatial_dims(module: nn.Module) -> int:
    return len(module.kernel_size)


def _same_padding(kernel: Any, dilation: Any, dims: int) -> tuple[int, ...] | None:
    """The symmetric padding ``padding="same"`` amounts to (``None``: asymmetric, or unknown)."""
    k, d = _per_dim(kernel, dims), _per_dim(dilation, dims)
    if k is None or d is None:
        return None
    totals = [di * (ki - 1) for ki, di in zip(k, d, strict=True)]
    return None if any(t % 2 for t in totals) else tuple(t // 2 for t in totals)


def _has_zero_padding(
    padding: Any, padding_mode: str = "zeros", kernel: Any = None, dilation: Any = 1
) -> bool:
    """Does a conv read zeros beyond its input's border? ``padding="valid"`` never does;
    ``padding="same"`` does unless every kernel extent is 1 (known only given ``kernel``);
    reflect / replicate / circular padding pads with images of the input, not with zeros."""
    if padding_mode != "zeros":
        return False
    if isinstance(padding, str):
        if padding == "valid":
            return False
        dims = len(kernel) if isinstance(kernel, (tuple, list)) else 1
        k, d = _per_dim(kernel, dims), _per_dim(dilation, dims)
        if padding != "same" or k is None or d is None:
            return True  # unknown: assume it pads
        return any(di * (ki - 1) > 0 for ki, di in zip(k, d, strict=True))
    if isinstance(padding, int):
        return padding != 0
    return any(p != 0 for p in padding)


_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_FUNCS = {
    F.conv1d: 1,
    F.conv2d: 2,
    F.conv3d: 3,
    torch.conv1d: 1,
    torch.conv2d: 2,
    torch.conv3d: 3,
}


def linear_op(gm: fx.GraphModule, node: fx.Node, consts: ConstantFolder) -> LinearOp | None:
    """View ``node`` as a conv / transposed conv / linear, or ``None``."""
    if node.op == "call_module":
        return _linear_op_module(node, module_of(gm, node))
    if node.op == "call_function":
        return _linear_op_function(node, consts)
    return None


def _linear_op_module(node: fx.Node, m: nn.Module) -> LinearOp | None:
    if (
        not node.args
        or not isinstance(node.args[0], fx.Node)
        or len(node.args) + len(node.kwargs) != 1
    ):
        return None
    common = dict(
        node=node,
        input=node.args[0],
        weight=getattr(m, "weight", None),
        bias=getattr(m, "bias", None),
        weight_slot=Slot(node, attr="weight"),
        bias_slot=Slot(node, attr="bias"),
    )
    if is_plain(m, _CONV_TYPES):
        dims = _conv_spatial_dims(m)
        return LinearOp(
            kind="conv",
            groups=m.groups,
            spatial_dims=dims,
            zero_padded=_has_zero_padding(m.padding, m.padding_mode, m.kernel_size, m.dilation),
            geometry=_geometry(
                dims, m.stride, m.padding, m.dilation, m.padding_mode, m.kernel_size
            ),
            **common,
        )
    if is_plain(m, _CONV_T_TYPES):
        return LinearOp(
            kind="conv_transpose", groups=m.groups, spatial_dims=_conv_spatial_dims(m), **common
        )
    if is_plain(m, nn.Linear):
        return LinearOp(kind="linear", **common)
    return None


_ARG = object()  # marker: argument not given


def _arg(node: fx.Node, index: int, name: str, default: Any = _ARG) -> tuple[Any, Slot]:
    slot = Slot(node, index=index) if len(node.args) > index else Slot(node, kwarg=name)
    return arg_of(node, index, name, default), slot


def _optional_constant(arg: Any, consts: ConstantFolder) -> tuple[bool, torch.Tensor | None]:
    """An optional tensor operand: ``(True, None)`` when absent (not given, or ``None``),
    ``(True, value)`` when a constant, ``(False, None)`` when given but not a constant (computed
    from an activation, a placeholder, a literal) — the op is then no view at all."""
    if arg is None:
        return True, None
    value = consts.value(arg) if isinstance(arg, fx.Node) else None
    return value is not None, value


def _linear_op_function(node: fx.Node, consts: ConstantFolder) -> LinearOp | None:
    target = node.target
    if target in _CONV_FUNCS:
        kind, dims = "conv", _CONV_FUNCS[target]
    elif target in (F.linear, torch._C._nn.linear):
        kind, dims = "linear", 0
    else:
        return None
    x, _ = _arg(node, 0, "input")
    w_node, w_slot = _arg(node, 1, "weight")
    b_node, b_slot = _arg(node, 2, "bias", None)
    weight = consts.value(w_node) if isinstance(w_node, fx.Node) else None
    has_bias, bias = _optional_constant(b_node, consts)
    if not isinstance(x, fx.Node) or weight is None or not has_bias:
        return None
    if kind == "linear":
        return LinearOp(node, "linear", x, weight, bias, w_slot, b_slot)
    stride, _ = _arg(node, 3, "stride", 1)
    padding, _ = _arg(node, 4, "padding", 0)
    dilation, _ = _arg(node, 5, "dilation", 1)
    groups, _ = _arg(node, 6, "groups", 1)
    if any(isinstance(a, fx.Node) for a in (stride, padding, dilation, groups)):
        return None
    if type(groups) is not int or weight.dim() != dims + 2:
        return None
    kernel = tuple(weight.shape[2:])
    return LinearOp(
        node,
        "conv",
        x,
        weight,
        bias,
        w_slot,
        b_slot,
        groups,
        dims,
        _has_zero_padding(padding, "zeros", kernel, dilation),
        _geometry(dims, stride, padding, dilation, "zeros", kernel),
    )


def _per_dim(value: Any, dims: int) -> tuple[int, ...] | None:
    if type(value) is int:
        return (value,) * dims
    if isinstance(value, (tuple, list)) and len(value) == dims:
        return tuple(value) if all(type(v) is int for v in value) else None
    return None


def _geometry(
    dims: int, stride: Any, padding: Any, dilation: Any, padding_mode: str, kernel: Any = None
) -> ConvGeometry | None:
    """Stride / symmetric padding / dilation; ``None`` when the padding is asymmetric
    (``"same"`` with an even kernel extent) or unknown."""
    if padding == "valid":
        padding = 0
    elif padding == "same":
        padding = None if kernel is None else _same_padding(kernel, dilation, dims)
    parts = [_per_dim(v, dims) for v in (stride, padding, dilation)]
    if any(p is None for p in parts):
        return None
    return ConvGeometry(*parts, padding_mode)


# F.pad and the builtin it wraps (what dynamo's graphs call): the same arguments.
PAD_FUNCTIONS = (F.pad, torch._C._nn.pad)

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
    defaults = (_ARG, None, 0, False, True)
    pairs = zip(_AVG_POOL_ARGS, defaults, strict=True)
    values = [_arg(node, i + 1, name, default)[0] for i, (name, default) in enumerate(pairs)]
    divisor = _arg(node, 6, "divisor_override", None)[0] if dims > 1 else None
    if values[1] is None or (isinstance(values[1], (list, tuple)) and not values[1]):
        values[1] = values[0]  # the stride defaults to the kernel size
    if values[0] is _ARG:
        return None
    return _arg(node, 0, "input")[0], _AvgPool(dims, *values, divisor)


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
    size, stride, padding = (_per_dim(v, dims) for v in windows)
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


def norm_op(gm: fx.GraphModule, node: fx.Node, consts: ConstantFolder) -> NormOp | None:
    """View ``node`` as one of the norms of :data:`repfx.ir.norms.NORMS` (a LayerNorm or an
    RMSNorm over the last dim, a GroupNorm), or ``None``."""
    if node.op == "call_module":
        found = _norm_module(gm, node)
    elif node.op == "call_function" and norm_kind_of_function(node.target) is not None:
        found = _norm_function(node, consts)
    else:
        return None
    if found is None:
        return None
    norm, channels, weight, bias, w_slot, b_slot, dtype = found
    if norm.channels_last:
        axis = -1
    else:
        rank = rank_of(node)
        axis = None if rank is None else 1 - rank
    return NormOp(node, norm.kind, channels, axis, weight, bias, w_slot, b_slot, dtype)


def _norm_module(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    m = module_of(gm, node)
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return None
    norm = next((k for k in NORMS if is_plain(m, k.module)), None)
    channels = None if norm is None else norm.module_channels(m)
    if channels is None:
        return None
    w_slot = Slot(node, attr="weight")
    b_slot = Slot(node, attr="bias") if norm.has_bias else None
    bias = m.bias if norm.has_bias else None
    dtype = _param_dtype(m) if m.weight is not None else _input_dtype(node.args[0])
    return norm, channels, m.weight, bias, w_slot, b_slot, dtype


def _norm_function(node: fx.Node, consts: ConstantFolder) -> tuple | None:
    norm = norm_kind_of_function(node.target)
    second, _ = _arg(node, 1, norm.shape_arg)
    w_node, w_slot = _arg(node, 2, "weight", None)
    b_node, b_slot = _arg(node, 3, "bias", None) if norm.has_bias else (None, None)
    (has_weight, weight), (has_bias, bias) = (
        _optional_constant(w_node, consts),
        _optional_constant(b_node, consts),
    )
    x, _ = _arg(node, 0, "input")
    if not has_weight or not has_bias or not isinstance(x, fx.Node):
        return None
    channels = _norm_function_channels(norm, second, weight)
    if channels is None:
        return None
    dtype = weight.dtype if weight is not None else _input_dtype(x)
    return norm, channels, weight, bias, w_slot, b_slot, dtype


def _norm_function_channels(norm: NormKind, second: Any, weight: torch.Tensor | None) -> int | None:
    """The channels of a functional norm's ``γ, β``: its one normalised dim, or (a group norm)
    the size of its weight; ``None`` when unknown."""
    if norm.shape_arg == "normalized_shape":
        one_int = isinstance(second, (list, tuple)) and len(second) == 1 and type(second[0]) is int
        return second[0] if one_int else None
    if weight is not None and type(second) is int:
        return weight.numel()
    return None  # channel count unknown without an affine


def _input_dtype(x: fx.Node) -> torch.dtype:
    """A norm without an affine computes in its input's dtype (the default dtype when no
    shapes were recorded)."""
    return known_dtype(x) or torch.get_default_dtype()


def _param_dtype(m: nn.Module) -> torch.dtype:
    for p in m.parameters():
        return p.dtype
    return torch.get_default_dtype()


# ------------------------------------------------------------------------ affine ops

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


def _batch_norm_arg(node: fx.Node, name: str) -> tuple[Any, Slot]:
    """Argument ``name`` of an ``F.batch_norm`` / ``torch.batch_norm`` call, in that function's
    own argument order (:data:`_ARG` when missing)."""
    index = _BATCH_NORM_POSITIONS[node.target][name]
    return _arg(node, index, name, _BATCH_NORM_DEFAULTS[node.target].get(name, _ARG))


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
    training, _ = _batch_norm_arg(node, "training")
    if training is not False:
        return Fail("batch norm in training mode (uses batch statistics)")
    x, _ = _batch_norm_arg(node, "input")
    eps, _ = _batch_norm_arg(node, "eps")
    if not isinstance(x, fx.Node) or isinstance(eps, fx.Node) or eps is _ARG:
        return Fail("batch norm call not understood")
    for name in ("running_mean", "running_var"):
        stat, _ = _batch_norm_arg(node, name)
        if not isinstance(stat, fx.Node) or consts.value(stat) is None:
            return Fail("batch norm statistics are not constants")
    for name in ("weight", "bias"):
        given, _ = _batch_norm_arg(node, name)
        if given is _ARG or not _optional_constant(given, consts)[0]:
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
    if is_plain(m, _CONV_TYPES) and _is_depthwise_pointwise(m):
        affine = ChannelAffine.of(m.weight.reshape(-1), m.bias, m.out_channels)
        axis = -(_conv_spatial_dims(m) + 1)
        return AffineOp(node, "depthwise_1x1_conv", x, affine, axis, m.weight.dtype)
    return None


def _is_depthwise_pointwise(m: _ConvNd) -> bool:
    return (
        m.groups == m.in_channels == m.out_channels
        and all(k == 1 for k in m.kernel_size)
        and all(s == 1 for s in m.stride)
        and not _has_zero_padding(m.padding, "zeros", m.kernel_size, m.dilation)
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
    x, _ = _batch_norm_arg(node, "input")
    tensors = [
        consts.value(_batch_norm_arg(node, name)[0])
        for name in ("running_mean", "running_var", "weight", "bias")
    ]
    eps, _ = _batch_norm_arg(node, "eps")
    rank = rank_of(x)
    if rank is None or rank < 2:
        return None
    affine = batch_norm_affine(*tensors, eps)
    return AffineOp(node, "batch_norm", x, affine, 1 - rank, tensors[1].dtype)


_MUL = {operator.mul, torch.mul, "mul"}
_ADD = {operator.add, torch.add, "add"}
_SUB = {operator.sub, torch.sub, "sub"}
_DIV = {operator.truediv, torch.div, "div"}
_ADDCMUL = {torch.addcmul, "addcmul"}


def _affine_arith(node: fx.Node, consts: ConstantFolder) -> AffineOp | None:
    """``x * c``, ``x + c``, ``x - c`` (either operand order; add / sub with ``alpha=``),
    ``x / c`` and ``addcmul`` — ``c`` a constant — as an affine of the tensor ``x``."""
    target = node.target
    if target in _ADDCMUL:
        return _affine_addcmul(node, consts)
    if not any(target in group for group in (_MUL, _ADD, _SUB, _DIV)):
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
    if type(alpha) not in (int, float) or (alpha != 1 and node.target not in _ADD | _SUB):
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
    if target in _MUL:
        return ChannelAffine(vec, zero)
    if target in _ADD:
        return ChannelAffine(alpha * one, vec) if const_first else ChannelAffine(one, alpha * vec)
    if target in _SUB:
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


# ------------------------------------------------------------------------ no-op views

# Dropout functions: (name of the training argument, its position, its default).
_DROPOUT_FUNCS: dict[Any, tuple[str, int, Any]] = {
    F.dropout: ("training", 2, True),
    F.dropout1d: ("training", 2, True),
    F.dropout2d: ("training", 2, True),
    F.dropout3d: ("training", 2, True),
    F.alpha_dropout: ("training", 2, False),
    F.feature_alpha_dropout: ("training", 2, False),
    torch.dropout: ("train", 2, _ARG),
    torch.alpha_dropout: ("train", 2, _ARG),
    torch.feature_dropout: ("train", 2, _ARG),
    torch.feature_alpha_dropout: ("train", 2, _ARG),
}


def identity_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | Fail | None:
    """If ``node`` is a no-op in eval mode, its input; a :class:`Fail` if it is a training-mode
    stochastic op (or a hooked no-op module); else ``None``."""
    if node.op == "call_module":
        return _identity_module(module_of(gm, node), node)
    if node.op == "call_function" and node.target in _DROPOUT_FUNCS:
        return _identity_dropout(node)
    if node.op == "call_function" and _qualified_name(node.target) in _DROP_PATH_FUNCS:
        return _identity_drop_path(node)
    if node.op in ("call_function", "call_method"):
        return _identity_arith(node)
    return None


def _identity_dropout(node: fx.Node) -> fx.Node | Fail | None:
    """``F.dropout(x, p)`` defaults to ``training=True`` (kept); only ``training=False`` (a
    literal ``False``: traced from ``self.training`` of an eval module) is the identity."""
    name, index, default = _DROPOUT_FUNCS[node.target]
    training, _ = _arg(node, index, name, default)
    if training is not False:
        return Fail("dropout in training mode")
    x, _ = _arg(node, 0, "input")
    return x if isinstance(x, fx.Node) else None


# Stochastic-depth functions (module, name) → (the rate's and the training flag's positions
# and names), matched by qualified name (torchvision wraps its own with ``torch.fx.wrap``, so
# it stays one call in the graph): ``f(x, p, mode, training)`` returns ``x`` itself when
# ``training`` is False or ``p`` is 0.
_DROP_PATH_FUNCS = {
    ("torchvision.ops.stochastic_depth", "stochastic_depth"): ((1, "p"), (3, "training")),
}


def _qualified_name(target: Any) -> tuple[str, str] | None:
    module, name = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    return (module, name) if isinstance(module, str) and isinstance(name, str) else None


def _identity_drop_path(node: fx.Node) -> fx.Node | Fail | None:
    (p_index, p_name), (t_index, t_name) = _DROP_PATH_FUNCS[_qualified_name(node.target)]
    rate, _ = _arg(node, p_index, p_name, _ARG)
    training, _ = _arg(node, t_index, t_name, True)
    x, _ = _arg(node, 0, "input")
    if not isinstance(x, fx.Node):
        return None
    if training is False or (type(rate) in (int, float) and rate == 0):
        return x
    return Fail("stochastic depth in training mode")


_DROPOUT_TYPES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
# Stochastic-depth modules whose forward is the identity in eval mode or when their rate is 0:
# (module, class name) -> the attribute holding the rate. Matched by exact class: a subclass or
# another class of the same name may compute anything.
_DROP_PATHS = {
    ("timm.layers.drop", "DropPath"): "drop_prob",
    ("timm.models.layers.drop", "DropPath"): "drop_prob",
    ("repfx.models.metaformer", "DropPath"): "p",
    ("torchvision.ops.stochastic_depth", "StochasticDepth"): "p",
}


def _drop_rate(m: nn.Module) -> Any:
    """The drop probability of a known dropout / drop-path module; ``_ARG`` for other modules."""
    if is_plain(m, _DROPOUT_TYPES):
        return m.p
    attr = _DROP_PATHS.get((type(m).__module__, type(m).__qualname__))
    return _ARG if attr is None else getattr(m, attr, None)


def _identity_module(m: nn.Module, node: fx.Node) -> fx.Node | Fail | None:
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return None
    x = node.args[0]
    rate = _drop_rate(m)
    if not is_plain(m, nn.Identity) and rate is _ARG:
        return None
    if has_hooks(m):
        return Fail(f"{type(m).__name__} has hooks")
    if rate is not _ARG and m.training and not (type(rate) in (int, float) and rate == 0):
        return Fail(f"{type(m).__name__} in training mode")
    return x


_NOOP_SCALARS: dict[Any, tuple[float, bool]] = {}
for _t in _MUL:
    _NOOP_SCALARS[_t] = (1.0, True)
for _t in _DIV:
    _NOOP_SCALARS[_t] = (1.0, False)
for _t in _ADD:
    _NOOP_SCALARS[_t] = (0.0, True)
for _t in _SUB:
    _NOOP_SCALARS[_t] = (0.0, False)


def _identity_arith(node: fx.Node) -> fx.Node | None:
    """``x * 1``, ``1 * x``, ``x / 1``, ``x + 0``, ``0 + x``, ``x - 0`` on a floating tensor
    (``0 - x`` is ``-x``: not a no-op)."""
    spec = _NOOP_SCALARS.get(node.target)
    if spec is None or len(node.args) != 2 or node.kwargs:
        return None
    neutral, commutes = spec
    a, b = node.args
    if isinstance(a, fx.Node) and _is_scalar(b, neutral) and is_floating(a):
        return a
    if commutes and isinstance(b, fx.Node) and _is_scalar(a, neutral) and is_floating(b):
        return b
    return None


def _is_scalar(value: Any, neutral: float) -> bool:
    return type(value) in (int, float) and value == neutral


# ----------------------------------------------------------------------------- layout ops


_LAYOUT_METHODS = {"flatten", "permute", "transpose", "contiguous", "view", "reshape"}
_LAYOUT_FUNCS = {
    torch.flatten: "flatten",
    torch.permute: "permute",
    torch.transpose: "transpose",
    torch.reshape: "reshape",
}
_SIZE_METHODS = {"size"}  # a node that certainly holds sizes (not a dtype)


def layout_source_axis(
    node: fx.Node, axis: int | None
) -> fx.Node | tuple[fx.Node, int | None] | None:
    """If ``node`` only moves data (flatten / permute / transpose / view / reshape /
    contiguous) and keeps the channel ``axis`` of its output intact, return ``(input, axis)``
    with the axis in the input's coordinates (counted from the right). ``None`` otherwise —
    in particular for ``x.view(dtype)`` (a bitcast: it reinterprets the bits) and for casts.

    A per-channel affine then commutes with ``node``: ``a(layout(x)) = layout(a'(x))``.
    """
    if node.op == "call_method" and node.target in _LAYOUT_METHODS:
        kind = node.target
    elif node.op == "call_function" and node.target in _LAYOUT_FUNCS:
        kind = _LAYOUT_FUNCS[node.target]
    else:
        return None
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node) or not _moves_data_only(node, kind, x):
        return None
    if axis is None or kind == "contiguous":
        return x, axis
    r_in, r_out = rank_of(x), rank_of(node)
    if r_in is None or r_out is None or not 0 <= axis + r_out < r_out or r_in == 0:
        return None
    pos = axis + r_out  # positive axis in the output
    source = _source_position(node, kind, pos, r_in, r_out)
    return None if source is None else (x, source - r_in)


def _moves_data_only(node: fx.Node, kind: str, x: fx.Node) -> bool:
    """Not a bitcast: no dtype argument (or a node that may be one), and the same dtype out as
    in where both are known."""
    in_dtype, out_dtype = known_dtype(x), known_dtype(node)
    if in_dtype is not None and out_dtype is not None and in_dtype != out_dtype:
        return False
    if kind == "view" and dtype_argument(node) is not None:
        args = node.args[1:]
        single_size = len(args) == 1 and _holds_sizes(args[0])
        return single_size and "dtype" not in node.kwargs
    return True


def _holds_sizes(arg: Any) -> bool:
    """Is ``arg`` a node that certainly evaluates to sizes (``x.shape``, ``x.size()``)?"""
    if not isinstance(arg, fx.Node):
        return False
    if arg.op == "call_function" and arg.target is getattr:
        return arg.args[1:] == ("shape",)
    return arg.op == "call_method" and arg.target in _SIZE_METHODS and len(arg.args) == 1


def _source_position(node: fx.Node, kind: str, pos: int, r_in: int, r_out: int) -> int | None:
    """The axis of the input (counted from the left) that output axis ``pos`` of the layout op
    ``node`` holds whole; ``None`` when it holds no single input axis, or that is unknown."""
    if kind == "permute":
        return _permute_source(node, pos, r_in, r_out)
    if kind == "transpose":
        return _transpose_source(node, pos, r_in)
    if kind == "flatten":
        return _flatten_source(node, pos, r_in)
    return _reshape_source(node, pos)


def _permute_source(node: fx.Node, pos: int, r_in: int, r_out: int) -> int | None:
    """``x.permute(*dims)`` / ``x.permute(dims)``: output axis ``pos`` is input axis
    ``dims[pos]``."""
    args = node.args[1:]
    dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
    if len(dims) != r_out or type(dims[pos]) is not int:
        return None
    return dims[pos] % r_in


def _transpose_source(node: fx.Node, pos: int, r_in: int) -> int | None:
    """``x.transpose(dim0, dim1)`` swaps the two axes and keeps the others in place."""
    d0, d1 = _arg(node, 1, "dim0")[0], _arg(node, 2, "dim1")[0]
    if type(d0) is not int or type(d1) is not int:
        return None
    d0, d1 = d0 % r_in, d1 % r_in
    return d1 if pos == d0 else d0 if pos == d1 else pos


def _flatten_source(node: fx.Node, pos: int, r_in: int) -> int | None:
    """``x.flatten(start, end)`` keeps the axes outside ``start..end`` whole, and the merged one
    only when it merges a single axis."""
    start, end = _arg(node, 1, "start_dim", 0)[0], _arg(node, 2, "end_dim", -1)[0]
    if type(start) is not int or type(end) is not int:
        return None
    start, end = start % r_in, end % r_in
    if pos < start:
        return pos
    if pos > start:
        return pos + (end - start)
    return pos if start == end else None


def _reshape_source(node: fx.Node, pos: int) -> int | None:
    """``x.view(sizes)`` / ``x.reshape(sizes)``: only with known shapes, and only when every dim
    from the axis on is kept."""
    s_in, s_out = static_shape(node.args[0]), static_shape(node)
    if s_in is None or s_out is None:
        return None
    suffix = len(s_out) - pos
    if suffix > len(s_in):
        return None
    return len(s_in) - suffix if tuple(s_in[-suffix:]) == tuple(s_out[-suffix:]) else None


# ----------------------------------------------------------------------- channel-wise ops


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
        padding = _per_dim(pool.padding, pool.dims)
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
    return _arg(node, 6, "return_indices", False)[0] is not False


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
    (dims, _), (keepdim, _) = _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False)
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
