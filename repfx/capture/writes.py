"""What a graph node may write to in place, and what its result may alias.

These are the facts :func:`repfx.capture.functionalize` decides on (:mod:`.inplace`).

* A node *allocates* when it provably returns a tensor no other value shares
  (:func:`allocates`: ops that allocate their output, by table or by their ATen schema); it
  *may alias* its inputs otherwise (views, casts that may return their input, identity modules,
  in-place ops, unknown code: :func:`may_alias_inputs`); :func:`alias_source` is the one input
  a view, cast or in-place result may alias.
* A node *writes* (:func:`write_of`) when a torch call says so in its name or arguments
  (``relu_``, ``out=``, ``inplace=True``, ``y += c``, ``y[i] = v``) or a ``torch.nn`` module has
  ``inplace=True``; code that is not known — an opaque leaf, a user function, a module whose
  hooks may write (:func:`repfx.capture.hooks.hook_may_write`) — may write to every tensor it is
  given. A write comes with its exact out-of-place form where there is one (``relu_`` →
  ``relu``, ``y += c`` → ``y + c``, ``F.relu(y, inplace=True)`` → ``inplace=False``,
  ``y[i] = v`` → :func:`functional_setitem`), never for a random op. Out of place, ``a + b``
  may promote the dtype where ``a += b`` keeps ``a``'s: such a form asks for a cast back
  (:attr:`Write.guard`).

Each table errs one way: an op it does not know allocates nothing, and may alias and write to
its inputs.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..ir.graph import (
    argument_value,
    call_signature,
    draws_random,
    inplace_flag,
    is_inplace_name,
    is_plain,
    is_torch_callable,
    module_of,
    reads_only_shape,
    require_rank,
    writes_in_place,
    written_positions,
)
from ..ir.norms import NORM_FUNCTIONS, NORM_MODULES
from ..ir.ops import identity_input
from .hooks import forward_hooks_of, hooks_may_write

# ------------------------------------------------------------- what a node allocates, aliases


def functional_setitem(tensor: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
    """``tensor[index] = value`` on a copy: the out-of-place form of ``operator.setitem``."""
    out = tensor.clone()
    out[index] = value
    return out


_OUT_OF_PLACE_OPERATORS: dict[Any, Any] = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
    operator.ifloordiv: operator.floordiv,
    operator.imod: operator.mod,
    operator.ipow: operator.pow,
    operator.iand: operator.and_,
    operator.ior: operator.or_,
    operator.ixor: operator.xor,
    operator.ilshift: operator.lshift,
    operator.irshift: operator.rshift,
    operator.imatmul: operator.matmul,
    operator.setitem: functional_setitem,
}

# Results that are certainly new tensors (besides ATen ops proven so by their schema).
_ALLOCATING_FUNCTIONS = frozenset(
    {
        operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
        operator.mod, operator.pow, operator.neg, operator.matmul, operator.and_, operator.or_,
        operator.xor, operator.lshift, operator.rshift, operator.invert, functional_setitem,
        torch.stack, torch.softmax, torch.log_softmax, torch.matmul,
        # composite, but each always returns a new tensor (the bindings torch.export graphs
        # call: repfx.capture.torch_export)
        torch.batch_norm, torch.instance_norm, *NORM_FUNCTIONS,
    }
)  # fmt: skip
# torch.nn.functional functions that allocate their result unless called with inplace=True.
_ALLOCATING_F = frozenset(
    {
        F.relu, F.relu6, F.elu, F.selu, F.celu, F.leaky_relu, F.hardtanh, F.silu, F.mish,
        F.hardswish, F.hardsigmoid, F.threshold, F.gelu, F.sigmoid, F.tanh, F.softmax,
        F.log_softmax, F.softplus, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d,
        F.conv_transpose2d, F.conv_transpose3d, F.linear, F.batch_norm, *NORM_FUNCTIONS,
        F.instance_norm, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
        F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.normalize,
    }
)  # fmt: skip
_ALLOCATING_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.SyncBatchNorm, *NORM_MODULES, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d,
    nn.MaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.Mish, nn.ELU, nn.CELU, nn.SELU, nn.PReLU, nn.Softmax, nn.Hardtanh,
    nn.Softplus,
)  # fmt: skip
# Ops whose result may alias their first argument only (a view, or a cast / identity that may
# return its input): an in-place write through them writes to that argument.
_ALIASING_METHODS = frozenset(
    {
        "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "unsqueeze",
        "squeeze", "expand", "expand_as", "view_as", "reshape_as", "contiguous", "detach",
        "narrow", "select", "movedim", "swapaxes", "float", "double", "half", "bfloat16", "to",
        "type", "type_as",
    }
)  # fmt: skip
_ALIASING_FUNCTIONS = frozenset(
    {
        operator.getitem, torch.flatten, torch.reshape, torch.permute, torch.transpose,
        torch.squeeze, torch.unsqueeze, torch.narrow, torch.select, torch.movedim, torch.t,
    }
)  # fmt: skip
_ALIASING_MODULES = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)  # fmt: skip
_NON_TENSOR_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad"})
_RANDOM_F = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.rrelu}
_RANDOM_F |= {F.feature_alpha_dropout}


def _aten_packet(name: str) -> Any:
    return getattr(torch.ops.aten, name, None) if name.isidentifier() else None


def _overloads(packet: Any) -> Iterable[Any]:
    for name in packet.overloads():
        yield getattr(packet, name)


@functools.cache
def _aten_allocates(name: str) -> bool:
    """Every non-mutable, tensor-returning overload of ``aten::<name>`` returns a tensor that
    aliases no input (per its schema) and has a real kernel (a composite-implicit op may return
    its input as is, whatever its schema says)."""
    packet = _aten_packet(name)
    found = False
    for op in _overloads(packet) if packet is not None else ():
        schema = op._schema
        if schema.is_mutable or not schema.returns:
            continue
        if any(not isinstance(r.type, torch.TensorType) for r in schema.returns):
            continue
        if any(r.alias_info is not None for r in schema.returns):
            return False
        try:
            implicit = torch._C._dispatch_has_kernel_for_dispatch_key(
                op.name(), "CompositeImplicitAutograd"
            )
        except RuntimeError:  # a TorchScript-only overload
            continue
        if implicit:
            return False
        found = True
    return found


def _overload_allocates(op: torch._ops.OpOverload) -> bool:
    """As :func:`_aten_allocates`, for one overload."""
    schema = op._schema
    if schema.is_mutable or not schema.returns:
        return False
    if any(not isinstance(r.type, torch.TensorType) or r.alias_info is not None
           for r in schema.returns):  # fmt: skip
        return False
    try:
        return not torch._C._dispatch_has_kernel_for_dispatch_key(
            op.name(), "CompositeImplicitAutograd"
        )
    except RuntimeError:
        return False


def overload_aliases_first(op: torch._ops.OpOverload) -> bool:
    """Does the overload return a view of (or write to) its first argument, and nothing else?"""
    schema = op._schema
    first = schema.arguments[0].alias_info if schema.arguments else None
    aliased = [r.alias_info for r in schema.returns if r.alias_info is not None]
    return (
        first is not None
        and len(aliased) == len(schema.returns) == 1
        and (aliased[0].before_set == first.before_set)
    )


def _is_aten_random(name: str) -> bool:
    packet = _aten_packet(name)
    return packet is not None and any(draws_random(op) for op in _overloads(packet))


def torch_module_class(m: nn.Module) -> bool:
    return type(m).__module__.startswith(("torch.nn.", "torch.ao.nn."))


def allocates(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Does ``node`` provably return a new tensor that shares memory with nothing else?"""
    if node.op == "call_module":
        m = module_of(gm, node)
        return (
            is_plain(m, _ALLOCATING_MODULES)
            and not forward_hooks_of(m)
            and not getattr(m, "inplace", False)
        )
    if node.op == "call_method":
        return isinstance(node.target, str) and _aten_allocates(node.target)
    if node.op != "call_function" or writes_in_place(node):
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):  # (a torch.export graph's ATen calls)
        return _overload_allocates(target)
    if target in _ALLOCATING_FUNCTIONS or target in _ALLOCATING_F:
        return True
    name = getattr(target, "__name__", "") or ""
    return _is_torch_builtin(target, name) and _aten_allocates(name)


_BUILTIN_NAMESPACES = (torch, torch._C._nn, torch._C._VariableFunctions, torch.Tensor)


def _is_torch_builtin(target: Any, name: str) -> bool:
    """``target`` is the torch / ``torch.Tensor`` binding of the ATen op ``name``."""
    return any(getattr(ns, name, None) is target for ns in _BUILTIN_NAMESPACES)


def alias_source(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The one input a node's result may alias (views, casts, identities, in-place ops);
    ``None`` when it allocates, or may alias something else too."""
    first = _first_node_arg(node)
    if first is None or not _returns_alias_of_first(gm, node):
        return None
    return first


def _first_node_arg(node: fx.Node) -> fx.Node | None:
    """The node's first positional argument, if it is a node."""
    return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None


def _returns_alias_of_first(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Is the node's result its first argument, or a view of it (and nothing else)?"""
    return (
        _method_aliases_first(node)
        or _function_aliases_first(node)
        or (isinstance(node.target, torch._ops.OpOverload) and overload_aliases_first(node.target))
        or _returns_input_itself(gm, node)
        or _module_aliases_first(gm, node)
    )


def _returns_input_itself(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A known function that returns its input as is (an eval-mode stochastic depth)."""
    return node.op == "call_function" and isinstance(identity_input(gm, node), fx.Node)


def _method_aliases_first(node: fx.Node) -> bool:
    """A view / cast method (``x.view(...)``) or an in-place one (``x.add_(...)``)."""
    return node.op == "call_method" and (
        node.target in _ALIASING_METHODS or is_inplace_name(str(node.target))
    )


def _function_aliases_first(node: fx.Node) -> bool:
    """A view / cast function, or one writing in place to its first argument (not ``out=``)."""
    return node.op == "call_function" and (
        node.target in _ALIASING_FUNCTIONS
        or (writes_in_place(node) and node.kwargs.get("out") is None)
    )


def _module_aliases_first(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A hook-free torch module that returns a view of its input or works in place."""
    if node.op != "call_module":
        return False
    m = module_of(gm, node)
    return (is_plain(m, _ALIASING_MODULES) or getattr(m, "inplace", False) is True) and (
        torch_module_class(m) and not forward_hooks_of(m)
    )


def may_alias_inputs(gm: fx.GraphModule, node: fx.Node) -> bool:
    """May the result of ``node`` share memory with one of its inputs?"""
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] not in _NON_TENSOR_ATTRS
    if any(reads_only_shape(node, n) for n in node.all_input_nodes):
        return False
    return not allocates(gm, node)


# ------------------------------------------------------------------ what a node writes


class Write:
    """An in-place write by ``node`` to ``targets``; ``out_of_place`` builds the equivalent
    out-of-place node (``None``: none is known to be exact); ``guard``: the out-of-place result
    may have another dtype (a tensor operand could promote it) and needs a cast back;
    ``unknown_code``: ``node`` runs code repfx does not know (an opaque leaf, a user function, a
    module whose hooks may write), which *may* write to every tensor it is given."""

    def __init__(
        self,
        node: fx.Node,
        targets: list[fx.Node],
        out_of_place: Callable[[], fx.Node] | None = None,
        guard: bool = False,
        unknown_code: bool = False,
    ):
        self.node, self.targets, self.out_of_place, self.guard = node, targets, out_of_place, guard
        self.unknown_code = unknown_code


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if not _is_non_tensor(n)]


_SIZE_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.getitem}
_SIZE_ARITHMETIC |= {operator.iadd, operator.isub, operator.imul, operator.ifloordiv}


def _is_non_tensor(node: fx.Node) -> bool:
    """Sizes and metadata (``x.shape``, ``x.size(0)``, ``x.shape[0] * 2``): values that are
    never tensors, so never written to."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _NON_TENSOR_ATTRS
    if node.op == "call_method":
        return node.target in ("size", "dim", "numel")
    if node.op == "call_function" and node.target in _SIZE_ARITHMETIC:
        inputs = node.all_input_nodes
        return bool(inputs) and all(_is_non_tensor(n) for n in inputs)
    return False


def write_of(gm: fx.GraphModule, node: fx.Node) -> Write | None:
    """What ``node`` may write to, or ``None`` when it writes to no tensor."""
    if node.op == "call_module":
        return _module_write(gm, node)
    if node.op not in ("call_function", "call_method"):
        return None
    if _returns_input_itself(gm, node):
        return None  # a known function that returns its input as is (eval stochastic depth)
    if node.op == "call_function" and not _known_callable(node.target):
        return Write(node, tensor_inputs(node), unknown_code=True)  # (may write its inputs)
    if not writes_in_place(node):
        return None
    return _in_place_write(node)


def _in_place_write(node: fx.Node) -> Write | None:
    """What a torch call that writes in place (``add_``, ``out=``, ``inplace=True``) writes to;
    ``None`` when that is a size (ints are immutable)."""
    if node.kwargs.get("out") is not None:
        out = node.kwargs["out"]
        return Write(node, [out] if isinstance(out, fx.Node) else tensor_inputs(node))
    first = _written_argument(node)
    if first is None:
        return Write(node, tensor_inputs(node))
    if _is_non_tensor(first):
        return None  # n += 1 on a size: ints are immutable
    return Write(node, [first], *_out_of_place_form(node, first))


def _written_argument(node: fx.Node) -> fx.Node | None:
    """The argument an in-place call writes to: for an ATen overload, the one its schema marks
    written (``Tensor(a!) self``) when that is the only one; for a function whose ``inplace=``
    is not known to be ``False``, its first bound argument; else its first positional argument
    (if a node)."""
    if isinstance(node.target, torch._ops.OpOverload):
        return _schema_written_argument(node)
    if node.op == "call_function" and inplace_flag(node) is not False:
        return _inplace_input(node)
    return _first_node_arg(node)


def _schema_written_argument(node: fx.Node) -> fx.Node | None:
    """The one argument of an ATen call that its schema marks written, if it is a node."""
    written = written_positions(node.target)
    if len(written) != 1:
        return None
    value = argument_value(node.target, written[0], node.args, node.kwargs)
    return value if isinstance(value, fx.Node) else None


def _known_callable(target: Any) -> bool:
    """A torch / ``torch.Tensor`` / ``operator`` callable, whose writes show in its name or
    arguments (``add_``, ``out=``, ``inplace=True``), a builtin, or :func:`functional_setitem`.
    Anything else is user code, which may write to its inputs."""
    if target in (functional_setitem, require_rank) or is_torch_callable(target):
        return True
    return (getattr(target, "__module__", None) or "") in ("builtins", "math")


def _inplace_input(node: fx.Node) -> fx.Node | None:
    sig = call_signature(node.target)
    try:
        bound = sig.bind(*node.args, **node.kwargs) if sig is not None else None
    except TypeError:
        return None
    if bound is None:
        return None
    first = next(iter(bound.arguments.values()), None)
    return first if isinstance(first, fx.Node) else None


def _module_write(gm: fx.GraphModule, node: fx.Node) -> Write | None:
    m = module_of(gm, node)
    known = torch_module_class(m) and not hooks_may_write(m)
    if not known:  # a user / opaque leaf, or one whose hooks may write to its inputs
        return Write(node, tensor_inputs(node), unknown_code=True)
    if getattr(m, "inplace", False) is not True:
        return None
    first = _first_node_arg(node)
    return Write(node, [first] if first is not None else tensor_inputs(node))


def _out_of_place_form(node: fx.Node, target: fx.Node) -> tuple[Callable[[], fx.Node] | None, bool]:
    """The exact out-of-place equivalent of the in-place call ``node`` writing ``target``, and
    whether its result needs a dtype guard; ``(None, False)`` when there is none (a random op,
    an op without an out-of-place twin)."""
    graph = node.graph
    if node.op == "call_function" and node.target in _OUT_OF_PLACE_OPERATORS:
        twin = _OUT_OF_PLACE_OPERATORS[node.target]
        guard = twin is not functional_setitem and _has_tensor_operand(node, target)
        return (lambda: graph.call_function(twin, node.args, node.kwargs)), guard
    if node.op == "call_function" and inplace_flag(node) is True:
        return _without_inplace_flag(node)
    if isinstance(node.target, torch._ops.OpOverload):
        twin = _functional_overload(node.target)
        if twin is None:
            return None, False
        return (lambda: graph.call_function(twin, node.args, node.kwargs)), _has_tensor_operand(
            node, target
        )
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if not isinstance(name, str) or not is_inplace_name(name) or not _twin_exists(name):
        return None, False
    guard = _has_tensor_operand(node, target)
    if node.op == "call_method":
        return (lambda: graph.call_method(name[:-1], node.args, node.kwargs)), guard
    twin = _builtin_twin(node.target, name)
    if twin is None:
        return None, False
    return (lambda: graph.call_function(twin, node.args, node.kwargs)), guard


def _twin_exists(name: str) -> bool:
    """``aten::<name>`` (an in-place op, deterministic) and ``aten::<name minus _>`` take the
    same arguments overload by overload: ATen's in-place / functional pair of one op."""
    inplace, functional = _aten_packet(name), _aten_packet(name[:-1])
    if inplace is None or functional is None or _is_aten_random(name):
        return False
    for overload in inplace.overloads():
        arguments = getattr(inplace, overload)._schema.arguments
        if not arguments or not isinstance(arguments[0].type, torch.TensorType):
            continue  # a TorchScript list / scalar overload (``mul_.t``)
        twin = getattr(functional, overload, None)
        if twin is None or [a.name for a in arguments] != [a.name for a in twin._schema.arguments]:
            return False
    return True


def _functional_overload(op: torch._ops.OpOverload) -> Any:
    """``aten.add.Tensor`` for ``aten.add_.Tensor``: the same overload of the op's functional
    twin (see :func:`_twin_exists`), or ``None``."""
    name = op._schema.name.split("::")[-1]
    if op.namespace != "aten" or not is_inplace_name(name) or not _twin_exists(name):
        return None
    return getattr(_aten_packet(name[:-1]), op._overloadname, None)


def _builtin_twin(target: Any, name: str) -> Any:
    for namespace in _BUILTIN_NAMESPACES:
        if getattr(namespace, name, None) is target:
            return getattr(namespace, name[:-1], None)
    return None


def _without_inplace_flag(node: fx.Node) -> tuple[Callable[[], fx.Node] | None, bool]:
    """``F.relu(x, inplace=True)`` → ``F.relu(x, inplace=False)`` (not for random ops)."""
    if node.target in _RANDOM_F and _training_flag(node) is not False:
        return None, False
    sig = call_signature(node.target)
    params = list(sig.parameters) if sig is not None else []
    index = params.index("inplace") if "inplace" in params else None
    if index is not None and len(node.args) > index:
        args = (*node.args[:index], False, *node.args[index + 1 :])
        kwargs = dict(node.kwargs)
    else:
        args, kwargs = node.args, {**node.kwargs, "inplace": False}
    return (lambda: node.graph.call_function(node.target, args, kwargs)), False


def _training_flag(node: fx.Node) -> Any:
    sig = call_signature(node.target)
    try:
        bound = sig.bind(*node.args, **node.kwargs) if sig is not None else None
    except TypeError:
        bound = None
    if bound is None:
        return True  # unknown: assume training
    param = sig.parameters.get("training")
    return bound.arguments.get("training", param.default if param is not None else True)


def _has_tensor_operand(node: fx.Node, target: fx.Node) -> bool:
    """Does an operand other than ``target`` possibly hold a tensor (which could promote the
    out-of-place result to another dtype than ``target``'s)?"""
    return any(n is not target and not _is_non_tensor(n) for n in node.all_input_nodes)
