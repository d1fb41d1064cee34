"""The run-time checks a folded graph may carry: calls that read only a value's rank and raise
:class:`repfx.GuardError` when a fold's assumption about it does not hold
(:mod:`repfx.capture.rank_guards` places them), and the check that an argument torch.fx traced
at its default ``None`` is still ``None`` (:func:`require_none`). They compute nothing and
write nothing: to the passes, a rank guard reads only the shape of what it checks
(:func:`repfx.ir.graph.reads_only_shape`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from ...errors import GuardError


@torch.fx.node.has_side_effect
def require_rank(value: Any, rank: int, name: str, reader: str) -> None:
    """Raise :class:`GuardError` unless ``value`` (a tensor) has ``rank`` dimensions."""
    if isinstance(value, torch.Tensor) and value.dim() != rank:
        raise GuardError(
            f"{name} has rank {value.dim()}, but the module was folded assuming rank {rank} "
            f"({reader}); its folds are exact only on inputs of that rank. Fold with example "
            "inputs of the form you call it with: repfx.fold(model, example_inputs)"
        )


@torch.fx.node.has_side_effect
def require_none(value: Any, name: str) -> None:
    """Raise :class:`GuardError` unless ``value`` (an argument the capture fixed to its default,
    ``None``) is ``None``."""
    if value is not None:
        raise GuardError(
            f"{name} was captured at its default (None) and the folded module keeps it there: "
            "call it without that argument, or fold with example inputs that pass it"
        )


def is_guard(node: fx.Node) -> bool:
    """Is ``node`` a :func:`require_rank` check (it computes nothing)?"""
    return node.op == "call_function" and node.target is require_rank
