"""Verification: does a folded model compute what the original computes?

The first comparison is in the model's own dtype against ``repfx.tolerances``. When a
low-precision model misses it, rounding may be to blame (a fold reorders arithmetic and rounds
the folded weights; an ill-conditioned model amplifies both), so repfx re-checks against
float64 truth. The float64 fold of the float64 model must be exact, and the folded weights as
stored in the low precision, evaluated exactly, must be as close to the truth as rounding
allows (within ``ROUNDING_SLACK`` times the original's own rounding error). What is left, the
low-precision arithmetic of the folded graph, which an ill-conditioned model (a GroupNorm over
a constant channel, a division by a small scale) amplifies chaotically, is reported, not judged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .capture import copy_model
from .report import Verification
from .tolerances import (
    max_errors,
    output_tensors,
    reference_dtype,
    rounding_explains,
    tolerance_for,
)


def _run(module: nn.Module, inputs: tuple) -> object:
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        return module(*inputs)


def verify(
    model: nn.Module,
    folded: nn.Module,
    inputs: tuple,
    refold: Callable[[nn.Module], nn.Module] | None = None,
) -> Verification:
    """Compare ``folded`` with ``model`` on ``inputs``. When a low-precision comparison misses
    its tolerance and ``refold`` (the same fold, applied to a float64 copy of the model) is
    given, re-check in float64."""
    reference = copy_model(model)  # the user's model is never run: its forward may mutate it
    expected, actual = _run(reference, inputs), _run(folded, inputs)
    abs_err, rel_err = max_errors(actual, expected)
    if _dtypes(actual) != _dtypes(expected):
        return Verification(abs_err, rel_err, 0.0, passed=False)
    dtype = reference_dtype(expected)
    tol = tolerance_for(dtype)
    if rel_err <= tol or dtype == torch.float64 or refold is None:
        return Verification(abs_err, rel_err, tol, passed=rel_err <= tol)
    inputs64 = tuple(_to_float64(x) for x in inputs)
    reference64 = reference.double()
    truth = _run(reference64, inputs64)
    exact = max_errors(_run(refold(reference64), inputs64), truth)[1]
    original_rounding = max_errors(expected, truth)[1]
    folded_rounding = max_errors(actual, truth)[1]
    # the folded weights, rounded to the model's dtype, evaluated exactly: what storing any
    # fold (a hand-written one too) in that dtype costs
    weight_rounding = max_errors(_run(copy_model(folded).double(), inputs64), truth)[1]
    passed = exact <= tolerance_for(torch.float64) and rounding_explains(
        weight_rounding, original_rounding, dtype
    )
    return Verification(
        abs_err, rel_err, tol, passed, exact, original_rounding, folded_rounding, weight_rounding
    )


def _dtypes(outputs: object) -> list[torch.dtype]:
    return [t.dtype for t in output_tensors(outputs)]


def _to_float64(x: object) -> object:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.double()
    return x


def assert_equivalent(
    model: nn.Module,
    folded: nn.Module,
    inputs: tuple,
    refold: Callable[[nn.Module], nn.Module] | None = None,
) -> Verification:
    """Raise ``AssertionError`` unless :func:`verify` passes; return its result."""
    result = verify(model, folded, inputs, refold)
    assert result.passed, f"folded model differs: {result}"
    return result
