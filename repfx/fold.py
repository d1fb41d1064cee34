"""``repfx.fold``: capture → passes to a fixpoint → (verify) → a folded ``GraphModule``."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from .capture import (
    AS_IS,
    CAPTURE_MODES,
    CaptureError,
    ExampleInputError,
    capture_with_shapes,
    export_program,
    insert_rank_guards,
    keep_when_pickled,
    rank_guards,
    record_child_inputs,
    release_what_runs_may_write,
    rename_rank_guards,
)
from .capture.reuse import CapturedGraph
from .errors import Error, TrainingModeError, one_line
from .fold_inside import OpaqueModule, fold_inside
from .ir.graph import annotate_ranks, forget_annotations
from .passes import FoldNormAffine, default_pipeline, run_to_fixpoint
from .passes.base import Pass, rule_words
from .passes.rewrite import delete_unused_attributes
from .proof.inputs import as_inputs
from .proof.sharing import SharedParameters, share_parameters
from .proof.verify import float64_inputs
from .proof.verify import verify as run_verification
from .proof.verify import verify_redrawn as run_redrawn_verification
from .report.fold_report import Folded, FoldReport, GraphStats, Skipped, Verification
from .report.progress import FoldProgress
from .report.sketch import GraphSketch

REPORT_KEY = "repfx_report"


class VerificationError(Error, AssertionError):
    """The folded model does not match the original on the example inputs (as given, or with
    its foldable parameters re-drawn); ``report.failed_verification()`` says which."""

    def __init__(self, report: FoldReport):
        failed = report.failed_verification()
        super().__init__(
            f"folded model differs from the original: {failed.summary()}. This is a repfx "
            "bug; please report it with the model. Pass verify=False to get the folded model "
            f"anyway.\n{report}"
        )
        self.report = report


class TrainingModeWarning(UserWarning):
    """``repfx.fold`` of a model in training mode: little or nothing can fold."""


_TRAINING_DEPENDENT = (_BatchNorm, _DropoutNd)


def _check_mode(model: nn.Module, strict: bool) -> None:
    """Warn (or raise, ``strict``) when BatchNorm / dropout modules are in training mode."""
    training = [
        name or type(model).__name__
        for name, m in model.named_modules()
        if m.training and isinstance(m, _TRAINING_DEPENDENT)
    ]
    if not training:
        return
    message = (
        f"{len(training)} BatchNorm / dropout module(s) are in training mode (e.g. "
        f"{training[0]!r}): they compute batch statistics or random masks, which no fold "
        "keeps, so they are left unfolded. Call model.eval() before repfx.fold."
    )
    if strict:
        raise TrainingModeError(message)
    warnings.warn(message, TrainingModeWarning, stacklevel=3)


def fold(
    model: nn.Module | torch.export.ExportedProgram,
    example_inputs: torch.Tensor | Sequence[object] | None = None,
    *,
    verify: bool = True,
    verify_redrawn: bool = True,
    passes: Sequence[Pass] | None = None,
    strict: bool = False,
    capture: str = "auto",
    fold_norm_affine: bool = False,
    progress: bool | None = None,
) -> fx.GraphModule | torch.export.ExportedProgram:
    """Fold ``model`` into an equivalent, cheaper ``torch.fx.GraphModule``.

    ``model`` is never modified. With ``example_inputs`` (a tensor or a tuple of positional
    inputs) shapes are propagated, enabling folds whose exactness depends on ranks, and with
    ``verify=True`` the result is checked against the original on those inputs
    (:class:`VerificationError` if it differs beyond ``repfx.proof.tolerances``); with
    ``verify_redrawn`` too, a copy whose foldable parameters are re-drawn at O(1)
    (``repfx.proof.redraw``) is folded the same way and checked as well (unless no fold read
    a parameter or buffer: then re-drawn values cannot differ, and the report says so). Without
    them,
    repfx assumes conv / batch-norm inputs are batched. The report is at
    ``folded.meta["repfx_report"]``.

    A model in training mode folds almost nothing (training-mode BatchNorm and dropout are
    kept as they are): repfx warns (:class:`TrainingModeWarning`), or with ``strict=True``
    raises :class:`~repfx.errors.TrainingModeError`. Call ``model.eval()`` first.

    ``capture``: how the model becomes a graph. ``"fx"``: ``torch.fx`` symbolic tracing
    (submodules it cannot trace run as they are, and repfx folds inside them); ``"export"``:
    ``torch.export`` (non-strict; needs example inputs; the folded module takes any batch size,
    any size of integer and boolean inputs such as token ids, and the example inputs' other
    dimensions); ``"auto"`` (default): ``torch.fx``, and
    ``torch.export`` when ``torch.fx`` cannot trace the top-level ``forward`` (or, with example
    inputs, runs a submodule opaque), and, when neither can, the model's children, each
    captured on its own (``repfx.capture.frontend``).

    ``fold_norm_affine=True`` also moves each LayerNorm's / GroupNorm's own ``γ, β`` into the
    linears or convs that read it, when all of them can take it, leaving affine-free norms
    (``repfx.passes.fold_norm_affine``; the "fuse layer norms" step before rotation-based
    quantization). Off by default: it removes no op, and bias-free linears may gain a bias.

    ``progress``: the phase the fold is in (capture, fold, verify) on stderr — ``None``
    (default): a bar when stderr is a terminal and the fold takes more than two seconds;
    ``True``: always (plain lines off a terminal); ``False``: never (``repfx.report.progress``).

    ``model`` may be a ``torch.export.ExportedProgram``: it is folded on its own example
    inputs (or ``example_inputs``) and the result is an ``ExportedProgram`` again (what
    ``torch.export.save``, AOTInductor and the ONNX exporter take), its report at
    ``program.graph_module.meta["repfx_report"]``.
    """
    if fold_norm_affine:
        passes = [*(default_pipeline() if passes is None else passes), FoldNormAffine()]
    if isinstance(model, torch.export.ExportedProgram):
        return _fold_program(
            model, example_inputs, verify, verify_redrawn, passes, strict, progress
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"repfx.fold expects an nn.Module, not {type(model).__name__}")
    if capture not in CAPTURE_MODES:
        raise ValueError(f"capture must be one of {', '.join(CAPTURE_MODES)}, not {capture!r}")
    _check_mode(model, strict)
    shown = _progress(progress, verify and example_inputs is not None)
    try:
        return _fold(model, example_inputs, verify, verify_redrawn, passes, capture, shown=shown)
    finally:
        shown.close()


def _progress(mode: bool | None, verified: bool) -> FoldProgress:
    """The progress display of one fold: capture and fold, then (verified) the verification as
    given and the fold and verification of the re-drawn copy."""
    return FoldProgress(mode, phases=5 if verified else 2)


def _fold_program(
    program: torch.export.ExportedProgram,
    example_inputs: torch.Tensor | Sequence[object] | None,
    verify: bool,
    verify_redrawn: bool,
    passes: Sequence[Pass] | None,
    strict: bool,
    progress: bool | None,
) -> torch.export.ExportedProgram:
    inputs = as_inputs(example_inputs)
    if inputs is None:
        args, kwargs = program.example_inputs or ((), {})
        if kwargs or not args:
            raise ExampleInputError(
                "the exported program holds no positional example inputs: pass them, "
                "repfx.fold(program, inputs)"
            )
        inputs = tuple(args)
    module = program.module()
    _check_mode(module, strict)
    shown = _progress(progress, verify)
    try:
        folded = _fold(module, inputs, verify, verify_redrawn, passes, "export", shown=shown)
    finally:
        shown.close()
    result = export_program(folded, inputs)
    result.graph_module.meta[REPORT_KEY] = folded.meta[REPORT_KEY]
    return result


def _fold(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[object] | None,
    verify: bool = True,
    verify_redrawn: bool = True,
    passes: Sequence[Pass] | None = None,
    capture: str = "auto",
    handed_back: bool = True,
    shown: FoldProgress | None = None,
    proven: frozenset[tuple[str, str]] = frozenset(),
    captured: CapturedGraph | None = None,
) -> fx.GraphModule:
    """The fold of ``model``; ``handed_back=False`` for a fold only verification reads (of
    repfx's own copies), which may keep sharing their parameters' storage. ``shown``: where
    the phases are shown (the fold the user asked for; none for the verification's folds).
    ``proven``: rewrites another fold of this model proved (the float64 re-check's refold).
    ``captured``: the graph of another copy of this model, bound to this one's tensors instead
    of capturing it again (the re-drawn copy's fold; ``repfx.capture.reuse``)."""
    inputs = as_inputs(example_inputs)
    passes = default_pipeline() if passes is None else passes
    report = FoldReport(rule_words=rule_words(passes))
    if shown is not None:
        shown.start("capture")
    work, shared = share_parameters(model)
    if captured is None:
        gm, opaque = capture_with_shapes(work, inputs, capture, report, shared)
    else:
        gm, opaque = captured.bound_to(work), dict(captured.opaque)
        release_what_runs_may_write(gm, opaque, shared)
    kept = None
    if verify and verify_redrawn and inputs is not None:
        kept = CapturedGraph.keep(gm, opaque, work)
    gm = _fold_captured(gm, opaque, work, inputs, passes, report, "", capture, shown, proven)
    gm.training = model.training
    keep_when_pickled(gm)  # (torch.save keeps its output types and input checks)
    if verify and inputs is not None:
        _verify(model, gm, inputs, report, verify_redrawn, passes, capture, shown, kept)
    elif verify:
        report.notes.append("nothing was verified: verify=True needs example inputs")
    gm.meta[REPORT_KEY] = report
    if report.failed_verification() is not None:
        raise VerificationError(report)
    if handed_back:  # the user's model and the fold never share a tensor
        shared.release(gm)
    return gm


def _verify(
    model: nn.Module,
    gm: fx.GraphModule,
    inputs: tuple,
    report: FoldReport,
    verify_redrawn: bool,
    passes: Sequence[Pass],
    capture: str,
    shown: FoldProgress | None,
    captured: CapturedGraph | None = None,
) -> None:
    """Verify ``gm`` against ``model`` on ``inputs`` (as given, and re-drawn unless no fold read
    a parameter), into ``report``. ``captured``: the graph ``gm`` was folded from, for the
    re-drawn copy's fold to bind instead of capturing that copy again."""
    folds = _VerificationFolds(inputs, passes, capture, shown, _proven(report.folded), captured)
    redrawn_too = verify_redrawn and any(f.reads_state for f in report.folded)
    if shown is not None:
        shown.expect(5 if redrawn_too else 3)
    folds.enter("verify")
    report.verification = run_verification(model, gm, inputs, folds.float64(report.folded))
    if not verify_redrawn:
        report.notes.append("verified with the parameters as given only (verify_redrawn=False)")
    elif not redrawn_too:
        report.notes.append(
            "verified with the parameters as given only: no fold read a parameter or "
            "buffer (each replaced parameter-free ops, proven on random values), so "
            "re-drawn parameters could not show a difference"
        )
    else:
        try:
            report.redrawn_verification = folds.verify_redrawn(model)
        except ExampleInputError as exc:  # the model ran as given: the re-draw broke it
            cause = one_line(exc.__cause__) if exc.__cause__ else "unknown error"
            report.notes.append(
                "verified with the parameters as given only: with its per-channel "
                "parameters re-drawn at O(1) the model no longer runs on the example "
                f"inputs ({cause}); it may read a parameter as something other than a "
                "weight (a probability, a size)"
            )


def _proven(folds: list[Folded]) -> frozenset[tuple[str, str]]:
    """The (rule, location) pairs of ``folds``, for a fold that repeats them."""
    return frozenset((f.rule, f.where) for f in folds)


@dataclass
class _VerificationFolds:
    """The folds verification makes besides the one it checks, none of them handed back, each
    repeating the proven rewrites of the fold it checks without proving them again
    (``PipelineState.proven``; any other rewrite it finds is proven as usual):

    - the fold of the copy with re-drawn parameters repeats the fold handed back (``given``):
      the re-drawn verification then judges *those* rewrites on O(1) values, end to end (a
      rewrite proven only because the given values hid a difference fails it, rather than being
      refused in the re-drawn fold alone);
    - the float64 fold of a float64 copy that re-checks a fold (an output missed its
      tolerance) repeats the re-checked fold."""

    inputs: tuple
    passes: Sequence[Pass]
    capture: str
    shown: FoldProgress | None
    given: frozenset[tuple[str, str]]  # the rewrites of the fold handed back
    captured: CapturedGraph | None = None  # the graph the fold handed back was folded from
    redrawn_folds: list[Folded] = field(default_factory=list)  # the re-drawn copy's

    def verify_redrawn(self, model: nn.Module) -> Verification:
        """The re-drawn verification, its fold binding the kept capture to the re-drawn copy;
        where that fails or does not run, again with the copy captured afresh (a capture may
        hold what its trace computed from the values it saw: ``repfx.capture.reuse``), which
        alone counts."""
        try:
            check = run_redrawn_verification(model, self.inputs, self.redrawn, self.redrawn_float64)
        except ExampleInputError:  # the re-drawn model itself does not run: no capture helps
            raise
        except Exception:  # the bound graph does not run
            if self.captured is None:
                raise
            check = None
        if self.captured is None or (check is not None and check.passed):
            return check
        self.captured = None
        self.redrawn_folds.clear()
        return run_redrawn_verification(model, self.inputs, self.redrawn, self.redrawn_float64)

    def enter(self, phase: str) -> None:
        if self.shown is not None:
            self.shown.start(phase)

    def float64(self, folds: list[Folded]) -> Callable[[nn.Module], nn.Module]:
        """The float64 fold that re-checks the fold ``folds`` records."""
        proven = _proven(folds)

        def refold(model64: nn.Module) -> nn.Module:
            self.enter("float64 re-check")
            inputs64 = float64_inputs(self.inputs)
            return self._fold(model64, inputs64, proven)

        return refold

    def redrawn(self, model: nn.Module) -> nn.Module:
        self.enter("fold, re-drawn parameters")
        folded = self._fold(model, self.inputs, self.given, self.captured)
        self.redrawn_folds.extend(folded.meta[REPORT_KEY].folded)
        self.enter("verify, re-drawn parameters")
        return folded

    def redrawn_float64(self, model64: nn.Module) -> nn.Module:
        return self.float64(self.redrawn_folds)(model64)

    def _fold(
        self,
        model: nn.Module,
        inputs: tuple,
        proven: frozenset,
        captured: CapturedGraph | None = None,
    ) -> nn.Module:
        return _fold(model, inputs, False, passes=self.passes, capture=self.capture,
                     handed_back=False, proven=proven, captured=captured)  # fmt: skip


def _fold_copy(
    work: nn.Module,
    inputs: tuple | None,
    passes: Sequence[Pass],
    report: FoldReport,
    prefix: str,
    capture: str = "fx",
    shared: SharedParameters | None = None,
    shown: FoldProgress | None = None,
    proven: frozenset[tuple[str, str]] = frozenset(),
) -> fx.GraphModule:
    """Fold ``work`` (repfx's own copy, changed freely, except in place where its parameters
    are ``shared``) and record into ``report``; ``proven``: see :func:`_fold`."""
    gm, opaque = capture_with_shapes(work, inputs, capture, report, shared)
    return _fold_captured(gm, opaque, work, inputs, passes, report, prefix, capture, shown, proven)


def _fold_captured(
    gm: fx.GraphModule,
    opaque: dict[str, str],
    work: nn.Module,
    inputs: tuple | None,
    passes: Sequence[Pass],
    report: FoldReport,
    prefix: str,
    capture: str,
    shown: FoldProgress | None,
    proven: frozenset[tuple[str, str]],
) -> fx.GraphModule:
    """Fold ``gm``, captured from ``work`` (``opaque``: the modules it runs opaque), into
    ``report``: the passes to a fixpoint, then inside each opaque module."""
    if shown is not None:
        shown.start("fold")
    annotate_ranks(gm)
    guards = rank_guards(gm, shapes_recorded=inputs is not None)
    if not prefix:
        report.before = GraphStats.of(gm, work)
        report.before_sketch = GraphSketch.of(gm)
    # (before the passes: a pass that replaces a guarded value, as cleanup replaces an
    # Identity by its input, hands the guard to its replacement, which has the same rank)
    insert_rank_guards(gm, guards)
    fixpoint = run_to_fixpoint(gm, passes, proven=proven)
    rename_rank_guards(gm)
    report.folded += [
        Folded(f.rule, prefix + f.where, f.detail, f.reads_state) for f in fixpoint.folded
    ]
    report.skipped += [Skipped(s.rule, prefix + s.where, s.reason) for s in fixpoint.skipped]
    report.add_pass_seconds(fixpoint.seconds)
    child_inputs = record_child_inputs(gm, list(opaque), inputs) if opaque and inputs else {}
    for path, why in opaque.items():
        label = "" if path == AS_IS else f"{path}."
        report.opaque_modules[prefix + (label[:-1] or "forward")] = why
        _fold_inside(gm, path, passes, report, prefix + label, child_inputs, capture)
    delete_unused_attributes(gm)
    gm.recompile()
    if not prefix:
        forget_annotations(gm)
        report.after = GraphStats.of(gm)
        report.after_sketch = GraphSketch.of(gm)
    return gm


def _fold_inside(
    gm: fx.GraphModule,
    path: str,
    passes: Sequence[Pass],
    report: FoldReport,
    prefix: str,
    recorded: dict[str, tuple | None],
    capture: str,
) -> None:
    """Fold inside the module at ``path``, which ``gm`` runs as a black box
    (``repfx.fold_inside``); its children are captured with the inputs they received on the
    example inputs (``recorded``, by path in ``gm``), when they were called once."""
    leaf = gm.get_submodule(path)
    occurrences: dict[int, int] = {}
    for _, m in gm.named_modules(remove_duplicate=False):
        occurrences[id(m)] = occurrences.get(id(m), 0) + 1
    opaque = OpaqueModule(
        module=leaf,
        inputs=recorded.get(path),
        child_inputs={name: recorded.get(f"{path}.{name}") for name, _ in leaf.named_children()},
        where=prefix,
        shared=lambda m: occurrences.get(id(m), 0) > 1,
    )
    # inside a module that a traced graph runs opaque, torch.fx only: torch.export would fix
    # the child's input sizes, and with them the sizes the whole model accepts; inside a model
    # no front end captured, any front end
    mode = capture if path == AS_IS else "fx"

    def fold_child(child: nn.Module, inputs: tuple | None, into: FoldReport, where: str):
        return _fold_child(child, inputs, passes, into, where, mode)

    fold_inside(opaque, fold_child, report)


def _fold_child(
    child: nn.Module,
    inputs: tuple | None,
    passes: Sequence[Pass],
    report: FoldReport,
    where: str,
    capture: str,
) -> fx.GraphModule:
    """Fold a child of an opaque module: captured by ``capture`` with the inputs it was seen
    with, or, without them (or when they do not reproduce its call), by ``torch.fx``."""
    if inputs is not None:
        try:
            return _fold_copy(copy.deepcopy(child), inputs, passes, report, f"{where}.", capture)
        except (CaptureError, ExampleInputError):
            pass
    return _fold_copy(child, None, passes, report, f"{where}.", "fx")
