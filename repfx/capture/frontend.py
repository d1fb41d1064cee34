"""Which front end turns a model into a graph, and what is left when none can.

Two front ends (``repfx.fold(..., capture=...)``):

* ``"fx"`` — ``torch.fx`` symbolic tracing (:func:`repfx.capture.fx.capture`). Needs no inputs;
  a submodule it cannot trace is kept as an opaque leaf, and ``repfx.fold`` folds inside it.
* ``"export"`` — ``torch.export``, non-strict (:mod:`repfx.capture.torch_export`). Needs example
  inputs; passes shape checks, ``*args``, loops over lists of images, branches on ``x.dim()``.
* ``"auto"`` (the default) — ``torch.fx``, then ``torch.export`` when ``torch.fx`` cannot trace
  the top-level ``forward`` or leaves a submodule opaque (with example inputs, for an eval
  model); when neither can (data-dependent control flow at the top: NMS,
  a per-image loop over detections), the top-level module runs as it is
  (:func:`run_as_is`) and ``repfx.fold`` folds inside it, child by child, each captured with
  the inputs it received on the example inputs (:func:`record_child_inputs`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import fx, nn

from ..errors import CaptureError, ExampleInputError, one_line
from ..ir.graph import (
    MUTATED_KEY,
    fetch_attr,
    global_forward_hooks,
    has_hooks,
    module_of,
    writes_in_place,
)
from ..proof.inputs import cloned, copy_model, run
from ..proof.sharing import SharedParameters
from ..report.fold_report import FoldReport
from .fx import capture as fx_capture
from .hooks import forward_hooks_of
from .shapes import propagate_shapes
from .state import SavedState, module_tensors
from .torch_export import capture_exported

CAPTURE_MODES = ("auto", "fx", "export")
AS_IS = "model"  # the submodule of a run_as_is wrapper that holds the model


def capture_model(
    work: nn.Module, inputs: tuple | None, mode: str, report: FoldReport
) -> tuple[fx.GraphModule, dict[str, str]]:
    """The graph of ``work`` by the front end ``mode`` asks for, and the paths of the modules
    it runs as opaque leaves with the reason for each. Notes on the capture go to ``report``."""
    if mode == "export":
        return _exported(work, inputs, report, "on request"), {}
    try:
        gm, opaque = fx_capture(work, unsupplied_defaults(work, inputs))
    except CaptureError as fx_error:
        if mode == "fx":
            raise CaptureError(
                f"{fx_error}; repfx.fold(model, inputs, capture='export') captures it with "
                "torch.export instead"
            ) from fx_error
        if inputs is None:
            raise CaptureError(
                f"{fx_error}; pass example inputs (repfx.fold(model, inputs)) and repfx "
                "captures it with torch.export instead"
            ) from fx_error
        try:
            gm = _exported(work, inputs, report, str(fx_error))
        except CaptureError as export_error:
            reason = (
                f"neither front end captures forward: {fx_error}; {export_error}. torch.export "
                "stops only at control flow on tensor values (an `if` on a tensor, a loop "
                "over detections)"
            )
            return run_as_is(work), {AS_IS: reason}
        return gm, {}
    if opaque and mode == "auto" and inputs is not None and not work.training:
        # torch.fx left modules opaque: torch.export may capture them (a loop over a list, a
        # shape check); a module is kept whole where a hook must run (export refuses those)
        path, why = next(iter(opaque.items()))
        reason = f"torch.fx would run {len(opaque)} module(s) opaque ({path}: {why})"
        try:
            return _exported(work, inputs, report, reason), {}
        except CaptureError:
            return gm, opaque
    return gm, opaque


def capture_with_shapes(
    work: nn.Module,
    inputs: tuple | None,
    mode: str,
    report: FoldReport,
    shared: SharedParameters | None = None,
) -> tuple[fx.GraphModule, dict[str, str]]:
    """:func:`capture_model`, then the shapes on the example inputs (``propagate_shapes``).

    A captured graph that fails on example inputs the model itself runs on is a capture that
    went wrong, not a bad input — typically forward hooks that gather values through a side
    channel (a backbone collecting feature maps), which a graph does not see. ``"auto"`` then
    runs the model as it is and folds inside it; ``"fx"`` / ``"export"`` raise a
    :class:`CaptureError` saying so. When ``work`` shares its parameters with the user's model
    (``shared``), what a run may write gets storage of its own first."""
    gm, opaque = capture_model(work, inputs, mode, report)
    if shared is not None:
        release_what_runs_may_write(gm, opaque, shared)
    if inputs is None:
        return gm, opaque
    try:
        propagate_shapes(gm, inputs)
    except ExampleInputError as graph_error:
        if AS_IS in opaque or not _runs(work, inputs):
            raise
        reason = _graph_failure(work, graph_error)
        if mode != "auto":
            raise CaptureError(
                f"{reason}; capture='auto' runs the model as it is and folds inside it"
            ) from graph_error
        gm, opaque = run_as_is(work), {AS_IS: reason}
        if shared is not None:
            shared.release(gm)
        propagate_shapes(gm, inputs)
    return gm, opaque


def release_what_runs_may_write(
    gm: fx.GraphModule, opaque: dict[str, str], shared: SharedParameters
) -> None:
    """Give storage of their own to the shared parameters (``repfx.proof.sharing``) that running
    ``gm`` may write to: those of modules it runs opaque and of modules with hooks (code repfx
    did not trace), and those the graph writes in place or capture marked as written."""
    if global_forward_hooks():
        shared.release(gm)
        return
    for path in opaque:
        shared.release(gm.get_submodule(path))
    written = []
    for node in gm.graph.nodes:
        module = module_of(gm, node) if node.op == "call_module" else None
        if module is not None and (node.meta.get(MUTATED_KEY) or has_hooks(module)):
            shared.release(module)
        elif node.op == "get_attr" and (
            node.meta.get(MUTATED_KEY) or any(writes_in_place(user) for user in node.users)
        ):
            value = fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                written.append(value)
    if written:
        shared.release(gm, only=written)


def _runs(model: nn.Module, inputs: tuple) -> bool:
    try:
        run(copy_model(model), inputs)
    except Exception:
        return False
    return True


def _graph_failure(model: nn.Module, error: ExampleInputError) -> str:
    cause = one_line(error.__cause__) if error.__cause__ is not None else str(error)
    reason = f"the captured graph fails on the example inputs the model runs on ({cause})"
    hooked = [path for path, m in model.named_modules() if path and forward_hooks_of(m)]
    if hooked:
        more = f" and {len(hooked) - 1} more" if len(hooked) > 1 else ""
        reason += (
            f": forward hooks on {hooked[0]}{more} may gather values through a side channel "
            "the graph does not see"
        )
    return reason


def unsupplied_defaults(model: nn.Module, inputs: tuple | None) -> dict[str, Any]:
    """The parameters of ``model.forward`` the ``inputs`` given leave at their defaults, keyed
    as ``torch.fx`` names them: ``forward(x, mask=None)`` called with ``x`` gives ``mask: None``,
    ``forward(x, *args, **kwargs)`` gives ``*args: ()`` and ``**kwargs: {}``. The fold is of
    the model called that way; the folded module's ``forward`` takes the ``inputs`` given (an
    extra argument is then a ``TypeError``, never silently ignored)."""
    if inputs is None:
        return {}
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in parameters) and len(inputs) > len(positional):
        return {}
    defaults = {p.name: p.default for p in positional[len(inputs) :] if p.default is not p.empty}
    for p in parameters:
        if p.kind == p.VAR_POSITIONAL:
            defaults["*" + p.name] = ()
        elif p.kind == p.VAR_KEYWORD:
            defaults["**" + p.name] = {}
    return defaults


def _exported(
    work: nn.Module, inputs: tuple | None, report: FoldReport, reason: str
) -> fx.GraphModule:
    """Capture with torch.export; the report says so, why, and what the result accepts."""
    if inputs is None:
        raise ExampleInputError("capture='export' needs example inputs: repfx.fold(model, inputs)")
    captured = capture_exported(work, inputs)
    report.notes.append(f"captured with torch.export: {reason}")
    report.notes.extend(captured.notes)
    return captured.module


def _call(module: nn.Module, args: tuple) -> Any:
    return module(*args)


def run_as_is(model: nn.Module) -> fx.GraphModule:
    """A ``GraphModule`` whose ``forward(*args)`` calls ``model`` (held as its
    submodule ``AS_IS``) unchanged: the graph of a model no front end captures, inside which
    ``repfx.fold`` folds its children."""
    graph = fx.Graph()
    args = graph.placeholder("*args")
    module = graph.get_attr(AS_IS)
    graph.output(graph.call_function(_call, (module, args)))
    holder = nn.Module()
    holder.add_module(AS_IS, model)
    gm = fx.GraphModule(holder, graph, class_name=type(model).__name__)
    gm.training = model.training
    return gm


def record_child_inputs(
    gm: fx.GraphModule, parents: list[str], inputs: tuple
) -> dict[str, tuple | None]:
    """The positional inputs each module at ``parents``, and each of its children, receives
    when ``gm`` runs on ``inputs`` (path → inputs; see :func:`record_inputs`)."""
    paths = []
    for parent in parents:
        paths.append(parent)
        paths += [
            f"{parent}.{name}" if parent else name
            for name, _ in gm.get_submodule(parent).named_children()
        ]
    return record_inputs(gm, inputs, paths)


def record_inputs(root: nn.Module, inputs: tuple, paths: list[str]) -> dict[str, tuple | None]:
    """The positional inputs each submodule of ``root`` at ``paths`` receives when ``root``
    runs on ``inputs`` (path → inputs): recorded for a module called exactly once with no
    keyword arguments, ``None`` for any other. Tensors it writes are restored afterwards; a
    model that fails to run records nothing (the verification reports it)."""
    calls: dict[str, list[tuple | None]] = {}
    handles = []

    def recorder(path: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.setdefault(path, []).append(cloned(args) if not kwargs else None)

        return hook

    for path in dict.fromkeys(paths):
        handles.append(
            root.get_submodule(path).register_forward_pre_hook(recorder(path), with_kwargs=True)
        )
    state = SavedState(module_tensors(root))
    try:
        with torch.no_grad(), torch.random.fork_rng():
            root(*cloned(inputs))
    except Exception:
        calls.clear()
    finally:
        for handle in handles:
            handle.remove()
        state.restore()
    return {path: seen[0] if len(seen) == 1 else None for path, seen in calls.items()}
