"""The normalisations repfx folds into, declared once.

A norm here computes ``γ ⊙ n(x) + β`` with statistics ``n`` that do not depend on ``γ, β``, so
a per-channel affine after it folds into ``γ, β`` (``algebra.fold_affine_into_norm``). Each
:class:`NormKind` says how the norm is spelled (its module class and functions), where its
channels are, whether it has a ``β``, and its name in counts and reports. The rank inference
(``repfx.ir.graph``), the op views (``repfx.ir.ops.norm_op``), capture's tables of ops that allocate
(``repfx.capture.writes``), the commit point's probe sizes (``repfx.proof.validate``), the op counts
(``repfx.ir.op_kinds``) and the report read this table: a new norm is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class NormKind:
    kind: str  # its op kind in views, counts and records ("layer_norm")
    words: str  # in plain words, for reports ("layer norm")
    module: type[nn.Module]
    functions: tuple[Callable, ...]  # f(input, <shape_arg>, weight, [bias,] eps)
    shape_arg: str  # the second argument: "normalized_shape" or "num_groups"
    has_bias: bool  # a β after γ (an RMSNorm has γ only)
    channels_last: bool  # channels on the last axis (else on axis 1)

    def module_channels(self, module: nn.Module) -> int | None:
        """The channels of ``module``'s ``γ, β``; ``None`` where it normalises over more than
        one trailing dim (no per-channel view)."""
        if self.shape_arg == "num_groups":
            return module.num_channels
        shape = module.normalized_shape
        return shape[0] if len(shape) == 1 else None


NORMS: tuple[NormKind, ...] = (
    NormKind(
        "layer_norm", "layer norm", nn.LayerNorm, (F.layer_norm, torch.layer_norm),
        "normalized_shape", has_bias=True, channels_last=True,
    ),
    NormKind(
        "group_norm", "group norm", nn.GroupNorm, (F.group_norm, torch.group_norm),
        "num_groups", has_bias=True, channels_last=False,
    ),
    NormKind(
        "rms_norm", "RMS norm", nn.RMSNorm, (F.rms_norm, torch.rms_norm),
        "normalized_shape", has_bias=False, channels_last=True,
    ),
)  # fmt: skip

NORM_MODULES: tuple[type[nn.Module], ...] = tuple(k.module for k in NORMS)
NORM_FUNCTIONS: frozenset[Callable] = frozenset(f for k in NORMS for f in k.functions)
_BY_FUNCTION = {f: k for k in NORMS for f in k.functions}


def norm_kind_of_function(target: object) -> NormKind | None:
    """The norm a function call computes, if ``target`` is one of their functions."""
    try:
        return _BY_FUNCTION.get(target)
    except TypeError:  # an unhashable target
        return None


# Functions that update the running statistics they are given unless their flag (argument 5:
# ``training``, ``use_input_stats``) is ``False``: (running mean at, running variance at, flag).
RUNNING_STATISTICS_FUNCTIONS: dict[Callable, tuple[int, int, str]] = {
    F.batch_norm: (1, 2, "training"),
    torch.batch_norm: (3, 4, "training"),
    F.instance_norm: (1, 2, "use_input_stats"),
    torch.instance_norm: (3, 4, "use_input_stats"),
}
