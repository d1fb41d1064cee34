"""The fuzz oracle: what ``repfx.fold`` may do with a model, and what it must not.

Acceptable outcomes: a fold; a refusal (the ops stay); an error class that ``repfx`` exports
(``CaptureError``, ``ExampleInputError``, …); a ``VerificationError`` (repfx's verifier caught a
wrong fold: acceptable, but counted).

Failures, all checked here independently of repfx's own verifier:

* any other exception escaping ``repfx.fold`` (``KeyError``, ``RuntimeError``, repfx internals);
* ``repfx.fold`` changing the model (tensors, their identity, modules, modes, hooks) or its
  example inputs;
* the folded model raising where the original runs, or computing something else on a *fresh*
  input (another batch size, other values). Each output tensor is compared against its own
  scale (a ``1e6·a`` output must not hide an error in ``b``): equal shape and dtype, NaN and
  ±inf in the same places, and relative error within ``repfx.proof.tolerances`` for its dtype — or,
  in a low precision, within what rounding explains: the folded model (its weights evaluated
  in float64, or, where its graph runs only in its own precision, run in it) must be within
  ``ROUNDING_SLACK`` × the original's own rounding error of float64 truth, or
  × how far the float64 original moves when its own weights are re-rounded to that precision
  (a threshold after a float16 computation — a floor division — jumps under any fold); a
  low-precision model whose output passes a threshold or a pole is judged in float64 only
  (``ill_conditioned``); a random model's float64 runs replay its draws (``RandomDraws``);
* the float64 copy of the model folding to anything but the same function (float64
  tolerance; behind a pole, within ``repfx.proof.tolerances.float64_criterion`` of the output's
  conditioning measured here, never above ``FLOAT64_CRITERION_CEILING``): folds must be
  exact in exact arithmetic;
* the folded model mutating an input that the original leaves alone, or mutating it
  differently.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import repfx
from repfx.proof.tolerances import (
    ROUNDING_SLACK,
    SENSITIVITY_PERTURBATION,
    float64_criterion,
    tolerance_for,
)

PUBLIC_ERRORS: tuple[type[Exception], ...] = tuple(
    obj for obj in vars(repfx).values() if isinstance(obj, type) and issubclass(obj, Exception)
)


class FoldFailure(AssertionError):
    """A failure of one kind (a subclass per kind, so that Hypothesis reports distinct kinds
    as distinct bugs)."""


FAILURE_KINDS: dict[str, type[FoldFailure]] = {
    kind: type(name, (FoldFailure,), {"__doc__": kind})
    for kind, name in [
        ("wrong output", "WrongOutput"),
        ("float64 fold not exact", "Float64NotExact"),
        ("folded model raises", "FoldedModelRaises"),
        ("input mutated", "InputMutated"),
        ("model changed by the fold", "ModelChanged"),
        ("fold shares a tensor with the model", "FoldSharesTensors"),
        ("example inputs changed by the fold", "ExampleInputsChanged"),
        ("compiled model differs", "CompiledDiffers"),
        ("compiled model stale", "CompiledStale"),
    ]
}


@dataclass
class Verdict:
    """``problems``: ``(kind, message)`` failures (kinds of :data:`FAILURE_KINDS`; the test
    asserts there are none); ``events``: outcomes to count (``hypothesis.event``)."""

    problems: list[tuple[str, str]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    def raise_first(self) -> None:
        """Raise the first problem as its kind's exception, listing all of them."""
        if self.problems:
            kind = self.problems[0][0]
            listing = "\n".join(f"  [{k}] {message}" for k, message in self.problems)
            raise FAILURE_KINDS[kind](f"{len(self.problems)} problem(s):\n{listing}")


# ---------------------------------------------------------------------------- folding


@dataclass
class Attempt:
    folded: nn.Module | None
    outcome: str


def attempt_fold(module: nn.Module, inputs: tuple, verify: bool = True) -> Attempt:
    """``repfx.fold(module, inputs)``; acceptable errors become an outcome, others propagate.
    A model with training-mode BatchNorm / dropout draws a ``TrainingModeWarning`` on purpose:
    it is expected here, and marked in the outcome."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", repfx.TrainingModeWarning)
        try:
            folded = repfx.fold(module, inputs, verify=verify)
        except repfx.VerificationError:
            return Attempt(None, "refused: VerificationError")
        except PUBLIC_ERRORS as exc:
            return Attempt(None, f"refused: {type(exc).__name__}")
    training = [w for w in caught if issubclass(w.category, repfx.TrainingModeWarning)]
    for w in caught:  # anything else goes on to the test run's own filters
        if w not in training:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    folds = folded.meta[repfx.REPORT_KEY].folded
    warned = " (training-mode warning)" if training else ""
    return Attempt(folded, ("folded" if folds else "nothing folded") + warned)


# ---------------------------------------------------------------------- the original


def snapshot(module: nn.Module) -> dict:
    state = module.state_dict(keep_vars=True)
    return {
        "tensors": {k: v.detach().clone() for k, v in state.items()},
        "ids": {k: id(v) for k, v in state.items()},
        "repr": repr(module),
        "training": [m.training for m in module.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in module.modules()],
    }


def changes(module: nn.Module, before: dict) -> list[str]:
    """How ``module`` differs from its :func:`snapshot` ``before``."""
    after = snapshot(module)
    found = [f"the model's {key} changed" for key in ("repr", "training", "hooks", "ids")
             if after[key] != before[key]]  # fmt: skip
    for name, value in before["tensors"].items():
        if name in after["tensors"] and not same(after["tensors"][name], value):
            found.append(f"the model's tensor {name} changed")
    return found


def shared_tensors(folded: nn.Module, module: nn.Module) -> list[str]:
    """The tensors of ``folded`` that live in a storage of ``module``'s (writing one would
    change the other)."""
    theirs = {_storage(t) for t in [*module.parameters(), *module.buffers()]} - {None}
    plain = [
        (f"{path}.{name}" if path else name, value)
        for path, m in folded.named_modules()
        for name, value in vars(m).items()
        if isinstance(value, torch.Tensor)
    ]
    tensors = [*folded.named_parameters(), *folded.named_buffers(), *plain]
    return [name for name, t in tensors if _storage(t) in theirs]


def _storage(t: torch.Tensor) -> tuple[str, int] | None:
    if t is None or t.numel() == 0 or t.device.type == "meta":
        return None
    return str(t.device), t.untyped_storage().data_ptr()


# ---------------------------------------------------------------------- comparisons


def same(a: object, b: object) -> bool:
    """Bitwise-equal tensors (NaN equal to NaN), or equal non-tensors."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return a == b
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |a − e| / max |e|`` over the finite entries of ``expected``; ``inf`` when NaN or
    ±inf are not in the same places (dtypes may differ: both are compared in float64)."""
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape or not torch.equal(a.isnan(), e.isnan()):
        return math.inf
    infinite = e.isinf()
    if not torch.equal(a.isinf(), infinite) or not torch.equal(a[infinite], e[infinite]):
        return math.inf
    finite = e.isfinite()
    if not bool(finite.any()):
        return 0.0
    diff = (a[finite] - e[finite]).abs().max().item()
    scale = e[finite].abs().max().item()
    return diff / scale if scale > 0 else diff


def mismatch(actual: object, expected: object) -> str | None:
    """Why ``actual`` is not ``expected`` within the tolerance of ``expected``'s dtype."""
    if not isinstance(expected, torch.Tensor):
        return None if actual == expected else f"{actual!r} instead of {expected!r}"
    if not isinstance(actual, torch.Tensor):
        return f"{type(actual).__name__} instead of a tensor"
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        got, want = (tuple(actual.shape), actual.dtype), (tuple(expected.shape), expected.dtype)
        return f"shape/dtype {got} instead of {want}"
    if not expected.is_floating_point():
        return None if torch.equal(actual, expected) else "integer values differ"
    error, tol = relative_error(actual, expected), tolerance_for(expected.dtype)
    if error <= tol:
        return None
    if math.isinf(error):
        return "NaN / inf in different places"
    return f"relative error {error:.3g} > {tol:.1g} (scale {expected.abs().max().item():.3g})"


# ------------------------------------------------------------------------- running


def clones(inputs: tuple) -> tuple:
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)


def to_double(inputs: tuple) -> tuple:
    return tuple(
        x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs
    )


def run(
    module: nn.Module, inputs: tuple, seed: int, mode: TorchDispatchMode | None = None
) -> tuple[object, tuple]:
    """``(module(*copies), copies)``, seeded, without grad (under ``mode`` if given); an
    exception is returned."""
    args = clones(inputs)
    with torch.no_grad(), torch.random.fork_rng(), mode or contextlib.nullcontext():
        torch.manual_seed(seed)
        try:
            out = module(*args)
        except Exception as exc:
            out = exc
    return out, args


def leaves(outputs: object) -> list:
    return tree_flatten(outputs)[0]


def rounding_excuses(original: nn.Module, folded: nn.Module, inputs: tuple, seed, index) -> bool:
    """Does low-precision rounding explain output ``index``'s error? The folded model — run
    in its own precision, or its weights run in float64 — must be as close to float64 truth
    as ``ROUNDING_SLACK`` × the original's own rounding error (as repfx's verifier argues, but
    per output). The folded graph may not run in float64 at all (a traced
    ``view(torch.int16)`` of a float16 value is baked for float16): its own-precision run
    then speaks for it. A random model's float64 runs replay the draws of its low-precision
    run (:class:`RandomDraws`); one whose draws cannot be replayed has no float64 truth and no
    excuse."""
    inputs64 = to_double(inputs)
    original64 = double_copy(original)
    if original64 is None:
        return False
    recorder = RandomDraws()
    expected = run(original, inputs, seed, recorder)[0]
    replay = RandomDraws(recorder.draws)
    truth = run(original64, inputs64, seed, replay)[0]
    if isinstance(expected, Exception) or isinstance(truth, Exception) or not replay.faithful():
        return False  # a model that cannot run in float64 has no float64 truth
    expected, truth = leaves(expected)[index], leaves(truth)[index]
    allowed = max(tolerance_for(expected.dtype), ROUNDING_SLACK * relative_error(expected, truth))
    errors = [
        error
        for module, args in ((folded, inputs), (double_copy(folded), inputs64))
        if (error := replayed_error(module, args, seed, recorder.draws, index, truth)) is not None
    ]
    if not errors:
        return False
    if min(errors) <= allowed:
        return True
    half_eps = torch.finfo(expected.dtype).eps / 2
    sensitivity = rounding_sensitivity(
        original64, inputs64, seed, index, half_eps, truth, recorder.draws
    )
    return min(errors) <= ROUNDING_SLACK * sensitivity


def replayed_error(module, inputs: tuple, seed, draws, index, truth) -> float | None:
    """Relative error of output ``index`` of ``module`` against ``truth``, replaying the
    recorded random ``draws``; None where it cannot be judged (no module, it raises, or the
    draws do not replay)."""
    if module is None:
        return None
    replay = RandomDraws(draws)
    out = run(module, inputs, seed, replay)[0]
    if isinstance(out, Exception) or not replay.faithful():
        return None
    return relative_error(leaves(out)[index], truth)


class RandomDraws(TorchDispatchMode):
    """Records the draws of a model's random ops (``nondeterministic_seeded`` ATen ops), or,
    given ``recorded`` draws, replays them — cast to the dtype of the run — so that a float64
    run of a random model draws the very numbers its float32 run drew (the generator draws
    other numbers in another dtype). A draw is what the op would return: its values for
    ``rand_like``/``bernoulli``/…, the tensor an in-place draw (``uniform_``) fills, the mask
    of a dropout (whose output is recomputed from this run's input)."""

    def __init__(self, recorded: list[torch.Tensor] | None = None):
        super().__init__()
        self.recording = recorded is None
        self.draws: list[torch.Tensor] = [] if recorded is None else list(recorded)
        self.replayed = 0
        self.mismatched = False

    def faithful(self) -> bool:
        """Did a replay use every recorded draw, each where a draw of its shape was made?"""
        return not self.mismatched and self.replayed == len(self.draws)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)  # (also when replaying: the generator advances alike)
        if torch.Tag.nondeterministic_seeded not in func.tags:
            return out
        target = self._target(func, args, kwargs, out)
        if self.recording:
            self.draws.append(target.detach().clone())
            return out
        if self.replayed >= len(self.draws) or self.draws[self.replayed].shape != target.shape:
            self.mismatched = True
            return out
        draw = self.draws[self.replayed]
        self.replayed += 1
        if func is torch.ops.aten.native_dropout.default:
            keep = draw.to(torch.bool)
            scale = 1.0 / (1.0 - args[1]) if args[1] < 1 else 0.0
            return args[0] * keep * scale, keep
        target.copy_(draw.to(target.dtype))
        return out

    def _target(self, func, args, kwargs, out) -> torch.Tensor:
        if func is torch.ops.aten.native_dropout.default:
            return out[1]  # the mask
        if func._schema.is_mutable:
            return kwargs["out"] if "out" in kwargs else args[0]
        if not isinstance(out, torch.Tensor):
            self.mismatched = True  # a random op of several outputs: not replayable
            return out[0]
        return out


# ATen ops whose output jumps where their input crosses a threshold.
_THRESHOLDS = {
    "gt", "lt", "ge", "le", "eq", "ne", "floor", "ceil", "round", "trunc", "sign", "remainder",
    "fmod", "floor_divide", "argmax", "argmin", "heaviside", "bucketize",
}  # fmt: skip
# ATen ops with a pole (unbounded amplification) where their input nears zero.
_POLES = {"reciprocal", "rsqrt", "log", "log2", "log10", "digamma", "tan"}
_DIVISIONS = {"div", "true_divide", "addcdiv"}


class _IllConditionedOps(TorchDispatchMode):
    """Collects the thresholds and poles a run passes: threshold ops, pole ops, divisions by
    a tensor that is not stored in the model (an activation, a computed value), negative
    powers of a tensor."""

    def __init__(self, stored: set[int]):
        super().__init__()
        self.stored = stored  # storage addresses of the model's parameters and buffers
        self.found: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name().split("::")[-1]
        base = name.split(".")[0]
        if base in _THRESHOLDS | _POLES or name in ("div.Tensor_mode", "div.Scalar_mode"):
            self.found.add(base)  # (a rounding-mode division is a floor or a truncation)
        elif base in _DIVISIONS and self._computed_divisor(args[-1 if base != "addcdiv" else 2]):
            self.found.add("division by a computed tensor")
        elif base == "pow" and self._negative_power(args):
            self.found.add("negative power")
        return func(*args, **(kwargs or {}))

    def _computed_divisor(self, divisor) -> bool:
        return (
            isinstance(divisor, torch.Tensor)
            and divisor.dim() > 0
            and divisor.untyped_storage().data_ptr() not in self.stored
        )

    @staticmethod
    def _negative_power(args) -> bool:
        exponent = args[1]
        if isinstance(exponent, torch.Tensor):
            return bool((exponent < 0).any())
        return isinstance(exponent, (int, float)) and exponent < 0


def ill_conditioned(original: nn.Module, inputs: tuple, seed: int) -> bool:
    """Does the model's output pass a threshold (a comparison, a floor, a rounding division,
    an argmax) or a pole (a division by an activation, a reciprocal, a logarithm)? In a low
    precision, the rounding a fold's stored weights differ by moves values across a
    threshold (the output jumps by a step) or is amplified without bound near a pole: such a
    model's fold is judged by its float64 copy — folded and compared with no rounding excuse
    in ``judge`` — which must exist (in float32 too: the same holds at a smaller
    scale)."""
    if double_copy(original) is None:
        return False
    stored = {t.untyped_storage().data_ptr() for t in [*original.parameters(), *original.buffers()]}
    mode = _IllConditionedOps(stored)
    with mode:
        run(original, inputs, seed)
    return bool(mode.found)


REROUNDING_TRIALS = 4


def rounding_sensitivity(
    original64: nn.Module, inputs64: tuple, seed: int, index: int, relative: float, truth, draws
) -> float:
    """How far output ``index`` of the float64 original moves from float64 truth when every
    floating parameter and buffer is re-rounded (multiplied by ``1 ± relative``, a random
    sign per element; ``eps/2`` of a dtype re-rounds to it) — which is all a fold's stored
    weights differ by. A model whose output jumps at a threshold (a floor division, a
    comparison) after a low-precision computation jumps under that as under any fold.
    ``draws``: the random draws to replay."""
    worst = 0.0
    for trial in range(REROUNDING_TRIALS):
        perturbed = copy.deepcopy(original64)
        gen = torch.Generator().manual_seed(trial)
        with torch.no_grad():
            for t in [*perturbed.parameters(), *perturbed.buffers()]:
                if t.is_floating_point():
                    sign = torch.randint(0, 2, t.shape, generator=gen).to(t.dtype) * 2 - 1
                    t.mul_(1 + relative * sign)
        replay = RandomDraws(draws)
        out = run(perturbed, inputs64, seed, replay)[0]
        if not isinstance(out, Exception) and replay.faithful():
            worst = max(worst, relative_error(leaves(out)[index], truth))
    return worst


def conditioning_excuses(
    original: nn.Module, folded: nn.Module, inputs: tuple, seed, index
) -> bool:
    """Does float64 conditioning explain output ``index``'s error, in a float64 model? Folded
    weights are re-rounded after a few float64 operations; an output behind a pole (``c / x``
    near ``x = 0``) amplifies that beyond the 1e-10 tolerance. Judged as repfx's verifier
    judges, but measured here: within ``float64_criterion(σ)``, σ the largest move of the
    output when every parameter and buffer of the original moves by one ulp
    (``SENSITIVITY_PERTURBATION``), which never exceeds ``FLOAT64_CRITERION_CEILING`` — an
    O(1) wrong fold fails however ill-conditioned the model."""
    recorder = RandomDraws()
    expected = run(original, inputs, seed, recorder)[0]
    if isinstance(expected, Exception):
        return False
    truth = leaves(expected)[index]
    error = replayed_error(folded, inputs, seed, recorder.draws, index, truth)
    if error is None:
        return False
    sensitivity = rounding_sensitivity(
        original, inputs, seed, index, SENSITIVITY_PERTURBATION, truth, recorder.draws
    )
    return error <= float64_criterion(sensitivity)


def output_problems(
    original: nn.Module, folded: nn.Module, inputs: tuple, seed: int
) -> list[tuple[str, str]]:
    """Compare ``folded`` with ``original`` on ``inputs``: each output, and the inputs after."""
    expected, inputs_e = run(original, inputs, seed)
    if isinstance(expected, Exception):
        return []  # nothing to compare with
    actual, inputs_a = run(folded, inputs, seed)
    if isinstance(actual, Exception):
        return [("folded model raises", f"{type(actual).__name__}: {str(actual)[:300]}")]
    got, want = leaves(actual), leaves(expected)
    if len(got) != len(want):
        return [("wrong output", f"{len(got)} outputs instead of {len(want)}")]
    problems = []
    low_precision = not (_is_float64(original) and all(_is_float64_value(x) for x in inputs))
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        reason = mismatch(a, e)  # (a float64 output may come from float32 arithmetic)
        if reason and "shape/dtype" not in reason and e.is_floating_point():
            if low_precision:
                excused = rounding_excuses(original, folded, inputs, seed, i) or ill_conditioned(
                    original, inputs, seed
                )
            else:
                excused = conditioning_excuses(original, folded, inputs, seed, i)
            reason = None if excused else reason
        if reason:
            problems.append(("wrong output", f"output {i} of {len(want)}: {reason}"))
    return problems + mutation_problems(inputs, inputs_e, inputs_a)


def mutation_problems(
    before: tuple, after_original: tuple, after_folded: tuple
) -> list[tuple[str, str]]:
    problems = []
    for i, (b, o, f) in enumerate(zip(before, after_original, after_folded, strict=True)):
        original_changed, folded_changed = not same(b, o), not same(b, f)
        if folded_changed and not original_changed:
            problems.append(("input mutated", f"input {i} mutated; the original leaves it"))
        elif folded_changed and mismatch(f, o):
            problems.append(("input mutated", f"input {i} mutated differently: {mismatch(f, o)}"))
    return problems


# --------------------------------------------------------------------------- judging


def judge_fold(
    module: nn.Module,
    example: tuple,
    fresh: tuple,
    seed: int,
    verdict: Verdict,
    exact: bool = False,
    verify: bool = True,
) -> None:
    """Fold ``module`` on ``example`` and judge the result on ``fresh``, into ``verdict``.

    ``exact``: a float64 model, whose wrong outputs are their own kind. ``verify=False``:
    fold without repfx's verifier (half the cost); a fold found wrong is folded again with
    it, and counts as refused if the verifier refuses it."""
    tag = "float64: " if exact else ""
    before, example_before = snapshot(module), clones(example)
    attempt = attempt_fold(module, example, verify)
    verdict.problems += [("model changed by the fold", tag + c) for c in changes(module, before)]
    if attempt.folded is not None and (shared := shared_tensors(attempt.folded, module)):
        verdict.problems.append(("fold shares a tensor with the model", tag + shared[0]))
    if not all(same(a, b) for a, b in zip(example, example_before, strict=True)):
        verdict.problems.append(("example inputs changed by the fold", tag + "changed"))
    problems = []
    if attempt.folded is not None:
        problems = output_problems(module, attempt.folded, fresh, seed)
    if problems and not verify:
        attempt = attempt_fold(module, clones(example_before))
        problems = problems if attempt.folded is not None else []
    verdict.events.append(tag + attempt.outcome)
    for kind, message in problems:
        kind = "float64 fold not exact" if exact and kind == "wrong output" else kind
        verdict.problems.append((kind, tag + message))


def judge(model, seed: int) -> Verdict:
    """Fold the model (as a user would: verified) and its float64 copy; judge both on a
    fresh input of another batch size."""
    verdict = Verdict()
    generator = torch.Generator().manual_seed(seed)
    example, fresh = model.inputs(generator), model.inputs(generator, batch=model.batch + 1)
    if _is_float64(model.module):
        judge_fold(model.module, example, fresh, seed, verdict, exact=True)
        return verdict
    model64 = double_copy(model.module)  # before the original ever runs
    judge_fold(model.module, example, fresh, seed, verdict)
    if model64 is None:
        verdict.events.append("float64: the model cannot be deep-copied")
        return verdict
    example64, fresh64 = to_double(example), to_double(fresh)
    judge_fold(model64, example64, fresh64, seed, verdict, exact=True, verify=False)
    return verdict


def _is_float64(module: nn.Module) -> bool:
    """Does ``module`` compute in float64 (all its floating tensors are)?"""
    return all(_is_float64_value(t) for t in [*module.parameters(), *module.buffers()])


def _is_float64_value(x: object) -> bool:
    return not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == torch.float64


def double_copy(module: nn.Module) -> nn.Module | None:
    """A float64 deep copy, or ``None`` for a model that cannot be copied (e.g. holding a
    non-leaf tensor attribute: repfx refuses it with a ``CaptureError``)."""
    try:
        return copy.deepcopy(module).double()
    except RuntimeError:
        return None


# -------------------------------------------------------------------- torch.compile


def _loss_weights(t: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)


def forward_backward(module: nn.Module, inputs: tuple, seed: int, grad: bool):
    """``(outputs, parameter gradients or None)`` of a seeded run (grads of a random linear
    functional of the outputs), or the exception it raised."""
    args = clones(inputs)
    params = [p for p in module.parameters() if p.requires_grad]
    with torch.random.fork_rng(), torch.set_grad_enabled(grad):
        torch.manual_seed(seed)
        try:
            out = module(*args)
            outs = [t for t in leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
            if not grad or not outs:
                return leaves(out), None
            loss = sum((t * _loss_weights(t, seed)).sum() for t in outs)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        except Exception as exc:
            return exc, None
    return [t.detach() if isinstance(t, torch.Tensor) else t for t in leaves(out)], list(grads)


def _gradient_scale(grads: list) -> float:
    """The largest finite gradient entry over all parameters: the scale of the loss's slope."""
    tensors = [g for g in grads if isinstance(g, torch.Tensor) and g.is_floating_point()]
    finite = [g[g.isfinite()].abs().max().item() for g in tensors if g.isfinite().any()]
    return max(finite, default=0.0)


def _gradient_mismatch(actual: torch.Tensor, expected: torch.Tensor, scale: float) -> str | None:
    """:func:`mismatch`, except that a gradient is judged on the scale of all the gradients
    (``scale``): one the loss does not depend on (a per-channel scale a GroupNorm divides out)
    is rounding noise, 1e-19 beside gradients of O(1), whose own relative error means nothing."""
    found = mismatch(actual, expected)
    if found is None or not expected.is_floating_point() or actual.shape != expected.shape:
        return found
    difference = (actual - expected).abs().max().item()
    if math.isfinite(difference) and difference <= tolerance_for(expected.dtype) * scale:
        return None
    return found


def _compare_compiled(expected, actual) -> list[str]:
    (out_e, grads_e), (out_a, grads_a) = expected, actual
    found = [f"output {i}: {m}" for i, (a, e) in enumerate(zip(out_a, out_e, strict=True))
             if (m := mismatch(a, e))]  # fmt: skip
    if len(out_a) != len(out_e):
        found.append(f"{len(out_a)} outputs instead of {len(out_e)}")
    scale = _gradient_scale(grads_e or [])
    for i, (a, e) in enumerate(zip(grads_a or [], grads_e or [], strict=True)):
        if (a is None) != (e is None) or (e is not None and _gradient_mismatch(a, e, scale)):
            found.append(f"gradient of parameter {i}: {None if a is None else mismatch(a, e)}")
    return found


def _compiled(module: nn.Module, backend) -> nn.Module:
    torch._dynamo.reset()
    return torch.compile(module, backend=backend)


def judge_compiled(model, seed: int) -> Verdict:
    """``torch.compile(model, backend=repfx)`` (eager inner backend) on the float64 copy,
    under ``no_grad`` and with grad enabled (trainable parameters): same outputs, same
    parameter gradients, parameters untouched. A compile error that plain dynamo (backend
    ``"eager"``) also raises is not repfx's."""
    verdict = Verdict()
    module = double_copy(model.module)
    if module is None:
        verdict.events.append("compile: the model cannot be deep-copied")
        return verdict
    inputs = to_double(model.inputs(torch.Generator().manual_seed(seed), batch=model.batch + 1))
    params = [p.detach().clone() for p in module.parameters()]
    for grad in (False, True):
        mode = "grad" if grad else "no_grad"
        # eager on a copy in the same state: a forward may write the model's own state (a BN
        # kept in training mode updates its statistics), so the two runs must start alike
        expected = forward_backward(copy.deepcopy(module), inputs, seed, grad)
        if isinstance(expected[0], Exception):
            verdict.events.append(f"compile ({mode}): eager raises")
            continue
        plain_copy = copy.deepcopy(module)
        actual = forward_backward(
            _compiled(module, repfx.compile_backend(inner="eager")), inputs, seed, grad
        )
        if isinstance(actual[0], Exception):
            plain = forward_backward(_compiled(plain_copy, "eager"), inputs, seed, grad)
            kind = "dynamo raises" if isinstance(plain[0], Exception) else "repfx backend raises"
            verdict.events.append(f"compile ({mode}): {kind}")
            if kind == "repfx backend raises":
                message = f"{type(actual[0]).__name__}: {str(actual[0])[:300]}"
                verdict.problems.append(("compiled model differs", f"{mode}: raises {message}"))
            continue
        verdict.events.append(f"compile ({mode}): ran")
        for message in _compare_compiled(expected, actual):
            verdict.problems.append(("compiled model differs", f"{mode}: {message}"))
    torch._dynamo.reset()
    if not all(same(p, q.detach()) for p, q in zip(params, module.parameters(), strict=True)):
        verdict.problems.append(("model changed by the fold", "compile changed a parameter"))
    return verdict


# What a user may change between two calls of a compiled model (a write through ``.data`` has
# a version counter of its own and is documented as unseen: not drawn).
CHANGES_AFTER_COMPILING = ("a parameter written in place", "load_state_dict", "a training step")


def _change(module: nn.Module, compiled: nn.Module, inputs: tuple, change: str, seed: int):
    with torch.no_grad():
        if change == "a parameter written in place":
            params = [p for p in module.parameters() if p.is_floating_point()]
            if params:
                params[seed % len(params)].mul_(1.5)
        elif change == "load_state_dict":
            state = module.state_dict()
            module.load_state_dict({k: v * 1.25 if v.is_floating_point() else v
                                    for k, v in state.items()})  # fmt: skip
        else:  # a compiled training step updates BatchNorm's running statistics
            module.train()
            compiled(*clones(inputs))
            module.eval()


def judge_compiled_after_changes(model, seed: int) -> Verdict:
    """Compile the float64 copy (``no_grad``), call it, change the model as a user may
    (:data:`CHANGES_AFTER_COMPILING`), call it again: the second call matches eager on the
    changed model — the backend refolds instead of running the folded constants stale."""
    verdict = Verdict()
    module = double_copy(model.module)
    if module is None:
        return verdict
    inputs = to_double(model.inputs(torch.Generator().manual_seed(seed), batch=model.batch + 1))
    change = CHANGES_AFTER_COMPILING[seed % len(CHANGES_AFTER_COMPILING)]
    compiled = _compiled(module, repfx.compile_backend(inner="eager"))
    first = forward_backward(compiled, inputs, seed, grad=False)
    if isinstance(first[0], Exception):
        verdict.events.append("compile, then change: the compiled model raises")
        torch._dynamo.reset()
        return verdict
    _change(module, compiled, inputs, change, seed)
    expected = forward_backward(copy.deepcopy(module), inputs, seed, grad=False)  # same state
    actual = forward_backward(compiled, inputs, seed, grad=False)
    torch._dynamo.reset()
    verdict.events.append(f"compile, then change: {change}")
    for message in _compare_compiled(expected, actual):
        verdict.problems.append(("compiled model stale", f"after {change}: {message}"))
    return verdict


# ------------------------------------------------------------ Python scalars under export


class WithScalar(nn.Module):
    """``model(x) · s + s`` for a Python float ``s``: torch.export fixes ``s`` to the example's
    value, and a fold may then fold it into a conv."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor, s: float) -> object:
        return tree_map(lambda t: t * s + s, self.module(x))


def judge_python_scalar(model, seed: int) -> Verdict:
    """Fold ``WithScalar(model)`` with ``capture="export"`` on ``s = 2.0``, call it with
    ``s = 2.0`` and ``s = -0.5``: the same outputs as the original, or a ``repfx.GuardError``
    naming the value the capture fixed — never a raw ``AssertionError`` or a stale value.
    Judged as every fold (:func:`output_problems`); where that excuses an ill-conditioned
    low-precision model, its float64 copy is folded and judged too."""
    verdict = Verdict()
    module = WithScalar(model.module).eval()
    module64 = double_copy(module)  # before the original ever runs
    generator = torch.Generator().manual_seed(seed)
    (example,), (fresh,) = model.inputs(generator), model.inputs(generator)
    _judge_scalar_fold(module, example, fresh, seed, verdict, "")
    low_precision = not _is_float64(module)
    if module64 is not None and low_precision and ill_conditioned(module, (fresh, 2.0), seed):
        (example64,), (fresh64,) = to_double((example,)), to_double((fresh,))
        _judge_scalar_fold(module64, example64, fresh64, seed, verdict, "float64: ")
    return verdict


def _judge_scalar_fold(
    module: nn.Module, example, fresh, seed: int, verdict: Verdict, label: str
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", repfx.TrainingModeWarning)
        try:
            folded = repfx.fold(module, (example, 2.0), capture="export", verify=not label)
        except PUBLIC_ERRORS as exc:
            verdict.events.append(f"{label}python scalar: refused: {type(exc).__name__}")
            return
    for s in (2.0, -0.5):
        actual, _ = run(folded, (fresh, s), seed)
        if isinstance(actual, repfx.GuardError) and s != 2.0:
            verdict.events.append(f"{label}python scalar: guard raised for another value")
            continue
        for kind, text in output_problems(module, folded, (fresh, s), seed):
            verdict.problems.append((kind, f"{label}s = {s}: {text}"))
    verdict.events.append(f"{label}python scalar: folded")


# ------------------------------------------------------------------- unbatched inputs


def judge_unbatched(model, seed: int) -> Verdict:
    """Fold without example inputs (which assumes batched conv / norm inputs), then call the
    folded module on one item with the batch axis dropped: where the original runs on it, the
    folded module matches it or raises :class:`repfx.GuardError` (a rank it assumed)."""
    verdict = Verdict()
    generator = torch.Generator().manual_seed(seed)
    (x,) = model.inputs(generator, batch=1)
    item = (x[0],)
    expected, _ = run(model.module, item, seed)
    if isinstance(expected, Exception):
        verdict.events.append("unbatched: the model does not run on one item")
        return verdict
    attempt = attempt_fold(model.module, None, verify=False)
    verdict.events.append(f"unbatched: {attempt.outcome}")
    if attempt.folded is None:
        return verdict
    actual, _ = run(attempt.folded, item, seed)
    if isinstance(actual, repfx.GuardError):
        verdict.events.append("unbatched: guard raised")
        return verdict
    if isinstance(actual, Exception):
        verdict.problems.append(("folded model raises", f"on one item: {actual!r}"))
        return verdict
    got, want = leaves(actual), leaves(expected)
    if len(got) != len(want):
        verdict.problems.append(("wrong output", f"{len(got)} outputs instead of {len(want)}"))
        return verdict
    for index, (a, e) in enumerate(zip(got, want, strict=True)):
        problem = mismatch(a, e)
        if problem and not rounding_excuses(model.module, attempt.folded, item, seed, index):
            verdict.problems.append(
                ("wrong output", f"output {index} on one item, without example inputs: {problem}")
            )
    return verdict


def judge_unverified(model, seed: int) -> Verdict:
    """Fold without example inputs (so without verification: the commit point alone decides)
    and judge the result on a fresh input. Here nothing stands between a rewrite the commit
    point wrongly accepts and the folded model."""
    verdict = Verdict()
    (fresh,) = model.inputs(torch.Generator().manual_seed(seed), batch=model.batch + 1)
    attempt = attempt_fold(model.module, None, verify=False)
    verdict.events.append(f"without example inputs: {attempt.outcome}")
    if attempt.folded is not None:
        problems = output_problems(model.module, attempt.folded, (fresh,), seed)
        verdict.problems += [(k, f"without example inputs: {text}") for k, text in problems]
    return verdict


# ------------------------------------------------------------ state written in forward


def judge_calls(model, seed: int, calls: int = 3) -> Verdict:
    """Fold (verified, on example inputs), then call the original and the folded model in
    turn on ``calls`` fresh inputs. A model that writes its own tensors in forward must match
    on every call, each pair starting from the same state: a fold that folded the values of
    one call, or a folded module that starts from a state the capture advanced, is wrong from
    some call on."""
    verdict = Verdict()
    generator = torch.Generator().manual_seed(seed)
    example = model.inputs(generator)
    before = snapshot(model.module)
    attempt = attempt_fold(model.module, example)
    verdict.problems += [("model changed by the fold", c) for c in changes(model.module, before)]
    verdict.events.append(f"calls: {attempt.outcome}")
    if attempt.folded is None:
        return verdict
    for call in range(calls):
        fresh = model.inputs(generator, batch=model.batch + call % 2)
        problems = output_problems(model.module, attempt.folded, fresh, seed)
        if problems:  # (the states may differ from here on: stop)
            verdict.problems += [(kind, f"call {call + 1}: {text}") for kind, text in problems]
            break
    return verdict
