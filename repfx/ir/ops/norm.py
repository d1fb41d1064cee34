"""Norm views: a norm of :mod:`repfx.ir.norms` with its per-channel affine (:class:`NormOp`).

:func:`norm_op` recognises each norm of :data:`repfx.ir.norms.NORMS` — LayerNorm and RMSNorm
over the last dim, GroupNorm — as a plain module called on one argument, or as its function
(``F.layer_norm(x, (C,), w, b)``, ``F.group_norm(x, G, w, b)``, ``F.rms_norm(x, (C,), w)``
and their ``torch.`` builtins). The norm's
statistics ignore its affine ``γ ⊙ n + β``, so a per-channel affine can be folded into γ and β.
A weight or bias that is absent (not passed, or ``None``) means γ = 1 / β = 0; one that is given
but not a constant (conditional norms) makes the node no view. The view's dtype is that of its
parameters, or of its input when it has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..graph import ConstantFolder, arg_of, is_plain, known_dtype, module_of, rank_of
from ..norms import NORMS, NormKind, norm_kind_of_function
from .operands import MISSING, Slot, arg_and_slot, optional_constant


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
    second = arg_of(node, 1, norm.shape_arg, MISSING)
    w_node, w_slot = arg_and_slot(node, 2, "weight", None)
    b_node, b_slot = arg_and_slot(node, 3, "bias", None) if norm.has_bias else (None, None)
    (has_weight, weight), (has_bias, bias) = (
        optional_constant(w_node, consts),
        optional_constant(b_node, consts),
    )
    x = arg_of(node, 0, "input", MISSING)
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
