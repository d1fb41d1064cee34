"""Capture with ``torch.export``: for models whose ``forward`` ``torch.fx`` cannot trace.

``torch.fx.symbolic_trace`` runs ``forward`` on proxies: a loop over a list of images, a shape
assertion, ``forward(self, x, *args)`` or a branch on ``x.dim()`` stops it. ``torch.export``
(non-strict) runs ``forward`` as Python on fake tensors and records the ATen ops they
dispatch, so all of these pass: Python control flow on shapes is evaluated (and guarded), only
data-dependent control flow on tensor *values* stops it. It needs example inputs.

What this module returns is the graph repfx's passes know: ``ExportedProgram.module()`` is an
``fx.GraphModule`` whose parameters and buffers are module attributes read by ``get_attr``
nodes (constants, to the passes) and whose calling convention is the original's (a
``_PyTreeCodeGen`` flattens the inputs — a list of images, a dict — and rebuilds the outputs).
Its nodes call ATen overloads (``aten.conv2d.default``, ``aten.batch_norm.default``,
``aten.mul.Tensor``, …); :func:`to_torch_level` rewrites the ones whose torch-level twin takes
the same arguments to that twin (``torch.conv2d``, ``torch.batch_norm``, ``torch.mul``, …), so
that every op view, pass and validation works unchanged. An ATen op with no twin here stays
an ATen call: it runs as it did and folds nothing.

Shapes: dimension 0 of every tensor input is exported as ``Dim.AUTO``, so a batch the model
does not specialise stays dynamic in the folded module; so is every dimension of an integer or
boolean input (token ids, masks, positions), so a language model takes any sequence length.
Export specialises a dimension of size 1 to the constant 1, so an example batch of one is
traced as a batch of two (its first item twice, :func:`grown_batch`); the graph is the same
for every batch size, and the fold is validated and verified on the example inputs as given.
Every other dimension of a floating-point input is fixed as in the example inputs. (Symbolic
spatial sizes would cost minutes of symbolic reasoning on models that compute their own
padding from them, such as timm's ``Conv2dSame``.) Export is tried with the most dynamic
shapes first (:data:`_SHAPE_POLICIES`) and with fewer where that fails, down to static shapes.
The report says what the folded module accepts, and an input outside it raises
:class:`repfx.GuardError` naming the input and the size (:mod:`.exported_module`), not export's
bare ``AssertionError``.
"""

from __future__ import annotations

import contextlib
import io
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.export.graph_signature import ConstantArgument, InputKind
from torch.utils import _pytree as pytree

from ..errors import CaptureError, one_line
from ..ir.graph import writes_in_place
from .exported_module import GUARDS_SUBMODULE, adopt_exported_module
from .hooks import forward_hooks_of, refuse_hooks
from .inplace import functionalize
from .outputs import objects_opened
from .state import SavedState, tensor_attributes
from .writes import overload_aliases_first

aten = torch.ops.aten


@dataclass(frozen=True)
class ExportCapture:
    """The captured graph module, and what the report should say about the capture."""

    module: fx.GraphModule
    notes: tuple[str, ...]


def capture_exported(model: nn.Module, example_inputs: tuple) -> ExportCapture:
    """``torch.export`` ``model`` (repfx's own copy) on ``example_inputs`` (non-strict) and
    return its graph at torch level (:func:`to_torch_level`). Hooks are refused as by
    :func:`repfx.capture.fx.capture`."""
    refuse_hooks(model)
    hooked = [path for path, m in model.named_modules() if path and forward_hooks_of(m)]
    if hooked:
        raise CaptureError(
            f"torch.export would run the forward hooks of {hooked[0]} only while capturing "
            "(repfx keeps hooked modules as modules, which only torch.fx capture can do)"
        )
    state = SavedState(tensor_attributes(model))  # (real tensors under export: it may write them)
    try:
        with objects_opened(model):  # (a DynamicCache in the output: rebuilt on every call)
            program, dynamic_error = _export_dynamic_or_static(
                model, example_inputs, f"{type(model).__name__}.forward"
            )
    finally:
        state.restore()
    _refuse_written_constants(program)
    fixed = _fixed_values(program)
    if dynamic_error is None:
        notes = [_shapes_note(program), *fixed]
    else:
        notes = [
            f"captured by torch.export with static shapes (a dynamic batch failed: "
            f"{one_line(dynamic_error)}); the folded module accepts inputs of the example "
            "inputs' shapes only",
            *fixed,
        ]
    gm = program.module()
    adopt_exported_module(gm)
    to_torch_level(gm)
    with _guards_set_aside(gm):
        functionalize(gm)  # marks what the graph writes (training-mode BN statistics, inputs)
    to_torch_level(gm)  # (the out-of-place twins functionalize put in: ``aten.add.Tensor``)
    return ExportCapture(gm, tuple(notes))


def _refuse_written_constants(program: Any) -> None:
    """A plain tensor attribute (not a parameter or buffer) is lifted by torch.export as a
    constant, and an in-place write to it does not reach the model's tensor: refuse it."""
    constants = program.graph_signature.inputs_to_lifted_tensor_constants
    frontier = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in constants]
    targets = {n: constants[n.name] for n in frontier}
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if not user.args or user.args[0] is not node:
                continue
            if writes_in_place(user):
                raise CaptureError(
                    f"the forward writes in place to a tensor attribute that is not a buffer "
                    f"(torch.export lifts it as the constant {targets[node]}, and the write "
                    "would be lost). Register it as a buffer (module.register_buffer(name, "
                    "tensor))"
                )
            if isinstance(user.target, torch._ops.OpOverload) and overload_aliases_first(
                user.target
            ):  # a view of it: a write to the view writes the constant
                targets[user] = targets[node]
                frontier.append(user)


@contextlib.contextmanager
def _guards_set_aside(gm: fx.GraphModule) -> Iterator[None]:
    """Take out the calls of the input-shape guards ``ExportedProgram.module()`` adds (a
    submodule that only reads its inputs, which capture would otherwise take for code that may
    write them), and put them back after the last placeholder."""
    guards = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == GUARDS_SUBMODULE]
    calls = [(n.args, n.kwargs) for n in guards]
    for node in guards:
        gm.graph.erase_node(node)
    yield
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else next(iter(gm.graph.nodes))
    for args, kwargs in reversed(calls):
        with gm.graph.inserting_after(anchor):
            gm.graph.call_module(GUARDS_SUBMODULE, args, kwargs)
    gm.recompile()


def export_program(module: nn.Module, example_inputs: tuple) -> Any:
    """``torch.export`` a folded module as an ``ExportedProgram``: a dynamic batch where the
    model does not specialise it, static shapes if that fails."""
    return _export_dynamic_or_static(module, example_inputs, "the folded module")[0]


def _export_dynamic_or_static(
    model: nn.Module, example_inputs: tuple, what: str
) -> tuple[Any, Exception | None]:
    """The program exported with the most dynamic shapes export accepts (:data:`_SHAPE_POLICIES`
    in order), and why the dynamic batch failed where only static shapes exported;
    :class:`CaptureError` naming ``what`` when nothing exports."""
    policies = [p for p in _SHAPE_POLICIES if p.applies(example_inputs)]
    batch_error: Exception | None = None
    for policy in policies:
        try:
            return _export(model, example_inputs, policy), batch_error if policy.static else None
        except Exception as exc:
            if not policy.static:
                batch_error = exc
                continue
            if isinstance(exc, CaptureError):  # repfx's own reason, from the model's output
                raise
            raise CaptureError(f"torch.export cannot capture {what} ({one_line(exc)})") from exc
    raise AssertionError("the static policy applies to every input")  # pragma: no cover


@dataclass(frozen=True)
class _ShapePolicy:
    """Which dimensions of the inputs export is asked to keep symbolic (``Dim.AUTO``: export
    still fixes a dimension the model specialises)."""

    batch: bool  # dimension 0 of every tensor input
    lengths: bool  # every dimension of an integer or boolean input (ids, masks, positions)

    @property
    def static(self) -> bool:
        return not (self.batch or self.lengths)

    def applies(self, example_inputs: tuple) -> bool:
        """Whether trying this policy can give more than the next one: the lengths policy
        only where some integer input has a dimension besides the batch."""
        if not self.lengths:
            return True
        return any(_is_index_tensor(x) and x.dim() > 1 for x in pytree.tree_leaves(example_inputs))

    def dynamic_shapes(self, example_inputs: Any) -> Any:
        def dims(x: Any) -> dict | None:
            if not isinstance(x, torch.Tensor) or x.dim() == 0:
                return None
            if self.lengths and _is_index_tensor(x):
                return dict.fromkeys(range(x.dim()), torch.export.Dim.AUTO)
            return {0: torch.export.Dim.AUTO}

        return pytree.tree_map(dims, example_inputs)


_SHAPE_POLICIES = (
    _ShapePolicy(batch=True, lengths=True),
    _ShapePolicy(batch=True, lengths=False),
    _ShapePolicy(batch=False, lengths=False),
)


def _is_index_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and not (x.is_floating_point() or x.is_complex())


def _fixed_values(program: Any) -> list[str]:
    """A note for the inputs that are Python numbers or flags: export fixes each to its
    example value (a fold may then use it as a constant)."""
    fixed = [
        f"{spec.arg.name} = {spec.arg.value!r}"
        for spec in program.graph_signature.input_specs
        if spec.kind == InputKind.USER_INPUT and isinstance(spec.arg, ConstantArgument)
    ]
    if not fixed:
        return []
    return [
        f"torch.export fixed {', '.join(fixed)} to the example value; another value raises "
        "repfx.GuardError"
    ]


def _shapes_note(program: Any) -> str:
    """What the folded module accepts: the inputs and dimensions export kept symbolic."""
    symbolic = _symbolic_dimensions(program)
    batch = any(dims[:1] == [0] for dims in symbolic.values())
    lengths = [
        f"{name} (dimension{'s' if len(other) > 1 else ''} {', '.join(map(str, other))})"
        for name, dims in symbolic.items()
        if (other := [i for i in dims if i != 0])
    ]
    if not (batch or lengths):
        return "the folded module takes the example inputs' shapes only (the model fixes its batch)"
    accepted = (["any batch size"] if batch else []) + (
        [f"any size of {', '.join(lengths)}"] if lengths else []
    )
    return (
        f"the folded module takes {' and '.join(accepted)}; other dimensions as in the example "
        "inputs"
    )


def _symbolic_dimensions(program: Any) -> dict[str, list[int]]:
    """The symbolic dimensions of each tensor input of an exported program, by input name."""
    user = set(program.graph_signature.user_inputs)
    return {
        n.name: [i for i, size in enumerate(v.shape) if isinstance(size, torch.SymInt)]
        for n in program.graph.nodes
        if n.op == "placeholder"
        and n.name in user
        and isinstance(v := n.meta.get("val"), torch.Tensor)
    }


def grown_batch(inputs: Any) -> Any:
    """``inputs`` with every tensor of batch size 1 (dimension 0) grown to 2 by repeating its
    item: what export traces for a dynamic batch, which it would specialise to 1."""
    return pytree.tree_map(
        lambda x: (
            torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == 1 else x
        ),
        inputs,
    )


def _export(model: nn.Module, example_inputs: tuple, policy: _ShapePolicy) -> Any:
    shapes = None
    if policy.batch:
        example_inputs = grown_batch(example_inputs)
        shapes = policy.dynamic_shapes(example_inputs)
    # (a failing export prints the partial graph: what the user sees is repfx's error)
    quiet = io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(contextlib.redirect_stdout(quiet))
        stack.enter_context(contextlib.redirect_stderr(quiet))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")  # export's advice to the model's author
        return torch.export.export(model, example_inputs, strict=False, dynamic_shapes=shapes)


# ------------------------------------------------------------------ ATen → torch level


@dataclass(frozen=True)
class _Twin:
    """The torch-level call an ATen overload becomes: ``target`` (a function, or a method
    name when ``method``), and how to map the ATen call's arguments (``None``: the same)."""

    target: Callable[..., Any] | str
    method: bool = False
    arguments: Callable[[tuple, dict], tuple[tuple, dict]] | None = None


def _constant_pad(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    x, pad, *rest = args
    value = rest[0] if rest else kwargs.get("value", 0)
    return (x, pad, "constant", value), {}


# Twins that are not the op's own binding: methods (no ``torch.view``), and the spelling the
# padding pass reads.
_OVERRIDES = {
    aten.view.default: _Twin("view", method=True),
    aten.contiguous.default: _Twin("contiguous", method=True),
    # (``y.reshape_as(x)`` reads only ``x``'s shape, which the op views know of the method)
    aten.reshape_as.default: _Twin("reshape_as", method=True),
    aten.view_as.default: _Twin("view_as", method=True),
    aten.expand_as.default: _Twin("expand_as", method=True),
    aten.constant_pad_nd.default: _Twin(F.pad, arguments=_constant_pad),
}
# Where the Python bindings of ATen ops live (``torch._C._nn.linear`` is ``F.linear``).
_BINDING_NAMESPACES = (torch._C._nn, torch)


def _twin_of(target: Any) -> _Twin | None:
    """The torch-level twin of an ATen overload: an override, or the op's own Python binding
    (``aten.conv2d.default`` → ``torch.conv2d``), a builtin that takes the schema's arguments
    and dispatches to the same kernel. A name bound to a Python function (``torch.split``,
    which takes other arguments) is not a twin."""
    if target in _OVERRIDES:
        return _OVERRIDES[target]
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    name = target._schema.name.split("::")[-1]
    for namespace in _BINDING_NAMESPACES:
        binding = getattr(namespace, name, None)
        if isinstance(binding, types.BuiltinFunctionType):
            return _Twin(binding)
    return None


def to_torch_level(gm: fx.GraphModule) -> None:
    """Rewrite, in place, every ATen call of ``gm`` that has a torch-level twin to it."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or (twin := _twin_of(node.target)) is None:
            continue
        args, kwargs = tuple(node.args), dict(node.kwargs)
        if twin.arguments is not None:
            args, kwargs = twin.arguments(args, kwargs)
        node.op = "call_method" if twin.method else "call_function"
        node.target = twin.target
        node.args, node.kwargs = args, kwargs
    gm.recompile()
