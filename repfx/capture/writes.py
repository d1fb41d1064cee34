"""Capture: a model → a ``torch.fx.GraphModule`` of repfx's own copy of it.

The user's model is deep-copied first, so tracing side effects (caches, counters, hooks that
run during tracing) land on the copy. A submodule whose ``forward`` cannot be traced
symbolically (data-dependent control flow, unsupported Python) is kept as a single
``call_module`` leaf instead of failing the whole model; the fold then works inside it
separately (see ``repfx.fold``).

What capture decides, and why (each is exact, or refuses):

* **Faithful tracing.** ``fx.Proxy`` traces ``y += c`` as ``y = y + c`` and cannot trace
  ``y[i] = v``; repfx's proxy records both as the in-place writes they are on tensors. torch.fx
  reads buffers as plain tensors, so a write to one (``self.calls.add_(1)``) runs once while
  tracing instead of being recorded: when a buffer changed during the trace, its value is put
  back and the model is traced again with buffers as graph values.
* **Hooks.** Global module forward hooks (``register_module_forward_hook`` /
  ``_pre_hook``) observe every module call: the model is refused (:class:`CaptureError`).
  Forward hooks or pre-hooks on the *top-level* model are refused too: ``fx`` traces
  ``forward`` itself, so the folded ``GraphModule`` would not run them — remove the hooks or
  fold a submodule. A submodule with forward hooks or pre-hooks is kept as a leaf (listed
  among the opaque modules) so that its hooks run, on the values they see in the original;
  ``torch.nn`` leaves with hooks stay leaves as always. Backward hooks do not run in
  inference and state-dict hooks change no value: they are ignored.
* **Parametrizations.** ``torch.nn.utils.parametrizations.weight_norm`` and ``orthogonal``
  (any mode) and ``spectral_norm`` (eval mode, where it reads its stored ``u``, ``v``) are
  deterministic functions of their state: each is baked into a plain tensor
  (``remove_parametrizations(m, name, leave_parametrized=True)``), which is bit-identical to
  what the module computes on every call. Any other parametrization (a custom one, a
  training-mode spectral norm, which updates ``u``, ``v`` on every call) is traced through, so
  the graph computes it as the module does. The legacy hook-based ``torch.nn.utils.weight_norm``
  is a forward pre-hook: its module stays a leaf that runs its hook. Baking gives the copy's
  module a class of its own first: a deep copy shares the parametrized class with the original,
  and removing a parametrization edits that class.
* **In-place ops** (:func:`functionalize`). An in-place write to a tensor that nothing else can
  observe — a fresh result of an op that allocates its output, read before the write only by
  ops that allocate theirs — becomes its out-of-place form (``relu_`` → ``relu``, ``y += c`` →
  ``y + c``, ``F.relu(y, inplace=True)`` → ``inplace=False``, ``nn.ReLU(inplace=True)`` →
  ``inplace=False`` when every call of the module qualifies, ``y[i] = v`` → a copy with the
  item set), and every later reader of the written tensor reads the new value. Any other write
  — to a graph input, a parameter or buffer, a view, a tensor an alias of which is live, by a
  random in-place op, or by code that is not known (an opaque leaf, a user function, a hook
  whose code does more than compute out of place may write to its inputs) — stays, and the
  written tensor, the writing node and every node that may alias them are marked
  ``node.meta[repfx.ir.graph.MUTATED_KEY] = True``: such nodes are never constants, and the
  commit point refuses rewrites that touch them. The folded model therefore writes to the
  caller's inputs exactly where the original does. Out of place, ``a + b`` may promote the
  dtype where ``a += b`` keeps ``a``'s: such a rewrite is followed by ``.type_as(a)``, which
  :func:`drop_no_op_dtype_guards` (run by :func:`propagate_shapes`) drops where the recorded
  dtypes show it does nothing (the fold is then exact for inputs of the example inputs'
  dtypes).
"""

from __future__ import annotations

import dis
import functools
import operator
import types
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrizations, parametrize

from ..errors import CaptureError, ExampleInputError, one_line
from ..ir.graph import (
    MUTATED_KEY,
    VALUE_KEYS,
    call_signature,
    dtype_on_meta_tensors,
    fetch_attr,
    global_forward_hooks,
    inplace_flag,
    is_inplace_name,
    is_plain,
    is_torch_callable,
    known_dtype,
    module_of,
    reads_only_shape,
    writes_in_place,
)
from ..ir.norms import NORM_FUNCTIONS, NORM_MODULES
from ..ir.ops import identity_input

DTYPE_GUARD_KEY = "repfx_dtype_guard"  # node.meta: a cast added by functionalize (see there)


# ---------------------------------------------------------------------------------- hooks


def forward_hooks_of(module: nn.Module) -> bool:
    """Does ``module`` itself carry forward hooks or pre-hooks (any kind)?"""
    return bool(
        getattr(module, "_forward_hooks", None) or getattr(module, "_forward_pre_hooks", None)
    )


def refuse_hooks(model: nn.Module) -> None:
    """Raise :class:`CaptureError` for hooks a folded ``GraphModule`` could not honour."""
    found = global_forward_hooks()
    if found:
        raise CaptureError(
            f"{' and '.join(found)} are registered: they observe every module call, and a "
            "folded model calls other modules. Remove them before folding."
        )
    if forward_hooks_of(model):
        raise CaptureError(
            f"{type(model).__name__} has forward hooks or pre-hooks on the top-level model: "
            "torch.fx traces its forward, so the folded GraphModule would not run them: remove "
            "the hooks or fold a submodule."
        )


# ------------------------------------------------------------------------ parametrizations


def bake_parametrizations(model: nn.Module) -> None:
    """Replace every deterministic parametrization (see the module docstring) by the tensor it
    computes now. ``model`` is repfx's own copy."""
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        names = [
            n for n in module.parametrizations if all(map(_bakeable, module.parametrizations[n]))
        ]
        if names:
            _own_class(module)
        for name in names:
            with torch.no_grad():
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def _own_class(module: nn.Module) -> None:
    """Give ``module`` a private copy of its parametrized class. A deep copy shares the class
    with the original, and removing a parametrization deletes its property from the class:
    without this, baking repfx's copy would break the user's model."""
    cls = type(module)
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def _bakeable(parametrization: nn.Module) -> bool:
    """A torch parametrization whose result depends on its state only (not on the call)."""
    kind = type(parametrization)
    if kind is parametrizations._SpectralNorm:
        return not parametrization.training  # training mode runs a power iteration per call
    return kind in (parametrizations._WeightNorm, parametrizations._Orthogonal)


# ------------------------------------------------------------------------------ tracing


class _FaithfulProxy(fx.Proxy):
    """A proxy that records ``y += c`` and ``y[i] = v`` as the in-place writes they are on a
    tensor. ``fx.Proxy`` traces ``y += c`` as ``y = y + c``, which differs from eager mode as soon
    as another name still refers to the tensor ``y`` (a helper ``def bump(t): t += 1``), and
    cannot trace item assignment at all."""

    def __setitem__(self, index: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


def _augmented(op: Callable[[Any, Any], Any]) -> Callable[[fx.Proxy, Any], fx.Proxy]:
    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    return method


for _op in (
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift,
):  # fmt: skip
    setattr(_FaithfulProxy, f"__{_op.__name__}__", _augmented(_op))


class _FallbackTracer(fx.Tracer):
    """Traces through modules where it can; turns modules it cannot trace into leaves, and
    keeps submodules with forward hooks as leaves (so that the hooks run).

    ``proxy_buffers``: buffers are read as graph values, so that an in-place write to one
    (``self.calls.add_(1)``) is recorded rather than run once on the real buffer while
    tracing (see :func:`capture`)."""

    def __init__(self, proxy_buffers: bool = False) -> None:
        super().__init__()
        self.opaque: dict[str, str] = {}
        self.proxy_buffer_attributes = proxy_buffers

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _FaithfulProxy(node, self)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """As ``fx.Tracer.getattr``, with a name lookup built once instead of a scan of every
        parameter per access (which makes tracing quadratic in model size)."""
        is_tensor = isinstance(attr_val, nn.Parameter) or (
            self.proxy_buffer_attributes and isinstance(attr_val, torch.Tensor)
        )
        name = self._tensor_names().get(id(attr_val)) if is_tensor else None
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def create_arg(self, a: Any) -> Any:
        """As ``fx.Tracer.create_arg``, with the same O(1) lookup for a module's own tensors
        passed as arguments (``F.batch_norm(x, self.running_mean, ...)``)."""
        if isinstance(a, torch.Tensor) and (name := self._tensor_names().get(id(a))) is not None:
            return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def _tensor_names(self) -> dict[int, str]:
        if getattr(self, "_names_of", (None, None))[0] is not self.root:
            names: dict[int, str] = {}
            for name, t in [*self.root.named_parameters(), *self.root.named_buffers()]:
                names.setdefault(id(t), name)
            self._names_of = (self.root, names)
        return self._names_of[1]

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.opaque:
            return True
        if parametrize.is_parametrized(m) or isinstance(m, parametrize.ParametrizationList):
            return False  # computes its weight on every call: trace what it computes
        leaf = super().is_leaf_module(m, qualname)
        if not leaf and forward_hooks_of(m):
            self.opaque[qualname] = "has forward hooks (kept as a module so that they run)"
            return True
        return leaf

    def call_module(
        self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        qualname = self.path_of_module(m)
        if not qualname or self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        last_node = next(iter(reversed(self.graph.nodes)), None)
        stack = dict(self.module_stack)  # the current nesting only: small
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            self._rollback(last_node)
            self.module_stack.clear()
            self.module_stack.update(stack)
            # (call counts of the failed partial trace stay: they only name metadata keys)
            self.opaque[qualname] = one_line(exc, limit=120)
            return super().call_module(m, forward, args, kwargs)

    def _rollback(self, last_node: fx.Node | None) -> None:
        """Erase the nodes the failed partial trace created, newest first."""
        for node in list(reversed(self.graph.nodes)):
            if node is last_node:
                break
            self.graph.erase_node(node)


def capture(
    model: nn.Module, defaults: dict[str, Any] | None = None
) -> tuple[fx.GraphModule, dict[str, str]]:
    """Trace ``model`` (already repfx's copy). Returns the graph module and the paths of
    modules kept as opaque leaves, with the reason each could not be traced.

    ``defaults``: arguments of ``forward`` the example inputs leave at their default values
    (``mask=None``), traced as those constants (``torch.fx`` concrete arguments) rather than
    as inputs that may be anything (which takes ``if mask is not None`` for true).

    Refuses hooks it cannot honour, bakes deterministic parametrizations, and rewrites in-place
    ops out of place where that is exact, marking the others (see the module docstring)."""
    refuse_hooks(model)
    bake_parametrizations(model)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    tracer = _trace(model, proxy_buffers=False, defaults=defaults)
    if _restore_changed(model, buffers):
        # The forward wrote to a buffer while tracing: torch.fx ran that write on the real
        # buffer instead of recording it. Trace again with buffers as graph values.
        tracer = _trace(model, proxy_buffers=True, defaults=defaults)
        _restore_changed(model, buffers)
    gm = fx.GraphModule(tracer.root, tracer.graph, class_name=type(model).__name__)
    functionalize(gm)
    return gm, tracer.opaque


def _trace(
    model: nn.Module, proxy_buffers: bool, defaults: dict[str, Any] | None
) -> _FallbackTracer:
    tracer = _FallbackTracer(proxy_buffers)
    try:
        tracer.trace(model, concrete_args=defaults or None)
    except Exception as exc:
        raise CaptureError(
            f"cannot trace {type(model).__name__}.forward with torch.fx ({one_line(exc)})"
        ) from exc
    return tracer


def _restore_changed(model: nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    """Put back every buffer whose value differs from ``saved``; whether one did."""
    changed = False
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            before = saved.get(name)
            if before is not None and not torch.equal(buffer, before):
                buffer.copy_(before)
                changed = True
    return changed


# ------------------------------------------------------------------------ in-place ops
#
# Vocabulary. A node *allocates* when it provably returns a tensor no other value shares
# (:func:`_allocates`); it *may alias* its inputs otherwise (views, casts that may return their
# input, identity modules, in-place ops, unknown code). A tensor is *private* to an in-place
# write when it was allocated by one op, and every op reading it before the write allocates its
# own result (so no alias of it is live): rewriting the write out of place and sending every
# later reader to the new value is then exact.


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


def _overload_aliases_first(op: torch._ops.OpOverload) -> bool:
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
    return packet is not None and any(
        torch.Tag.nondeterministic_seeded in op.tags for op in _overloads(packet)
    )


def _torch_module_class(m: nn.Module) -> bool:
    return type(m).__module__.startswith(("torch.nn.", "torch.ao.nn."))


def _allocates(gm: fx.GraphModule, node: fx.Node) -> bool:
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


def _alias_source(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
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
        or (isinstance(node.target, torch._ops.OpOverload) and _overload_aliases_first(node.target))
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
        node.target in _ALIASING_FUNCTIONS or (writes_in_place(node) and "out" not in node.kwargs)
    )


def _module_aliases_first(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A hook-free torch module that returns a view of its input or works in place."""
    if node.op != "call_module":
        return False
    m = module_of(gm, node)
    return (is_plain(m, _ALIASING_MODULES) or getattr(m, "inplace", False) is True) and (
        _torch_module_class(m) and not forward_hooks_of(m)
    )


def _may_alias_inputs(gm: fx.GraphModule, node: fx.Node) -> bool:
    """May the result of ``node`` share memory with one of its inputs?"""
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] not in _NON_TENSOR_ATTRS
    if any(reads_only_shape(node, n) for n in node.all_input_nodes):
        return False
    return not _allocates(gm, node)


# ------------------------------------------------------------------ what a node writes


class _Write:
    """An in-place write by ``node`` to ``targets``; ``out_of_place`` builds the equivalent
    out-of-place node (``None``: none is known to be exact); ``guard``: the out-of-place result
    may have another dtype (a tensor operand could promote it) and needs a cast back."""

    def __init__(
        self,
        node: fx.Node,
        targets: list[fx.Node],
        out_of_place: Callable[[], fx.Node] | None = None,
        guard: bool = False,
    ):
        self.node, self.targets, self.out_of_place, self.guard = node, targets, out_of_place, guard


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
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


def _write_of(gm: fx.GraphModule, node: fx.Node) -> _Write | None:
    """What ``node`` may write to, or ``None`` when it writes to no tensor."""
    if node.op == "call_module":
        return _module_write(gm, node)
    if node.op not in ("call_function", "call_method"):
        return None
    if _returns_input_itself(gm, node):
        return None  # a known function that returns its input as is (eval stochastic depth)
    if node.op == "call_function" and not _known_callable(node.target):
        return _Write(node, _tensor_inputs(node))  # user code may write to its inputs
    if not writes_in_place(node):
        return None
    return _in_place_write(node)


def _in_place_write(node: fx.Node) -> _Write | None:
    """What a torch call that writes in place (``add_``, ``out=``, ``inplace=True``) writes to;
    ``None`` when that is a size (ints are immutable)."""
    if "out" in node.kwargs:
        out = node.kwargs["out"]
        return _Write(node, [out] if isinstance(out, fx.Node) else _tensor_inputs(node))
    first = _written_argument(node)
    if first is None:
        return _Write(node, _tensor_inputs(node))
    if _is_non_tensor(first):
        return None  # n += 1 on a size: ints are immutable
    return _Write(node, [first], *_out_of_place_form(node, first))


def _written_argument(node: fx.Node) -> fx.Node | None:
    """The argument an in-place call writes to: for a function whose ``inplace=`` is not known
    to be ``False``, its first bound argument; else its first positional argument (if a node)."""
    if node.op == "call_function" and inplace_flag(node) is not False:
        return _inplace_input(node)
    return _first_node_arg(node)


def _known_callable(target: Any) -> bool:
    """A torch / ``torch.Tensor`` / ``operator`` callable, whose writes show in its name or
    arguments (``add_``, ``out=``, ``inplace=True``), a builtin, or :func:`functional_setitem`.
    Anything else is user code, which may write to its inputs."""
    if target is functional_setitem or is_torch_callable(target):
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


# Bytecode that computes without writing anywhere: loads, arithmetic (not augmented), tuples.
_PURE_OPCODES = frozenset(
    {
        "RESUME", "NOP", "CACHE", "COPY_FREE_VARS", "MAKE_CELL", "LOAD_CONST", "LOAD_FAST",
        "LOAD_FAST_CHECK", "LOAD_FAST_BORROW", "LOAD_FAST_LOAD_FAST", "LOAD_DEREF",
        "RETURN_VALUE", "RETURN_CONST", "BINARY_SUBSCR", "BUILD_TUPLE", "BUILD_LIST",
        "BUILD_SLICE", "LIST_EXTEND", "LIST_TO_TUPLE", "UNARY_NEGATIVE", "POP_TOP",
    }
)  # fmt: skip
_AUGMENTED_BINARY_OP = 13  # BINARY_OP arguments from here on are +=, -=, ... (Python ≥ 3.11)


def _hooks_may_write(module: nn.Module) -> bool:
    """May a forward hook or pre-hook of ``module`` write to a tensor? Only a hook whose code
    just loads, computes out of place and returns (``lambda m, args, out: out * a + b``) is
    known not to."""
    hooks = [
        *getattr(module, "_forward_hooks", {}).values(),
        *getattr(module, "_forward_pre_hooks", {}).values(),
    ]
    return any(_may_write(hook) for hook in hooks)


def _may_write(hook: Any) -> bool:
    while isinstance(hook, functools.partial):
        hook = hook.func
    code = getattr(hook, "__code__", None)
    if code is None or not isinstance(hook, types.FunctionType):
        return True
    for ins in dis.get_instructions(code):
        if ins.opname == "BINARY_OP" and ins.arg is not None and ins.arg < _AUGMENTED_BINARY_OP:
            continue
        if ins.opname not in _PURE_OPCODES:
            return True
    return False


def _module_write(gm: fx.GraphModule, node: fx.Node) -> _Write | None:
    m = module_of(gm, node)
    known = _torch_module_class(m) and not _hooks_may_write(m)
    if not known:  # a user / opaque leaf, or one whose hooks may write to its inputs
        return _Write(node, _tensor_inputs(node))
    if getattr(m, "inplace", False) is not True:
        return None
    first = _first_node_arg(node)
    return _Write(node, [first] if first is not None else _tensor_inputs(node))


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


# ------------------------------------------------------------------------ functionalize


def functionalize(gm: fx.GraphModule) -> None:
    """Rewrite in-place writes to private tensors out of place; mark every other write
    (:data:`repfx.ir.graph.MUTATED_KEY`) with what it may reach. See the module docstring."""
    module_sites: dict[int, list[tuple[fx.Node, bool]]] = {}
    for node in list(gm.graph.nodes):
        write = _write_of(gm, node)
        if write is None:
            continue
        private = len(write.targets) == 1 and _is_private(gm, write.targets[0], node)
        if node.op == "call_module" and _flippable(gm, node):
            if private:
                _redirect_later_readers(write.targets[0], node, node)
            module_sites.setdefault(id(module_of(gm, node)), []).append((node, private))
        elif private and write.out_of_place is not None:
            _rewrite_out_of_place(write)
        else:
            mark_mutated(gm, [*write.targets, node])
    _settle_inplace_modules(gm, module_sites)
    _mark_batch_norm_statistics(gm)
    gm.graph.lint()
    gm.recompile()


def _flippable(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A ``torch.nn`` module with ``inplace=True`` whose ``inplace=False`` form is exact: not a
    random one (training-mode dropout or RReLU)."""
    m = module_of(gm, node)
    if getattr(m, "inplace", False) is not True or not _torch_module_class(m):
        return False
    random = isinstance(m, (nn.modules.dropout._DropoutNd, nn.RReLU)) and m.training
    return not random and not forward_hooks_of(m)


def _settle_inplace_modules(
    gm: fx.GraphModule, sites: dict[int, list[tuple[fx.Node, bool]]]
) -> None:
    """A module is switched to ``inplace=False`` when every call of it writes a private tensor;
    otherwise all its calls stay in place and are marked."""
    for calls in sites.values():
        module = module_of(gm, calls[0][0])
        if all(private for _, private in calls):
            module.inplace = False
            continue
        for node, _ in calls:
            mark_mutated(gm, [*_tensor_inputs(node), node])


def _is_private(gm: fx.GraphModule, tensor: fx.Node, writer: fx.Node) -> bool:
    """May ``writer`` write to ``tensor`` with nobody else seeing it? ``tensor`` was allocated
    by one op (or is a view / cast of such a tensor read by nothing else), and every op reading
    it before ``writer`` allocates its own result."""
    if tensor.meta.get(MUTATED_KEY) or tensor.op not in (
        "call_function",
        "call_method",
        "call_module",
    ):
        return False
    earlier = [u for u in tensor.users if u is not writer and u < writer]  # (graph order)
    if any(not (_allocates(gm, u) or reads_only_shape(u, tensor)) for u in earlier):
        return False
    if _allocates(gm, tensor):
        return True
    source = _alias_source(gm, tensor)
    if source is None:
        return False
    readers = [u for u in source.users if not reads_only_shape(u, source)]
    return readers == [tensor] and _is_private(gm, source, tensor)


def _redirect_later_readers(tensor: fx.Node, writer: fx.Node, new: fx.Node) -> None:
    """Every reader of ``tensor`` after ``writer`` reads ``new`` (the value after the write)."""
    for user in list(tensor.users):
        if user is not writer and user is not new and user > writer:  # (graph order)
            user.replace_input_with(tensor, new)


def _rewrite_out_of_place(write: _Write) -> None:
    node, target = write.node, write.targets[0]
    graph = node.graph
    meta = {k: v for k, v in node.meta.items() if k != MUTATED_KEY}
    with graph.inserting_before(node):
        new = write.out_of_place()
        if write.guard:  # the in-place result is the cast's; the op's own dtype may be wider
            new.meta.update({k: v for k, v in meta.items() if k not in VALUE_KEYS})
            cast = graph.call_method("type_as", (new, target))
            cast.meta.update(meta)
            cast.meta[DTYPE_GUARD_KEY] = True
            new = cast
        else:
            new.meta.update(meta)
    node.replace_all_uses_with(new)
    _redirect_later_readers(target, node, new)
    graph.erase_node(node)


def mark_mutated(gm: fx.GraphModule, seeds: Iterable[Any]) -> None:
    """Mark ``seeds`` and every node that may alias one of them (through views, casts,
    identities, in-place results, unknown code; a ``get_attr`` through every other ``get_attr``
    of the same tensor) with :data:`MUTATED_KEY`."""
    stack = [n for n in seeds if isinstance(n, fx.Node)]
    marked: set[fx.Node] = set()
    while stack:
        node = stack.pop()
        if node in marked or node.op == "output":
            continue
        marked.add(node)
        node.meta[MUTATED_KEY] = True
        if _may_alias_inputs(gm, node):
            stack.extend(node.all_input_nodes)
        stack.extend(u for u in node.users if _may_alias_inputs(gm, u))
        if node.op == "get_attr":
            stack.extend(_same_tensor_reads(gm, node))


def _same_tensor_reads(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    value = fetch_attr(gm, node.target)
    return [
        n
        for n in gm.graph.nodes
        if n.op == "get_attr" and n is not node and fetch_attr(gm, n.target) is value
    ]


_BATCH_NORM_FUNCTIONS = {F.batch_norm: (1, 2), torch.batch_norm: (3, 4)}


def _mark_batch_norm_statistics(gm: fx.GraphModule) -> None:
    """A batch norm using batch statistics updates its running statistics on every call: any
    other read of those buffers reads a value that changes."""
    buffers: list[torch.Tensor] = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = module_of(gm, node)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                buffers += [b for b in (m.running_mean, m.running_var) if b is not None]
        elif node.op == "call_function" and node.target in _BATCH_NORM_FUNCTIONS:
            training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training")
            if training is not False:
                mean_at, var_at = _BATCH_NORM_FUNCTIONS[node.target]
                mark_mutated(gm, [_arg_at(node, mean_at, "running_mean")])
                mark_mutated(gm, [_arg_at(node, var_at, "running_var")])
    # (by storage: fx records ``bn.running_mean.view(...)``, run eagerly while tracing, as a
    # tensor constant that is a view of the buffer)
    storages = {b.untyped_storage().data_ptr() for b in buffers}
    reads = [n for n in gm.graph.nodes if n.op == "get_attr" and _storage_of(gm, n) in storages]
    mark_mutated(gm, reads)


def _storage_of(gm: fx.GraphModule, node: fx.Node) -> int | None:
    value = fetch_attr(gm, node.target)
    return value.untyped_storage().data_ptr() if isinstance(value, torch.Tensor) else None


def _arg_at(node: fx.Node, index: int, name: str) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


# --------------------------------------------------------------------------------- shapes


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph and stores each tensor result's shape / dtype in ``tensor_meta``."""

    def run_node(self, n: fx.Node) -> Any:
        from torch.fx.passes.shape_prop import _extract_tensor_metadata

        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = _extract_tensor_metadata(result)
        return result


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Record every node's shape / dtype in ``node.meta["tensor_meta"]`` by running ``gm``.

    Buffers are restored afterwards, so a training-mode BN's running statistics are unchanged;
    so are the example inputs (an in-place op of the model may write to them).
    """
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if len(example_inputs) > len(placeholders):
        raise ExampleInputError(
            f"{len(example_inputs)} example inputs for a forward that takes "
            f"{len(placeholders)} ({', '.join(placeholders)}): pass one per input"
        )
    saved = {name: b.detach().clone() for name, b in gm.named_buffers()}
    written = _written_parameters(gm)
    inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in example_inputs]
    try:
        with torch.no_grad(), torch.random.fork_rng():
            _ShapeRecorder(gm).run(*inputs)
    except Exception as exc:
        shapes = ", ".join(
            str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
            for x in example_inputs
        )
        cause = exc
        raise ExampleInputError(
            f"the model does not run on the example inputs [{shapes}] "
            f"({one_line(cause)}); "
            "pass inputs of the shape and dtype the model expects"
        ) from exc
    finally:
        with torch.no_grad():
            for name, b in gm.named_buffers():
                b.copy_(saved[name])
            for tensor, value in written:
                tensor.copy_(value)
    drop_no_op_dtype_guards(gm)


def _written_parameters(gm: fx.GraphModule) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The parameters an in-place op of the graph may write to, with a copy of their value."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.meta.get(MUTATED_KEY):
            value = fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor) and id(value) not in seen:
                seen[id(value)] = (value, value.detach().clone())
    return list(seen.values())


def drop_no_op_dtype_guards(gm: fx.GraphModule) -> None:
    """Drop the casts :func:`functionalize` put after an out-of-place op whose tensor operand
    could have promoted it (``a.add_(b)`` → ``(a + b).type_as(a)``) where the recorded dtypes
    show the cast changes nothing. Dtypes follow from the input dtypes alone, so the fold is
    exact for inputs of the example inputs' dtypes (the ones it is verified on)."""
    dropped = False
    for node in list(gm.graph.nodes):
        if not node.meta.get(DTYPE_GUARD_KEY):
            continue
        source = node.args[0]
        before = known_dtype(source) or dtype_on_meta_tensors(source)
        after = known_dtype(node)
        if before is not None and before == after:
            for key in VALUE_KEYS:  # the cast changed nothing: its value is the source's
                if key in node.meta:
                    source.meta.setdefault(key, node.meta[key])
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            dropped = True
    if dropped:
        gm.graph.lint()
        gm.recompile()
