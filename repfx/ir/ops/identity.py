"""Identity views: ops that are no-ops in eval mode, and the tensor they return.

:func:`identity_input` recognises

* ``nn.Identity``, and the dropout modules (``nn.Dropout``, ``Dropout1d/2d/3d``,
  ``AlphaDropout``, ``FeatureAlphaDropout``) in eval mode or at rate 0; stochastic-depth
  modules (timm's ``DropPath``, repfx's own, torchvision's ``StochasticDepth``) matched by exact
  class. A hooked one is kept (a :class:`~repfx.ir.match.Fail`);
* the dropout functions (``F.dropout``, ``F.dropout1d/2d/3d``, ``F.alpha_dropout``,
  ``F.feature_alpha_dropout`` and their ``torch.`` builtins) with a literal ``training=False``
  — traced from ``self.training`` of an eval module; ``F.dropout(x, p)`` defaults to training —
  and torchvision's ``stochastic_depth`` with ``training=False`` or ``p=0``;
* ``x * 1``, ``1 * x``, ``x / 1``, ``x - 0``, ``x + (-0.0)``, ``(-0.0) + x`` on a floating
  tensor — exact for every value, signed zeros included. ``x + 0`` is not a no-op
  (``-0.0 + 0 = +0.0``, and ``1 / x`` then flips from ``-inf`` to ``+inf``), nor ``x - (-0.0)``;
  ``0 - x`` is ``-x``, and on an integer tensor a float scalar changes the dtype.

A training-mode stochastic op is a :class:`~repfx.ir.match.Fail` that says so, not ``None``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..graph import arg_of, has_hooks, is_floating, is_plain, module_of
from ..match import Fail
from .affine import ADD, DIV, MUL, SUB
from .operands import MISSING

# Dropout functions: (name of the training argument, its position, its default).
_DROPOUT_FUNCS: dict[Any, tuple[str, int, Any]] = {
    F.dropout: ("training", 2, True),
    F.dropout1d: ("training", 2, True),
    F.dropout2d: ("training", 2, True),
    F.dropout3d: ("training", 2, True),
    F.alpha_dropout: ("training", 2, False),
    F.feature_alpha_dropout: ("training", 2, False),
    torch.dropout: ("train", 2, MISSING),
    torch.alpha_dropout: ("train", 2, MISSING),
    torch.feature_dropout: ("train", 2, MISSING),
    torch.feature_alpha_dropout: ("train", 2, MISSING),
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
    training = arg_of(node, index, name, default)
    if training is not False:
        return Fail("dropout in training mode")
    x = arg_of(node, 0, "input", MISSING)
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
    rate = arg_of(node, p_index, p_name, MISSING)
    training = arg_of(node, t_index, t_name, True)
    x = arg_of(node, 0, "input", MISSING)
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
    """The drop probability of a known dropout / drop-path module; ``MISSING`` for other modules."""
    if is_plain(m, _DROPOUT_TYPES):
        return m.p
    attr = _DROP_PATHS.get((type(m).__module__, type(m).__qualname__))
    return MISSING if attr is None else getattr(m, attr, None)


def _identity_module(m: nn.Module, node: fx.Node) -> fx.Node | Fail | None:
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return None
    x = node.args[0]
    rate = _drop_rate(m)
    if not is_plain(m, nn.Identity) and rate is MISSING:
        return None
    if has_hooks(m):
        return Fail(f"{type(m).__name__} has hooks")
    if rate is not MISSING and m.training and not (type(rate) in (int, float) and rate == 0):
        return Fail(f"{type(m).__name__} in training mode")
    return x


_NOOP_SCALARS: dict[Any, tuple[float, bool]] = {}
for _t in MUL:
    _NOOP_SCALARS[_t] = (1.0, True)
for _t in DIV:
    _NOOP_SCALARS[_t] = (1.0, False)
for _t in ADD:
    _NOOP_SCALARS[_t] = (-0.0, True)  # (x + 0 turns -0.0 into +0.0: 1 / x then flips sign)
for _t in SUB:
    _NOOP_SCALARS[_t] = (0.0, False)


def _identity_arith(node: fx.Node) -> fx.Node | None:
    """``x * 1``, ``1 * x``, ``x / 1``, ``x - 0``, ``x + (-0.0)``, ``(-0.0) + x`` on a floating
    tensor (see the module docstring for those that are not no-ops)."""
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
    """``value`` is the scalar ``neutral``, down to the sign of a zero (an ``int`` 0 is +0)."""
    return (
        type(value) in (int, float)
        and value == neutral
        and math.copysign(1.0, value) == math.copysign(1.0, neutral)
    )
