"""Verification: does a folded model compute what the original computes?

Both are run on the example inputs and compared output by output (``repfx.proof.tolerances``);
a fold that may write when it runs (``repfx.proof.pure``) is run twice, and so is the model, and
the second call is compared as well (state that changes per call must change alike):

1. Structure. The outputs' pytree structure must match (an object pytree does not know, such
   as a HuggingFace cache, is compared by its attributes: ``tolerances.comparable``),
   non-tensor leaves must be equal, and
   each output tensor must have the original's shape and dtype; otherwise the verification
   fails (it never raises).
2. Each output tensor on its own scale: ``max |a − e| / max |e|`` over the positions finite in
   both must be within the tolerance of its dtype; NaN must sit at the same positions, ±Inf at
   the same positions with the same sign; non-floating outputs must be equal.
3. An output that misses its tolerance may be a victim of rounding (a fold reorders arithmetic
   and rounds its folded weights; an ill-conditioned model amplifies both), so it is re-checked,
   on its own, against float64 truth (the original, its parameters converted exactly to float64,
   run on float64 inputs):

   a. The fold is exact: the float64 fold of the float64 model (``refold``; the fold itself for
      a float64 model) is within ``float64_criterion(sensitivity)`` of truth, where
      ``sensitivity`` is how far that same output of the float64 original moves when each of
      its floating parameters and buffers is re-rounded by one ulp — the model's own float64
      conditioning, not a fixed number, and another output's cannot lend it slack.
   b. Storing the fold costs no more than rounding (low-precision outputs): the fold's weights
      as stored, evaluated in float64, are within ``ROUNDING_SLACK`` times the original's own
      low-precision error against truth (never against the fold's own error).

   What is left, the low-precision arithmetic of the folded graph, which an ill-conditioned
   model (a GroupNorm over a constant channel, a division by a small scale) amplifies
   chaotically, is reported, not judged.

:func:`verify_redrawn` repeats all of this on a copy whose foldable parameters are re-drawn at
O(1) (``repfx.proof.redraw``): identity BN statistics and zero biases hide wrong folds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx, nn
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_map

from ..errors import ExampleInputError, one_line
from ..ir.match import Fail
from ..report.fold_report import (
    AS_GIVEN,
    DISCONTINUOUS,
    FAILED,
    ILL_CONDITIONED,
    OK,
    REDRAWN,
    Float64Recheck,
    OutputComparison,
    Verification,
)
from .inputs import copy_model, run
from .pure import runs_without_writes
from .redraw import VERIFICATION_SEED, foldable_tensors, redraw_foldable_parameters_
from .sharing import run_sharing, share_parameters
from .tolerances import (
    EXACT_SENSITIVITY_TRIALS,
    SENSITIVITY_PERTURBATION,
    SENSITIVITY_TRIALS,
    comparable,
    discontinuous,
    float64_criterion,
    output_tensors,
    reference_dtype,
    rounding_criterion,
    tensor_error,
    tolerance_for,
)

Refold = Callable[[nn.Module], nn.Module]  # the same fold, applied to a float64 copy


def verify(
    model: nn.Module,
    folded: nn.Module,
    inputs: tuple,
    refold: Refold | None = None,
    *,
    label: str = AS_GIVEN,
) -> Verification:
    """Compare ``folded`` with ``model`` on ``inputs``, every output on its own (see the module
    docstring). ``refold`` (the same fold, applied to a float64 copy of the model) enables the
    float64 re-check of a low-precision model; a float64 model needs none."""
    # the model is run on a copy: a forward may mutate its module (training-mode BN
    # statistics); so is the fold, unless nothing in it can write (repfx.proof.pure). A fold
    # that may write is compared on a second call as well: state that changes per call (a
    # counter, a cache) must change in the fold as in the model
    calls = 1 if runs_without_writes(folded) else 2
    expected = [comparable(out) for out in run_sharing(model, inputs, calls)]
    actual = [comparable(out) for out in run_sharing(folded, inputs, calls)]
    first = _first_call(model, folded, inputs, refold, label, actual[0], expected[0])
    if calls == 1 or not first.passed:
        return first
    return _with_second_call(first, actual[1], expected[1])


def _first_call(
    model: nn.Module,
    folded: nn.Module,
    inputs: tuple,
    refold: Refold | None,
    label: str,
    actual: object,
    expected: object,
) -> Verification:
    """The outputs of the first call compared, with the float64 re-check of those that miss."""
    tolerance = tolerance_for(reference_dtype(expected))
    mismatch = structure_mismatch(actual, expected)
    if mismatch is not None:
        return Verification.of(label, (), tolerance, mismatch.reason)
    paths, got, want = _tensor_leaves(actual, expected)
    comparisons = [compare_output(p, a, e) for p, a, e in zip(paths, got, want, strict=True)]
    if any(_recheckable(c) for c in comparisons):
        float64 = reference_dtype(expected) == torch.float64
        if float64 or refold is not None:
            recheck = _Float64Recheck(model, folded, inputs, refold, got, want)
            comparisons = [
                recheck.judge(i, c) if _recheckable(c) else c for i, c in enumerate(comparisons)
            ]
    return Verification.of(label, tuple(comparisons), tolerance)


def _with_second_call(first: Verification, actual: object, expected: object) -> Verification:
    """``first`` (which passed) with the second call's outputs compared too; an output the first
    call's float64 re-check excused (ill-conditioned, or a jump of the original) is excused on
    the second call alike. Only second-call outputs that fail are listed."""
    mismatch = structure_mismatch(actual, expected)
    if mismatch is not None:
        problem = f"on a second call: {mismatch.reason}"
        return Verification.of(first.label, first.outputs, first.tolerance, problem, calls=2)
    paths, got, want = _tensor_leaves(actual, expected)
    extra = []
    for before, path, a, e in zip(first.outputs, paths, got, want, strict=True):
        again = compare_output(f"{path} (second call)", a, e)
        excused = before.verdict in (ILL_CONDITIONED, DISCONTINUOUS) and _recheckable(again)
        if again.verdict != OK and not excused:
            extra.append(again)
    return Verification.of(first.label, (*first.outputs, *extra), first.tolerance, calls=2)


def verify_redrawn(
    model: nn.Module,
    inputs: tuple,
    fold_copy: Callable[[nn.Module], nn.Module],
    refold: Refold | None = None,
    seed: int = VERIFICATION_SEED,
) -> Verification:
    """Re-draw the foldable parameters of a copy of ``model`` (``repfx.proof.redraw``), fold it with
    ``fold_copy`` (the same fold, without verification) and verify that fold against the copy;
    :class:`ExampleInputError` when the copy itself no longer runs on ``inputs``.
    The copy shares the storage of every parameter it does not re-draw with ``model``
    (``repfx.proof.sharing``)."""
    redrawn, shared = share_parameters(model)
    shared.release(redrawn, only=foldable_tensors(redrawn))
    redrawn = redraw_foldable_parameters_(redrawn, seed)
    folded = fold_copy(redrawn)
    try:
        return verify(redrawn, folded, inputs, refold, label=REDRAWN)
    except Exception as exc:
        try:  # is it the re-drawn model that fails, or its fold?
            run_sharing(redrawn, inputs)
        except Exception as own:
            raise ExampleInputError(
                f"with its foldable parameters re-drawn the model does not run on the example "
                f"inputs ({one_line(own)})"
            ) from own
        raise exc


def float64_inputs(inputs: tuple) -> tuple:
    """``inputs`` with every floating tensor converted to float64 (for ``refold``), also
    inside lists, tuples and dicts (a detector's list of images)."""
    return tuple(tree_map(_to_float64, x) for x in inputs)


# ------------------------------------------------------------------ structure and outputs


def structure_mismatch(actual: object, expected: object) -> Fail | None:
    """Why two output structures cannot be compared tensor by tensor (``None``: they can)."""
    got, got_spec = tree_flatten(actual)
    want, want_spec = tree_flatten(expected)
    if len(got) != len(want):
        return Fail(f"the fold returns {len(got)} output leaves, the original {len(want)}")
    if got_spec != want_spec:
        return Fail(f"output structure {got_spec} differs from the original's {want_spec}")
    for (path, e), a in zip(tree_flatten_with_path(expected)[0], got, strict=True):
        if isinstance(a, torch.Tensor) != isinstance(e, torch.Tensor):
            return Fail(f"output {_name(path)} is {type(a).__name__}, expected {type(e).__name__}")
        if not isinstance(e, torch.Tensor) and not _same_value(a, e):
            return Fail(f"output {_name(path)} is {a!r}, expected {e!r}")
    return None


def compare_output(path: str, actual: torch.Tensor, expected: torch.Tensor) -> OutputComparison:
    """One output tensor against its original, on its own scale (no float64 re-check)."""
    dtype = str(expected.dtype).removeprefix("torch.")
    tolerance = tolerance_for(expected.dtype)
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        got = f"{tuple(actual.shape)} {str(actual.dtype).removeprefix('torch.')}"
        problem = f"the fold's output is {got}, expected {tuple(expected.shape)} {dtype}"
        return OutputComparison(path, dtype, None, None, tolerance, FAILED, problem)
    err = tensor_error(actual, expected)
    if err.nonfinite_mismatches:
        problem = f"NaN / Inf differ from the original's at {err.nonfinite_mismatches} positions"
    elif err.rel_error > tolerance:
        problem = f"relative error {err.rel_error:.3g} > tolerance {tolerance:.1g}"
    else:
        problem = ""
    verdict = FAILED if problem else OK
    return OutputComparison(
        path, dtype, err.abs_error, err.rel_error, tolerance, verdict, problem,
        err.nonfinite_mismatches, scale=err.scale,
    )  # fmt: skip


def _recheckable(c: OutputComparison) -> bool:
    """An output that only missed its tolerance (rounding or a jump of the original may
    explain it): a floating one, or an exact one (integers, booleans: indices, labels, masks)
    that differs, with the same shape."""
    return c.verdict == FAILED and c.rel_error is not None and c.nonfinite_mismatches == 0


def _tensor_leaves(
    actual: object, expected: object
) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    """Paths, actual and expected tensors of two outputs of the same structure."""
    pairs = zip(tree_flatten_with_path(expected)[0], tree_flatten(actual)[0], strict=True)
    kept = [(_name(path), a, e) for (path, e), a in pairs if isinstance(e, torch.Tensor)]
    return [p for p, _, _ in kept], [a for _, a, _ in kept], [e for _, _, e in kept]


def _name(path: tuple) -> str:
    return keystr(path) or "output"


def _same_value(a: object, b: object) -> bool:
    try:
        return bool(a == b)
    except Exception:  # an object whose == does not give a truth value
        return a is b


# ------------------------------------------------------------------ float64 re-check


class _Float64Recheck:
    """Float64 truth, the float64 fold and the stored fold run exactly, computed once and shared
    by every output re-checked; the float64 sensitivity only when an output needs it."""

    def __init__(
        self,
        model: nn.Module,
        folded: nn.Module,
        inputs: tuple,
        refold: Refold | None,
        actual: list[torch.Tensor],
        expected: list[torch.Tensor],
    ):
        self.actual, self.expected = actual, expected
        self.error: str | None = None
        self._sensitivity: list[float] | None = None
        self._deterministic: bool | None = None
        try:
            self._run_float64(model, folded, inputs, refold)
        except Exception as exc:  # the user's model may not run in float64
            self.error = one_line(exc)

    def _run_float64(
        self, model: nn.Module, folded: nn.Module, inputs: tuple, refold: Refold | None
    ) -> None:
        self.low_precision = refold is not None and any(
            e.is_floating_point() and e.dtype != torch.float64 for e in self.expected
        )
        self.inputs64 = float64_inputs(inputs)
        self.model64 = copy_model(model).double()
        self.truth = output_tensors(run(self.model64, self.inputs64))
        if not self.low_precision:  # a float64 model: the fold is its own float64 fold
            self.fold64, self.weights64 = self.actual, None
            return
        self.fold64 = output_tensors(run(refold(self.model64), self.inputs64))
        if len(self.fold64) != len(self.truth):
            raise ValueError(f"the float64 fold returns {len(self.fold64)} tensors")
        # the folded weights, as stored in the model's dtype, evaluated in float64: what storing
        # any fold (a hand-written one too) in that dtype costs
        self.weights64 = output_tensors(run(float64_copy(folded), self.inputs64))

    def judge(self, i: int, c: OutputComparison) -> OutputComparison:
        """``c`` (output ``i``, which missed its tolerance) re-judged against float64 truth."""
        if self.error is not None:
            problem = f"{c.problem}; the float64 re-check could not run ({self.error})"
            return _replace(c, FAILED, problem, None)
        if not self.expected[i].is_floating_point():
            return self._judge_exact(i, c)
        fold_error = _rel(self.fold64[i], self.truth[i])
        sensitivity, criterion = None, float64_criterion(0.0)
        if fold_error > criterion:
            sensitivity = self.sensitivity()[i]
            criterion = float64_criterion(sensitivity)
            if discontinuous(sensitivity) and self.deterministic():
                recheck = Float64Recheck(fold_error, criterion, sensitivity, discontinuous=True)
                return _replace(c, DISCONTINUOUS, c.problem, recheck)
        recheck = Float64Recheck(fold_error, criterion, sensitivity)
        if self.weights64 is not None:
            recheck = self._rounding(i, recheck)
        fail = _recheck_failure(recheck)
        if fail is None:
            return _replace(c, ILL_CONDITIONED, c.problem, recheck)
        return _replace(c, FAILED, f"{c.problem}; {fail.reason}", recheck)

    def _judge_exact(self, i: int, c: OutputComparison) -> OutputComparison:
        """An integer / boolean output (labels, indices, a mask) that differs: not verifiable
        where the original itself jumps — it moves under a 1-ulp perturbation, or the float64
        fold is exact and rounding (the original's own, or the fold's stored weights') flips
        it; otherwise the fold is wrong."""
        fold_error, sensitivity = _rel(self.fold64[i], self.truth[i]), self.sensitivity()[i]
        if sensitivity == 0 and fold_error > 0:
            # a tie the fold's rounding breaks may survive two random perturbations: try more
            extra = float64_sensitivity(
                self.model64, self.inputs64, self.truth, EXACT_SENSITIVITY_TRIALS, seed=1
            )
            sensitivity = extra[i]
        rounding_flips = self.weights64 is not None and (
            _rel(self.expected[i], self.truth[i]) > 0 or _rel(self.weights64[i], self.truth[i]) > 0
        )
        jumps = sensitivity > 0 or (fold_error == 0 and rounding_flips)
        if jumps and self.deterministic():
            criterion = float64_criterion(sensitivity)
            recheck = Float64Recheck(fold_error, criterion, sensitivity, discontinuous=True)
            return _replace(c, DISCONTINUOUS, c.problem, recheck)
        return c

    def _rounding(self, i: int, recheck: Float64Recheck) -> Float64Recheck:
        original = _rel(self.expected[i], self.truth[i])
        return Float64Recheck(
            recheck.fold_error,
            recheck.criterion,
            recheck.sensitivity,
            original_rounding=original,
            folded_rounding=_rel(self.actual[i], self.truth[i]),
            weight_rounding=_rel(self.weights64[i], self.truth[i]),
            rounding_criterion=rounding_criterion(original, self.expected[i].dtype),
        )

    def deterministic(self) -> bool:
        """Does the float64 original compute the same outputs when run again? (A model with
        state that changes on every call moves under any perturbation — and without one.)"""
        if self._deterministic is None:
            again = output_tensors(run(copy_model(self.model64), self.inputs64))
            self._deterministic = len(again) == len(self.truth) and all(
                a.shape == t.shape and bool(((a == t) | (a.isnan() & t.isnan())).all())
                for a, t in zip(again, self.truth, strict=True)
            )
        return self._deterministic

    def sensitivity(self) -> list[float]:
        if self._sensitivity is None:
            self._sensitivity = float64_sensitivity(self.model64, self.inputs64, self.truth)
        return self._sensitivity


# Assertions of the dtypes a graph was captured in (torch.export records one before each
# cast): they would stop a float64 copy of the graph from running.
_DTYPE_ASSERTIONS = (torch._assert_tensor_metadata, torch.ops.aten._assert_tensor_metadata.default)


def float64_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with its floating tensors in float64; in a graph module, without the
    assertions of the dtypes it was captured in (the casts the graph holds stay: where the model
    casts to its own dtype, so does the copy)."""
    copy64 = copy_model(module).double()
    for gm in copy64.modules():
        if not isinstance(gm, fx.GraphModule):
            continue
        asserted = [
            n
            for n in gm.graph.nodes
            if n.op == "call_function" and n.target in _DTYPE_ASSERTIONS and not n.users
        ]
        for node in asserted:
            gm.graph.erase_node(node)
        if asserted:
            gm.recompile()
    return copy64


def _recheck_failure(r: Float64Recheck) -> Fail | None:
    """Why a float64 re-check fails (``None``: it passes)."""
    if not r.fold_error <= r.criterion:
        return Fail(
            f"the float64 fold is off by {r.fold_error:.3g} > {r.criterion:.3g}: not a fold"
        )
    if r.weight_rounding is not None and not r.weight_rounding <= r.rounding_criterion:
        return Fail(
            f"its stored weights, run in float64, are off float64 truth by "
            f"{r.weight_rounding:.3g} > {r.rounding_criterion:.3g} (the original's own rounding "
            f"{r.original_rounding:.3g} does not explain it)"
        )
    return None


def float64_sensitivity(
    model64: nn.Module,
    inputs64: tuple,
    truth: list[torch.Tensor],
    trials: int = SENSITIVITY_TRIALS,
    seed: int = 0,
) -> list[float]:
    """Per output: the largest relative move of ``model64``'s output (vs ``truth``, its output
    on ``inputs64``) over ``trials`` copies whose floating parameters and buffers are each
    multiplied by ``1 ± SENSITIVITY_PERTURBATION`` (random signs, seeded)."""
    generator = torch.Generator().manual_seed(seed)
    worst = [0.0] * len(truth)
    for _ in range(trials):
        perturbed = _perturb_(copy_model(model64), generator)
        moved = output_tensors(run(perturbed, inputs64))
        for i, (m, t) in enumerate(zip(moved, truth, strict=True)):
            worst[i] = max(worst[i], _rel(m, t))
    return worst


def _perturb_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                signs = torch.randint(0, 2, tensor.shape, generator=generator).to(tensor.dtype)
                tensor.mul_(1 + SENSITIVITY_PERTURBATION * (2 * signs - 1))
    return model


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.shape != expected.shape:
        return float("inf")
    return tensor_error(actual, expected).rel_or_inf


def _replace(
    c: OutputComparison, verdict: str, problem: str, recheck: Float64Recheck | None
) -> OutputComparison:
    return OutputComparison(
        c.path, c.dtype, c.abs_error, c.rel_error, c.tolerance, verdict,
        "" if verdict in (ILL_CONDITIONED, DISCONTINUOUS) else problem, c.nonfinite_mismatches,
        recheck, c.scale,
    )  # fmt: skip


# ------------------------------------------------------------------ running


def _to_float64(x: object) -> object:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.double()
    return x
