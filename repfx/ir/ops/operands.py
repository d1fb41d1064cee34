"""A view's operands: where each of its tensors lives (:class:`Slot`), and how the recognisers
read a call's arguments.

A call's argument is read with :func:`repfx.ir.graph.arg_of` (positional ``index``, else keyword
``name``, else a default; :data:`MISSING` marks "not given, and no default");
:func:`arg_and_slot` reads it together with the slot it sits in, for the tensors a rewrite may
replace. :func:`optional_constant` reads an optional tensor operand (a bias, a norm's γ / β):
absent, a constant, or — given but not a constant — a reason for the op to be no view at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from ..graph import ConstantFolder, arg_of


@dataclass(frozen=True)
class Slot:
    """Where a tensor of a view lives: ``module.attr`` or argument ``index``/``kwarg`` of a node."""

    node: fx.Node
    attr: str | None = None  # module attribute (call_module)
    index: int | None = None  # positional argument (call_function / call_method)
    kwarg: str | None = None  # keyword argument


MISSING = object()  # marker: argument not given


def arg_and_slot(node: fx.Node, index: int, name: str, default: Any = MISSING) -> tuple[Any, Slot]:
    """Argument ``index`` / keyword ``name`` of a call (:func:`repfx.ir.graph.arg_of`), and its
    slot: the position when given there, else the keyword (where a rewrite would put it)."""
    slot = Slot(node, index=index) if len(node.args) > index else Slot(node, kwarg=name)
    return arg_of(node, index, name, default), slot


def optional_constant(arg: Any, consts: ConstantFolder) -> tuple[bool, torch.Tensor | None]:
    """An optional tensor operand: ``(True, None)`` when absent (not given, or ``None``),
    ``(True, value)`` when a constant, ``(False, None)`` when given but not a constant (computed
    from an activation, a placeholder, a literal) — the op is then no view at all."""
    if arg is None:
        return True, None
    value = consts.value(arg) if isinstance(arg, fx.Node) else None
    return value is not None, value
