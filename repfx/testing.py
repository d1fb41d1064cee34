"""Assertions for your own tests, as ``torch.testing`` offers for tensors.

``assert_equivalent(model, folded, inputs)`` runs repfx's verification (each output on its own
scale, a float64 re-check where an output misses its tolerance) and raises ``AssertionError``
with the per-output lines when it fails. ``assert_close(actual, expected)`` compares two
output structures with the tolerances of :mod:`repfx.proof.tolerances`, nothing more: no re-check.

repfx itself never calls these; its verifier returns results and raises
:class:`repfx.VerificationError`.
"""

from __future__ import annotations

from torch import nn

from .proof.tolerances import output_tensors, tensor_error, tolerance_for
from .proof.verify import Refold, Verification, verify


def assert_close(actual: object, expected: object) -> None:
    """Assert two output structures agree, each output tensor within the tolerance of its own
    dtype on its own scale (NaN / Inf at the same positions)."""
    got, want = output_tensors(actual), output_tensors(expected)
    assert len(got) == len(want), f"{len(got)} output tensors, expected {len(want)}"
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        assert a.shape == e.shape, f"output {i}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        err = tensor_error(a, e)
        tol = tolerance_for(e.dtype)
        assert err.nonfinite_mismatches == 0, (
            f"output {i}: NaN / Inf differ at {err.nonfinite_mismatches} positions"
        )
        assert err.rel_error <= tol, (
            f"output {i}: max abs error {err.abs_error:.3g}, relative {err.rel_error:.3g} "
            f"> {tol:.1g}"
        )


def assert_equivalent(
    model: nn.Module,
    folded: nn.Module,
    inputs: tuple,
    refold: Refold | None = None,
) -> Verification:
    """Raise ``AssertionError`` unless :func:`repfx.proof.verify.verify` passes; return its
    result."""
    result = verify(model, folded, inputs, refold)
    assert result.passed, "folded model differs: " + "\n".join(result.lines())
    return result
