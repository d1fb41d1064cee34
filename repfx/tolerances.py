"""The one place where numerical tolerances live.

A folded model is compared with the original by the largest absolute difference over all
outputs, relative to the largest absolute value of the original's outputs (the output's scale).
Fold arithmetic is float64, so the only differences left are the rounding of the model's own
dtype in a different order of operations.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten

RELATIVE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}


# When a low-precision comparison misses its tolerance, the fold is re-checked against a float64
# run of the original: it passes if the float64 fold is exact (``float64`` tolerance) and the
# folded weights, stored in the low precision and evaluated exactly, are off by at most this
# many times the original's own rounding error (see repfx.verify).
ROUNDING_SLACK = 16.0  # a wrong fold is off by O(1), far beyond this


def tolerance_for(dtype: torch.dtype) -> float:
    return RELATIVE_TOLERANCE.get(dtype, 0.0)


def output_tensors(outputs: object) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(outputs)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def max_errors(actual: object, expected: object) -> tuple[float, float]:
    """``(max |a − e|, max |a − e| / max |e|)`` over every tensor of two output structures.

    Raises ``ValueError`` when the structures or shapes differ.
    """
    got, want = output_tensors(actual), output_tensors(expected)
    if len(got) != len(want):
        raise ValueError(f"{len(got)} output tensors, expected {len(want)}")
    abs_err, scale = 0.0, 0.0
    for a, e in zip(got, want, strict=True):
        if a.shape != e.shape:
            raise ValueError(f"output shape {tuple(a.shape)}, expected {tuple(e.shape)}")
        if e.numel() == 0:
            continue
        diff = (a.detach().double() - e.detach().double()).abs().max().item()
        abs_err = max(abs_err, diff)
        scale = max(scale, e.detach().double().abs().max().item())
    return abs_err, (abs_err / scale if scale > 0 else abs_err)


def reference_dtype(outputs: object) -> torch.dtype:
    """The least precise floating dtype among the outputs (it sets the tolerance)."""
    dtypes = [t.dtype for t in output_tensors(outputs) if t.is_floating_point()]
    if not dtypes:
        return torch.float64
    return max(dtypes, key=tolerance_for)


def rounding_explains(folded_err: float, rounding_err: float, dtype: torch.dtype) -> bool:
    """Is a low-precision fold's error (vs float64 truth) explained by ``rounding_err``?"""
    return folded_err <= max(tolerance_for(dtype), ROUNDING_SLACK * rounding_err)


def constants_match(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    """Are two constants the same value, up to the rounding of ``dtype`` (a constant computed
    in float64 by a fold vs the same constant computed by the model in ``dtype``)?"""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    scale = float(max(a.abs().max(), b.abs().max(), 1.0)) if a.numel() else 1.0
    return bool(torch.all((a - b).abs() <= 8 * eps * scale))


def assert_close(actual: object, expected: object) -> None:
    """Assert two output structures agree within the tolerance of their dtype."""
    abs_err, rel_err = max_errors(actual, expected)
    tol = tolerance_for(reference_dtype(expected))
    assert rel_err <= tol, f"max abs error {abs_err:.3g}, relative {rel_err:.3g} > {tol:.1g}"
