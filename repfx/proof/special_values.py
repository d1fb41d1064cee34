"""Special values in the proof: signed zeros, infinities, NaN and subnormal numbers.

The commit point's random probes (``repfx.proof.validate``) are finite and never exactly zero,
so a rewrite that holds only on such values passes them: ``x + 0 → x`` maps −0.0 to +0.0, and
a later ``1 / x`` then flips from −inf to +inf; ``x · 0 → 0`` maps ±inf and NaN to 0. Models
meet these values often — a ReLU makes exact zeros, a negation signs them, an overflow or a
division by zero makes infinities.

For a region of elementwise ops — where such identities live; a conv or a linear sums
infinities of both signs into NaN, and merging two of them is exact only on finite values —
the proof adds one probe whose inputs hold :data:`SPECIAL_VALUES` at their first positions, and
the replacement must give, there, non-finite values where the original does, infinities of
the same sign where both give one and, where a later op tells −0.0 from +0.0
(:func:`zero_signs_matter`), the same signs of zeros. Finite values are compared as on the
other probes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from ..ir.match import Fail

# Planted at the first positions of every floating probe input: both zeros, both infinities,
# NaN, and subnormal numbers of float64 and of float32.
SPECIAL_VALUES = (0.0, -0.0, math.inf, -math.inf, math.nan, 1e-310, -1e-40)

# Elementwise: each output element depends on the input element at the same position only
# (layout ops move elements without computing). Channel-mixing ops are not: see above.
_ELEMENTWISE = {
    "add", "sub", "rsub", "mul", "div", "truediv", "addcmul", "addcdiv", "neg", "abs",
    "relu", "gelu", "sigmoid", "tanh", "silu", "hardswish", "hardsigmoid", "dropout",
    "clone", "contiguous", "to", "type_as", "float", "double", "half", "detach", "alias",
    "view", "reshape", "permute", "transpose", "flatten", "unsqueeze", "squeeze", "expand",
    "getitem", "getattr", "size", "dim",
}  # fmt: skip
_ELEMENTWISE_MODULES = (
    nn.Identity, nn.modules.dropout._DropoutNd, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Flatten,
)  # fmt: skip

# Ops whose result depends on the sign of a zero they read: 1 / −0.0 = −inf, atan2(−0.0, −1)
# = −π, copysign, signbit, a negative power of a zero.
_READ_ZERO_SIGNS = {
    "reciprocal", "rsqrt", "div", "truediv", "true_divide", "rtruediv", "floor_divide",
    "floordiv", "remainder", "fmod", "atan2", "arctan2", "copysign", "signbit", "pow", "rpow",
    "angle",
}  # fmt: skip
_SEARCH_LIMIT = 4096  # nodes looked at downstream; past it, assume a reader exists


def op_word(node: fx.Node) -> str:
    """``add`` for ``operator.add``, ``torch.add``, ``Tensor.add_``, ``aten.add.Tensor``."""
    target = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return str(target).split(".")[0].strip("_")


def is_elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Does ``node`` compute each output element from the input element at its position?"""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _ELEMENTWISE_MODULES)
    return node.op in ("call_function", "call_method") and op_word(node) in _ELEMENTWISE


def with_special_values(feeds: dict[fx.Node, Any]) -> dict[fx.Node, Any] | None:
    """``feeds`` with :data:`SPECIAL_VALUES` at the first positions of each floating tensor
    (shifted by one per input, so that different specials meet in binary ops); ``None`` when
    no input is floating."""
    special = torch.tensor(SPECIAL_VALUES, dtype=torch.float64)
    planted, shift = dict(feeds), 0
    for node, value in feeds.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            flat = value.detach().clone().reshape(-1)
            count = min(flat.numel(), special.numel())
            flat[:count] = special.roll(shift)[:count].to(flat.dtype)
            planted[node] = flat.reshape(value.shape)
            shift += 1
    return planted if shift else None


def zero_signs_matter(gm: fx.GraphModule, values: Sequence[fx.Node]) -> bool:
    """Does an op downstream of ``values`` tell −0.0 from +0.0 (see ``_READ_ZERO_SIGNS``)?"""
    seen: set[fx.Node] = set()
    todo = [user for v in values for user in v.users]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        if len(seen) >= _SEARCH_LIMIT:
            return True
        seen.add(node)
        if node.op in ("call_function", "call_method") and op_word(node) in _READ_ZERO_SIGNS:
            return True
        todo.extend(node.users)
    return False


def same_special_values(want: Any, got: Any, signs_of_zeros: bool) -> Fail | None:
    """Why ``got`` differs from ``want`` in the sign of an infinity both hold or
    (``signs_of_zeros``) of a zero both hold (``None``: it does not). Which positions are
    finite, and the finite values, are compared as on every probe, before this: a NaN where
    the original has an infinity is accepted (``x·a − x`` folded into ``x·(a − 1)`` gives ±inf
    at x = inf, where the original gives NaN), a finite value where it has neither is not
    (``x·0 → 0``)."""
    if not (isinstance(want, torch.Tensor) and want.is_floating_point()):
        return None
    infinite = want.isinf() & got.isinf()
    if not torch.equal(want[infinite].sign(), got[infinite].sign()):
        return Fail("an infinity changes sign where an input holds ±inf, NaN or a zero")
    if signs_of_zeros and zero_signs_differ(want, got):
        return Fail(
            "the sign of a zero changes (−0.0 ↔ +0.0), and a later op tells them apart (a "
            "division, a reciprocal, atan2, copysign, signbit, a power)"
        )
    return None


def zero_signs_differ(want: Any, got: Any) -> bool:
    """Is there a position where both are zero with different signs (−0.0 against +0.0)?"""
    if not (isinstance(want, torch.Tensor) and want.is_floating_point()):
        return False
    zeros = (want == 0) & (got == 0)
    return not torch.equal(want.signbit()[zeros], got.signbit()[zeros])
