"""Op views: recognise what a graph node computes, whatever its spelling.

Passes never look at ``node.op`` / ``node.target`` themselves; they ask this module for a
view of a node:

* :class:`LinearOp` — conv / conv-transpose / linear: ``y = W ∗ x + b``;
* :class:`NormOp` — a LayerNorm over the last dim or a GroupNorm, with its per-channel affine;
* :class:`AffineOp` — a per-channel affine of one tensor: eval BatchNorm, ``x * g``,
  ``g.view(1,-1,1,1) * x``, ``x.mul(g)``, ``torch.add``/sub/div by constants, ``torch.addcmul``,
  a depthwise 1×1 conv.

Every view carries :class:`Slot` objects naming where each of its tensors lives (a module
attribute or a node argument), so a rewrite can replace them without knowing the spelling.

Channel axes are *negative* (counted from the right) so that they are meaningful whether or not
the batch dimension is present; ``None`` means "uniform over all channels" (a scalar).
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

from .algebra import ChannelAffine, batch_norm_affine
from .graph import ConstantFolder, has_hooks, module_of, rank_of

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
    kind: str  # "layer_norm" | "group_norm"
    channels: int
    channel_axis: int | None  # None when the input rank is unknown (group norm)
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    weight_slot: Slot
    bias_slot: Slot
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


def _has_zero_padding(padding: Any, padding_mode: str = "zeros") -> bool:
    if padding_mode != "zeros":
        return False  # reflect / replicate / circular pads with images of the input
    if isinstance(padding, str):
        return padding == "same"
    if isinstance(padding, int):
        return padding != 0
    return any(p != 0 for p in padding)


def _is_plain(module: nn.Module, base: type) -> bool:
    """A module that computes exactly what ``base`` computes (its forward is not overridden)."""
    return isinstance(module, base) and type(module).forward is base.forward


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
    if any(_is_plain(m, t) for t in _CONV_TYPES):
        dims = _conv_spatial_dims(m)
        return LinearOp(
            kind="conv",
            groups=m.groups,
            spatial_dims=dims,
            zero_padded=_has_zero_padding(m.padding, m.padding_mode),
            geometry=_geometry(dims, m.stride, m.padding, m.dilation, m.padding_mode),
            **common,
        )
    if any(_is_plain(m, t) for t in _CONV_T_TYPES):
        return LinearOp(
            kind="conv_transpose", groups=m.groups, spatial_dims=_conv_spatial_dims(m), **common
        )
    if _is_plain(m, nn.Linear):
        return LinearOp(kind="linear", **common)
    return None


_ARG = object()  # marker: argument not given


def _arg(node: fx.Node, index: int, name: str, default: Any = _ARG) -> tuple[Any, Slot]:
    if len(node.args) > index:
        return node.args[index], Slot(node, index=index)
    return node.kwargs.get(name, default), Slot(node, kwarg=name)


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
    weight = consts.value(w_node)
    bias = None if b_node is None else consts.value(b_node)
    if not isinstance(x, fx.Node) or weight is None or (b_node is not None and bias is None):
        return None
    if kind == "linear":
        return LinearOp(node, "linear", x, weight, bias, w_slot, b_slot)
    stride, _ = _arg(node, 3, "stride", 1)
    padding, _ = _arg(node, 4, "padding", 0)
    dilation, _ = _arg(node, 5, "dilation", 1)
    groups, _ = _arg(node, 6, "groups", 1)
    if any(isinstance(a, fx.Node) for a in (stride, padding, dilation, groups)):
        return None
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
        _has_zero_padding(padding),
        _geometry(dims, stride, padding, dilation, "zeros"),
    )


def _per_dim(value: Any, dims: int) -> tuple[int, ...] | None:
    if isinstance(value, int):
        return (value,) * dims
    if isinstance(value, (tuple, list)) and len(value) == dims:
        return tuple(value) if all(isinstance(v, int) for v in value) else None
    return None


def _geometry(
    dims: int, stride: Any, padding: Any, dilation: Any, padding_mode: str
) -> ConvGeometry | None:
    if padding == "valid":
        padding = 0
    parts = [_per_dim(v, dims) for v in (stride, padding, dilation)]
    if any(p is None for p in parts):
        return None  # e.g. padding="same", which may be asymmetric
    return ConvGeometry(*parts, padding_mode)


_AVG_POOLS = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}


def avg_pool_op(gm: fx.GraphModule, node: fx.Node) -> LinearOp | None:
    """View an average pool as the depthwise conv it is (``1/k`` uniform kernel), when that is
    exact — zeros counted in the average (or no padding), floor mode — and its channel count is
    known from shape propagation. The view has no slots: there is no weight to rewrite."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    m = module_of(gm, node)
    dims = _AVG_POOLS.get(type(m))
    meta = node.meta.get("tensor_meta")
    if dims is None or meta is None or len(meta.shape) < dims + 1:
        return None
    size, stride, padding = (_per_dim(v, dims) for v in (m.kernel_size, m.stride, m.padding))
    if m.ceil_mode or getattr(m, "divisor_override", None) is not None or None in (size, stride):
        return None
    if any(padding) and not m.count_include_pad:
        return None  # the border divides by fewer taps: not a conv
    channels = meta.shape[-(dims + 1)]
    weight = torch.full((channels, 1, *size), 1.0 / math.prod(size), dtype=meta.dtype)
    geometry = ConvGeometry(stride, padding, (1,) * dims)
    return LinearOp(
        node, "avg_pool", node.args[0], weight, None, None, None, channels, dims, any(padding),
        geometry,
    )  # fmt: skip


_NORM_FUNCS = {
    F.layer_norm: "layer_norm",
    F.group_norm: "group_norm",
    torch.layer_norm: "layer_norm",
    torch.group_norm: "group_norm",
}


def norm_op(gm: fx.GraphModule, node: fx.Node, consts: ConstantFolder) -> NormOp | None:
    """View ``node`` as a LayerNorm over the last dim or a GroupNorm, or ``None``."""
    if node.op == "call_module":
        m = module_of(gm, node)
        if _is_plain(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            channels, kind = m.normalized_shape[0], "layer_norm"
        elif _is_plain(m, nn.GroupNorm):
            channels, kind = m.num_channels, "group_norm"
        else:
            return None
        weight, bias = m.weight, m.bias
        w_slot, b_slot = Slot(node, attr="weight"), Slot(node, attr="bias")
        dtype = _param_dtype(m)
    elif node.op == "call_function" and node.target in _NORM_FUNCS:
        kind = _NORM_FUNCS[node.target]
        second, _ = _arg(node, 1, "normalized_shape" if kind == "layer_norm" else "num_groups")
        w_node, w_slot = _arg(node, 2, "weight", None)
        b_node, b_slot = _arg(node, 3, "bias", None)
        weight = None if w_node is None else consts.value(w_node)
        bias = None if b_node is None else consts.value(b_node)
        if (w_node is not None and weight is None) or (b_node is not None and bias is None):
            return None
        if kind == "layer_norm":
            if not isinstance(second, (list, tuple)) or len(second) != 1:
                return None
            channels = int(second[0])
        elif weight is not None:
            channels = weight.numel()
        else:
            return None  # channel count unknown without an affine
        dtype = weight.dtype if weight is not None else torch.get_default_dtype()
    else:
        return None
    if kind == "layer_norm":
        axis = -1
    else:
        rank = rank_of(node)
        axis = None if rank is None else 1 - rank
    return NormOp(node, kind, channels, axis, weight, bias, w_slot, b_slot, dtype)


def _param_dtype(m: nn.Module) -> torch.dtype:
    for p in m.parameters():
        return p.dtype
    return torch.get_default_dtype()


# ------------------------------------------------------------------------ affine ops


def is_batch_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Any batch-norm call, foldable or not."""
    if node.op == "call_module":
        return isinstance(module_of(gm, node), _BatchNorm)
    return node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm)


def batch_norm_reason(gm: fx.GraphModule, node: fx.Node, consts: ConstantFolder) -> str | None:
    """Why a batch-norm node is not an affine (``None`` when it is one, or not a BN at all)."""
    if node.op == "call_module":
        m = module_of(gm, node)
        if not isinstance(m, _BatchNorm):
            return None
        if type(m).forward is not _BatchNorm.forward and not isinstance(m, nn.SyncBatchNorm):
            return "batch norm subclass with its own forward"
        if m.training:
            return "batch norm in training mode (uses batch statistics)"
        if m.running_mean is None or m.running_var is None:
            return "batch norm without running statistics"
        return None
    if node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm):
        training, _ = _arg(node, 5, "training", False)
        if training is not False:
            return "batch norm in training mode (uses batch statistics)"
        mean, _ = _arg(node, 1, "running_mean", None)
        var, _ = _arg(node, 2, "running_var", None)
        if consts.value(mean) is None or consts.value(var) is None:
            return "batch norm statistics are not constants"
    return None


def affine_op(gm: fx.GraphModule, node: fx.Node, consts: ConstantFolder) -> AffineOp | None:
    """View ``node`` as a per-channel affine of one non-constant tensor, or ``None``."""
    if node.op == "call_module":
        return _affine_module(gm, node, consts)
    if node.op in ("call_function", "call_method"):
        if node.target in (F.batch_norm, torch.batch_norm):
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
        return None if axis is False else AffineOp(node, "batch_norm", x, affine, axis, dtype)
    if any(_is_plain(m, t) for t in _CONV_TYPES) and _is_depthwise_pointwise(m):
        affine = ChannelAffine.of(m.weight.reshape(-1), m.bias, m.out_channels)
        axis = -(_conv_spatial_dims(m) + 1)
        return AffineOp(node, "depthwise_1x1_conv", x, affine, axis, m.weight.dtype)
    return None


def _is_depthwise_pointwise(m: _ConvNd) -> bool:
    return (
        m.groups == m.in_channels == m.out_channels
        and all(k == 1 for k in m.kernel_size)
        and all(s == 1 for s in m.stride)
        and not _has_zero_padding(m.padding)
        and m.padding_mode == "zeros"
    )


def _batch_norm_axis(m: _BatchNorm, x: fx.Node) -> int | bool | None:
    """BN normalises dim 1 of an ``(N, C, *)`` input. ``False``: axis unknown."""
    fixed = {nn.BatchNorm2d: -3, nn.BatchNorm3d: -4}
    for t, axis in fixed.items():
        if isinstance(m, t):
            return axis
    rank = rank_of(x)
    return False if rank is None else 1 - rank


def _affine_batch_norm_function(
    gm: fx.GraphModule, node: fx.Node, consts: ConstantFolder
) -> AffineOp | None:
    if batch_norm_reason(gm, node, consts) is not None:
        return None
    x, _ = _arg(node, 0, "input")
    tensors = [
        consts.value(_arg(node, i, name, None)[0])
        for i, name in [(1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")]
    ]
    eps, _ = _arg(node, 7, "eps", 1e-5)
    if not isinstance(x, fx.Node) or isinstance(eps, fx.Node):
        return None
    rank = rank_of(x)
    if rank is None:
        return None
    affine = batch_norm_affine(*tensors, eps)
    return AffineOp(node, "batch_norm", x, affine, 1 - rank, tensors[1].dtype)


_MUL = {operator.mul, torch.mul, "mul"}
_ADD = {operator.add, torch.add, "add"}
_SUB = {operator.sub, torch.sub, "sub"}
_DIV = {operator.truediv, torch.div, "div"}
_ADDCMUL = {torch.addcmul, "addcmul"}


def _affine_arith(node: fx.Node, consts: ConstantFolder) -> AffineOp | None:
    target = node.target
    if target in _ADDCMUL:
        return _affine_addcmul(node, consts)
    if not any(target in group for group in (_MUL, _ADD, _SUB, _DIV)):
        return None
    if len(node.args) != 2 or (node.kwargs and set(node.kwargs) - {"alpha"}):
        return None
    alpha = node.kwargs.get("alpha", 1)
    if not isinstance(alpha, (int, float)):
        return None
    a, b = node.args
    a_const, b_const = _constant_operand(a, consts), _constant_operand(b, consts)
    if (a_const is None) == (b_const is None):
        return None  # needs exactly one tensor operand and one constant
    x, c, const_first = (b, a_const, True) if a_const is not None else (a, b_const, False)
    if not isinstance(x, fx.Node):
        return None
    layout = _channel_layout(c, x)
    if layout is None:
        return None
    vec, axis = layout
    one = torch.ones_like(vec)
    if target in _MUL:
        affine = ChannelAffine(vec, torch.zeros_like(vec))
    elif target in _ADD:
        affine = (
            ChannelAffine(one, alpha * vec) if not const_first else ChannelAffine(one * alpha, vec)
        )
    elif target in _SUB:
        affine = (
            ChannelAffine(-alpha * one, vec) if const_first else ChannelAffine(one, -alpha * vec)
        )
    elif const_first:
        return None  # c / x is not affine
    else:
        affine = ChannelAffine(1.0 / vec, torch.zeros_like(vec))
    const_arg = a if const_first else b
    dtype = c.dtype if isinstance(const_arg, fx.Node) else None
    return AffineOp(node, "arith", x, affine, axis, dtype)


def _affine_addcmul(node: fx.Node, consts: ConstantFolder) -> AffineOp | None:
    if len(node.args) != 3 or node.kwargs.keys() - {"value"}:
        return None
    value = node.kwargs.get("value", 1)
    t_node, m1, m2 = node.args
    shift = _constant_operand(t_node, consts)
    c1, c2 = _constant_operand(m1, consts), _constant_operand(m2, consts)
    if shift is None or (c1 is None) == (c2 is None) or not isinstance(value, (int, float)):
        return None
    x, scale = (m2, c1) if c1 is not None else (m1, c2)
    if not isinstance(x, fx.Node):
        return None
    s_layout, t_layout = _channel_layout(scale, x), _channel_layout(shift, x)
    if s_layout is None or t_layout is None:
        return None
    axis = merge_axes(s_layout[1], t_layout[1])
    if axis is False:
        return None
    affine = ChannelAffine(value * s_layout[0], t_layout[0] * torch.ones_like(s_layout[0]))
    return AffineOp(node, "addcmul", x, affine, axis, scale.dtype)


def merge_axes(a: int | None, b: int | None) -> int | bool | None:
    """The common axis of two affines (``None`` = uniform), or ``False`` when they clash."""
    if a is None or b is None or a == b:
        return b if a is None else a
    return False


def _constant_operand(arg: Any, consts: ConstantFolder) -> torch.Tensor | None:
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
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


def identity_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | str | None:
    """If ``node`` is a no-op in eval mode, its input; a reason string if it is a training-mode
    stochastic op; else ``None``."""
    if node.op == "call_module":
        return _identity_module(module_of(gm, node), node)
    if node.op == "call_function" and node.target in (F.dropout, torch.dropout):
        training, _ = _arg(node, 2, "training", True)  # F.dropout defaults to training=True
        if training is not False:
            return "dropout in training mode"
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    if node.op in ("call_function", "call_method"):
        return _identity_arith(node)
    return None


_DROP_PATH_NAMES = ("DropPath", "StochasticDepth")
_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def _identity_module(m: nn.Module, node: fx.Node) -> fx.Node | str | None:
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return None
    x = node.args[0]
    if has_hooks(m) and (_is_plain(m, nn.Identity) or isinstance(m, _DROPOUT_TYPES)):
        return f"{type(m).__name__} has hooks"
    if _is_plain(m, nn.Identity):
        return x
    if isinstance(m, _DROPOUT_TYPES) or type(m).__name__ in _DROP_PATH_NAMES:
        p = getattr(m, "p", getattr(m, "drop_prob", None))
        if m.training and p != 0:
            return f"{type(m).__name__} in training mode"
        return x
    return None


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
    """``x * 1``, ``1 * x``, ``x / 1``, ``x + 0``, ``0 + x``, ``x - 0`` on a floating tensor."""
    spec = _NOOP_SCALARS.get(node.target)
    if spec is None or len(node.args) != 2 or node.kwargs:
        return None
    neutral, commutes = spec
    a, b = node.args
    if isinstance(a, fx.Node) and _is_scalar(b, neutral) and _is_float(a):
        return a
    if commutes and isinstance(b, fx.Node) and _is_scalar(a, neutral) and _is_float(b):
        return b
    return None


def _is_scalar(value: Any, neutral: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == neutral


def _is_float(node: fx.Node) -> bool:
    """True when ``node`` is known to be a floating tensor (so ``x * 1`` keeps its dtype)."""
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "dtype"):
        return meta.dtype.is_floating_point
    return node.meta.get("repfx_float", False)


# ----------------------------------------------------------------------------- layout ops


_LAYOUT_METHODS = {"flatten", "permute", "transpose", "contiguous", "view", "reshape"}
_LAYOUT_FUNCS = {torch.flatten: "flatten", torch.permute: "permute", torch.transpose: "transpose"}


def layout_source_axis(
    node: fx.Node, axis: int | None
) -> fx.Node | tuple[fx.Node, int | None] | None:
    """If ``node`` only moves data (flatten / permute / transpose / view / reshape /
    contiguous) and keeps the channel ``axis`` of its output intact, return ``(input, axis)``
    with the axis in the input's coordinates (counted from the right). ``None`` otherwise.

    A per-channel affine then commutes with ``node``: ``a(layout(x)) = layout(a'(x))``.
    """
    if node.op == "call_method" and node.target in _LAYOUT_METHODS:
        kind = node.target
    elif node.op == "call_function" and node.target in _LAYOUT_FUNCS:
        kind = _LAYOUT_FUNCS[node.target]
    else:
        return None
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node):
        return None
    if axis is None or kind == "contiguous":
        return x, axis
    r_in, r_out = rank_of(x), rank_of(node)
    if r_in is None or r_out is None:
        return None
    pos = axis + r_out  # positive axis in the output
    source = _source_position(node, kind, pos, r_in, r_out)
    return None if source is None else (x, source - r_in)


def _source_position(node: fx.Node, kind: str, pos: int, r_in: int, r_out: int) -> int | None:
    args = node.args[1:]
    if kind == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        return dims[pos] % r_in if len(dims) == r_out and isinstance(dims[pos], int) else None
    if kind == "transpose":
        d0, d1 = _arg(node, 1, "dim0")[0], _arg(node, 2, "dim1")[0]
        if not isinstance(d0, int) or not isinstance(d1, int):
            return None
        d0, d1 = d0 % r_in, d1 % r_in
        return d1 if pos == d0 else d0 if pos == d1 else pos
    if kind == "flatten":
        start, end = _arg(node, 1, "start_dim", 0)[0], _arg(node, 2, "end_dim", -1)[0]
        if not isinstance(start, int) or not isinstance(end, int):
            return None
        start, end = start % r_in, end % r_in
        if pos < start:
            return pos
        if pos > start:
            return pos + (end - start)
        return pos if start == end else None
    # view / reshape: only with known shapes, and only when every dim from the axis on is kept
    s_in, s_out = _shape(node.args[0]), _shape(node)
    if s_in is None or s_out is None:
        return None
    suffix = len(s_out) - pos
    return len(s_in) - suffix if tuple(s_in[-suffix:]) == tuple(s_out[-suffix:]) else None


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
