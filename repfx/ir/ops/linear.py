"""Linear views: ``y = W ∗ x + b`` (:class:`LinearOp`), whatever the spelling.

:func:`linear_op` recognises a plain ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` or
``nn.Linear`` module called on one argument, and the calls ``F.conv1d/2d/3d`` /
``torch.conv1d/2d/3d`` and ``F.linear`` (and the builtin it is, which dynamo's graphs call),
with a constant weight and a bias that is absent or a constant. A conv also says whether it
reads zeros beyond its input's border (``zero_padded``: ``padding="valid"`` never does,
``padding="same"`` does unless every kernel extent is 1, reflect / replicate / circular padding
pads with images of the input) and, when its padding is symmetric and known, its
:class:`ConvGeometry`. The per-dim and padding helpers here are shared with the other views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..graph import ConstantFolder, arg_of, is_plain, module_of
from .operands import MISSING, Slot, arg_and_slot, optional_constant


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


def conv_spatial_dims(module: nn.Module) -> int:
    return len(module.kernel_size)


def _same_padding(kernel: Any, dilation: Any, dims: int) -> tuple[int, ...] | None:
    """The symmetric padding ``padding="same"`` amounts to (``None``: asymmetric, or unknown)."""
    k, d = per_dim(kernel, dims), per_dim(dilation, dims)
    if k is None or d is None:
        return None
    totals = [di * (ki - 1) for ki, di in zip(k, d, strict=True)]
    return None if any(t % 2 for t in totals) else tuple(t // 2 for t in totals)


def has_zero_padding(
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
        k, d = per_dim(kernel, dims), per_dim(dilation, dims)
        if padding != "same" or k is None or d is None:
            return True  # unknown: assume it pads
        return any(di * (ki - 1) > 0 for ki, di in zip(k, d, strict=True))
    if isinstance(padding, int):
        return padding != 0
    return any(p != 0 for p in padding)


CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
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
    if is_plain(m, CONV_TYPES):
        dims = conv_spatial_dims(m)
        return LinearOp(
            kind="conv",
            groups=m.groups,
            spatial_dims=dims,
            zero_padded=has_zero_padding(m.padding, m.padding_mode, m.kernel_size, m.dilation),
            geometry=_geometry(
                dims, m.stride, m.padding, m.dilation, m.padding_mode, m.kernel_size
            ),
            **common,
        )
    if is_plain(m, _CONV_T_TYPES):
        return LinearOp(
            kind="conv_transpose", groups=m.groups, spatial_dims=conv_spatial_dims(m), **common
        )
    if is_plain(m, nn.Linear):
        return LinearOp(kind="linear", **common)
    return None


def _linear_op_function(node: fx.Node, consts: ConstantFolder) -> LinearOp | None:
    target = node.target
    if target in _CONV_FUNCS:
        kind, dims = "conv", _CONV_FUNCS[target]
    elif target in (F.linear, torch._C._nn.linear):
        kind, dims = "linear", 0
    else:
        return None
    x = arg_of(node, 0, "input", MISSING)
    w_node, w_slot = arg_and_slot(node, 1, "weight")
    b_node, b_slot = arg_and_slot(node, 2, "bias", None)
    weight = consts.value(w_node) if isinstance(w_node, fx.Node) else None
    has_bias, bias = optional_constant(b_node, consts)
    if not isinstance(x, fx.Node) or weight is None or not has_bias:
        return None
    if kind == "linear":
        return LinearOp(node, "linear", x, weight, bias, w_slot, b_slot)
    stride = arg_of(node, 3, "stride", 1)
    padding = arg_of(node, 4, "padding", 0)
    dilation = arg_of(node, 5, "dilation", 1)
    groups = arg_of(node, 6, "groups", 1)
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
        has_zero_padding(padding, "zeros", kernel, dilation),
        _geometry(dims, stride, padding, dilation, "zeros", kernel),
    )


def per_dim(value: Any, dims: int) -> tuple[int, ...] | None:
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
    parts = [per_dim(v, dims) for v in (stride, padding, dilation)]
    if any(p is None for p in parts):
        return None
    return ConvGeometry(*parts, padding_mode)


# F.pad and the builtin it wraps (what dynamo's graphs call): the same arguments.
PAD_FUNCTIONS = (F.pad, torch._C._nn.pad)
