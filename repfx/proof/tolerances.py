"""The one place where numerical tolerances live.

Every output tensor of a folded model is compared with the same output of the original on its
own scale: ``max |a − e| / max |e|`` over the positions where both are finite, never pooled over
outputs (a 1e6-scale output would hide a wrong output of scale 1). NaN must sit at the same
positions in both, ±Inf at the same positions with the same sign; non-floating outputs must be
equal. Fold arithmetic is float64, so the only differences left are the rounding of the model's
own dtype in a different order of operations (``RELATIVE_TOLERANCE``).

When an output misses its tolerance, ``repfx.proof.verify`` re-checks it against float64 truth; the
constants of that re-check are below, each with its reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

RELATIVE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}


# Low precision, float64 re-check, part 2: the folded weights, stored in the low precision and
# evaluated exactly, may be off float64 truth by at most this many times the original's own
# low-precision error against that truth (see repfx.proof.verify). A wrong fold is off by O(1), far
# beyond this on a well-conditioned model; on a chaotic one part 1 (the float64 fold) decides.
ROUNDING_SLACK = 16.0

# Float64 re-check, part 1: the float64 fold of the float64 model must be within
# ``float64_criterion(sensitivity)`` of that model. ``sensitivity`` is the model's own float64
# conditioning, per output: the largest relative move of that output, over
# ``SENSITIVITY_TRIALS`` draws, when every floating parameter and buffer of the float64 original
# is multiplied by ``1 ± SENSITIVITY_PERTURBATION`` (a random sign per element), i.e. re-rounded
# by one float64 ulp. A fold re-rounds each folded parameter after a few float64 operations
# (a BN scale, a product, a sum of kernels: a few ulps) and reorders the arithmetic at its seams,
# so on a correct fold the ratio (fold error / sensitivity) is O(1): 1.2 to 4.3 measured on
# timm halonet_h1 with O(1) weights (fold error 3.3e-9, sensitivity 7.6e-10 to 2.7e-9 over three
# draws). ``FLOAT64_SENSITIVITY_MULTIPLE`` leaves an 8x margin over that. A well-conditioned
# model's sensitivity is ~1e-15, so the 1e-10 floor of RELATIVE_TOLERANCE decides there.
SENSITIVITY_PERTURBATION = torch.finfo(torch.float64).eps  # relative, per element
SENSITIVITY_TRIALS = 2
FLOAT64_SENSITIVITY_MULTIPLE = 32.0
# A wrong fold is O(1) off and must fail however ill-conditioned the model: the float64
# criterion never exceeds this (a model whose float64 output moves by 3e-5 when its parameters
# move by one ulp computes nothing meaningful in float32 either).
FLOAT64_CRITERION_CEILING = 1e-3
# ... except where the float64 original itself jumps: an output that moves by 1% of its scale
# when the weights move by one ulp (2e-16) is discontinuous at these inputs (a comparison, a
# top-k, NMS flips), not merely ill-conditioned. A correct fold moves it as far, so no fold can
# be judged on it there: the output is reported as not verifiable, neither passed nor failed.
DISCONTINUITY = 1e-2


# An integer output (labels, indices) the float64 fold changes where two perturbations did
# not: a tie that only some roundings break. So many more perturbations, before calling the
# difference a wrong fold, that a tie survives them all with probability ~2^-8.
EXACT_SENSITIVITY_TRIALS = 8


def discontinuous(sensitivity: float) -> bool:
    """Does an output of this float64 ``sensitivity`` jump at the inputs it was measured on?"""
    return not math.isfinite(sensitivity) or sensitivity >= DISCONTINUITY


def tolerance_for(dtype: torch.dtype) -> float:
    """Relative tolerance of an output of ``dtype`` (0 for non-floating dtypes: exact)."""
    return RELATIVE_TOLERANCE.get(dtype, 0.0)


def float64_criterion(sensitivity: float) -> float:
    """The largest float64 fold error (relative) a float64 output of the given float64
    ``sensitivity`` may show: the 1e-10 floor, or ``FLOAT64_SENSITIVITY_MULTIPLE`` times its
    sensitivity, at most ``FLOAT64_CRITERION_CEILING``."""
    if not math.isfinite(sensitivity):
        return FLOAT64_CRITERION_CEILING
    scaled = FLOAT64_SENSITIVITY_MULTIPLE * sensitivity
    return min(FLOAT64_CRITERION_CEILING, max(tolerance_for(torch.float64), scaled))


def output_tensors(outputs: object) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(comparable(outputs))
    return [t for t in leaves if isinstance(t, torch.Tensor)]


_STATE_DEPTH = 6  # how deep comparable() opens objects inside objects
# What comparable() never opens (a symbolic size under capture is one, not its internals)
_ATOMS = (torch.Tensor, nn.Module, type, torch.SymInt, torch.SymFloat, torch.SymBool)


def comparable(outputs: object, depth: int = 0) -> object:
    """``outputs`` with each object that ``torch.utils._pytree`` does not know (a HuggingFace
    ``DynamicCache`` of keys and values) opened into ``{type name: {attribute: value}}``,
    recursively: the tensors it holds are then compared like any other output, and its other
    attributes by equality. Tensors, modules, classes, functions and symbolic sizes are left as
    they are."""
    return tree_map(lambda leaf: _object_state(leaf, depth), outputs)


def _object_state(leaf: object, depth: int) -> object:
    opaque = isinstance(leaf, _ATOMS) or callable(leaf)
    if opaque or depth >= _STATE_DEPTH or not hasattr(leaf, "__dict__"):
        return leaf
    state = {name: comparable(value, depth + 1) for name, value in vars(leaf).items()}
    return {type(leaf).__qualname__: state}


@dataclass(frozen=True)
class TensorError:
    """How far one output tensor is from its expected value, on its own scale."""

    abs_error: float  # max |a − e| over the positions finite in both
    rel_error: float  # abs_error / max |e| over the finite positions of e (abs_error if e is 0)
    nonfinite_mismatches: int  # positions where NaN / ±Inf differ (NaN vs not, or Inf vs other)
    scale: float = 0.0  # max |e| over the finite positions of e: what rel_error is relative to

    @property
    def rel_or_inf(self) -> float:
        """``rel_error``, or ``inf`` when NaN / Inf do not match."""
        return math.inf if self.nonfinite_mismatches else self.rel_error


def tensor_error(actual: torch.Tensor, expected: torch.Tensor) -> TensorError:
    """Compare two tensors of the same shape (any dtypes) elementwise, in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    nan_a, nan_e = a.isnan(), e.isnan()
    inf_differs = (a.isinf() | e.isinf()) & (a != e) & ~nan_a & ~nan_e
    mismatches = int(((nan_a != nan_e) | inf_differs).sum())
    finite = a.isfinite() & e.isfinite()
    if not bool(finite.any()):
        return TensorError(0.0, 0.0, mismatches)
    abs_err = (a - e).abs()[finite].max().item()
    scale = e.abs()[e.isfinite()].max().item()
    return TensorError(abs_err, abs_err / scale if scale > 0 else abs_err, mismatches, scale)


def max_errors(actual: object, expected: object) -> tuple[float, float]:
    """``(max |a − e|, max |a − e| / max |e|)``: the largest elementwise error of each output
    tensor of two output structures, each relative to its own scale, and the worst of them
    (never a mean, never pooled over outputs). ``inf`` when NaN / Inf positions differ.

    Raises ``ValueError`` when the number of tensors or a shape differs.
    """
    got, want = output_tensors(actual), output_tensors(expected)
    if len(got) != len(want):
        raise ValueError(f"{len(got)} output tensors, expected {len(want)}")
    worst_abs, worst_rel = 0.0, 0.0
    for a, e in zip(got, want, strict=True):
        if a.shape != e.shape:
            raise ValueError(f"output shape {tuple(a.shape)}, expected {tuple(e.shape)}")
        if e.numel() == 0:
            continue
        err = tensor_error(a, e)
        worst_abs = max(worst_abs, math.inf if err.nonfinite_mismatches else err.abs_error)
        worst_rel = max(worst_rel, err.rel_or_inf)
    return worst_abs, worst_rel


def reference_dtype(outputs: object) -> torch.dtype:
    """The least precise floating dtype among the outputs (it sets the tolerance)."""
    dtypes = [t.dtype for t in output_tensors(outputs) if t.is_floating_point()]
    if not dtypes:
        return torch.float64
    return max(dtypes, key=tolerance_for)


def rounding_criterion(original_rounding: float, dtype: torch.dtype) -> float:
    """The largest error (vs float64 truth) of a low-precision fold's rounded weights that the
    original's own low-precision error ``original_rounding`` explains."""
    return max(tolerance_for(dtype), ROUNDING_SLACK * original_rounding)


def constants_match(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    """Are two constants the same value, up to the rounding of ``dtype`` (a constant computed
    in float64 by a fold vs the same constant computed by the model in ``dtype``)?"""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    scale = float(max(a.abs().max(), b.abs().max(), 1.0)) if a.numel() else 1.0
    return bool(torch.all((a - b).abs() <= 8 * eps * scale))


# The commit point (repfx.proof.validate) evaluates a region and its replacement in float64 on
# random probes; the only difference a correct rewrite leaves is the rounding of its folded
# constants to the model's dtype (relative ~eps per constant). A wrong rewrite is off by O(1).
REWRITE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,  # ~84 eps
    torch.float16: 1e-2,  # ~10 eps
    torch.bfloat16: 6e-2,  # ~8 eps
}


def rewrite_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance (of an output's scale) for proving one rewrite at the commit point."""
    return REWRITE_TOLERANCE.get(dtype, REWRITE_TOLERANCE[torch.float64])
