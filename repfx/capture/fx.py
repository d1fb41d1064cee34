"""Capture: a model → a ``torch.fx.GraphModule`` of repfx's own copy of it, by symbolic tracing.

The user's model is deep-copied first, so tracing side effects (caches, counters, hooks that
run during tracing) land on the copy. A submodule whose ``forward`` cannot be traced
symbolically (data-dependent control flow, unsupported Python) is kept as a single
``call_module`` leaf instead of failing the whole model; the fold then works inside it
separately (see ``repfx.fold``).

What the tracer decides, and why (each is exact, or refuses):

* **Faithful tracing.** ``fx.Proxy`` traces ``y += c`` as ``y = y + c`` and cannot trace
  ``y[i] = v``; repfx's proxy records both as the in-place writes they are on tensors. torch.fx
  reads buffers as plain tensors, so a write to one (``self.calls.add_(1)``) runs once while
  tracing instead of being recorded: when a buffer changed during the trace, its value is put
  back and the model is traced again with buffers as graph values.
* **Live state** (:mod:`.live_state`). What the forward computes in Python from a buffer read
  as a plain tensor (``2 * self.bn.running_mean``, ``self.bn.running_var.sqrt()``) runs once
  while tracing and would be kept as a constant. Where the graph writes that buffer when it
  runs (a training-mode norm's statistics, an in-place update, unknown code's own state), the
  model is traced again with it as a graph value; a read through a name torch.fx cannot make
  a graph value (a plain tensor attribute naming the same memory) is refused.
* **Hooks** (:mod:`.hooks`). Global forward hooks and forward hooks or pre-hooks on the
  top-level model are refused; a submodule with forward hooks or pre-hooks is kept as a leaf so
  that its hooks run.
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
* **In-place ops** (:mod:`.inplace`). The traced graph's in-place writes are rewritten out of
  place where that is exact, and marked where it is not (:func:`functionalize`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import _assert_is_none
from torch.fx.graph import _PyTreeCodeGen
from torch.nn.utils import parametrizations, parametrize

from ..errors import CaptureError, one_line
from ..ir.graph import keys_of, require_none, storage_key, writes_in_place
from .hooks import forward_hooks_of, refuse_hooks
from .inplace import functionalize
from .live_state import EagerReads, copy_written_constants, live_tensors
from .outputs import RestoreOutputContainers, flat_output
from .portable import GUARDS
from .state import Bindings, SavedState, module_tensors, unrecorded_tensors

# Which buffers a trace reads as graph values: none, all, or those of these ids.
Proxied = bool | frozenset[int]

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

    def __len__(self) -> int:
        """The number of parts of a split whose arguments fix it (``split([2, 3])``). Any other
        length is unknown while tracing: a ``TypeError``, on which ``list(proxy)`` goes on to
        iterate (:meth:`_FallbackTracer.iter`)."""
        count = split_count(self.node)
        if count is None or _split_name(self.node) == "chunk":  # (may split into fewer)
            raise TypeError(f"the length of {self.node.name} is not known while tracing")
        return count


def _augmented(op: Callable[[Any, Any], Any]) -> Callable[[fx.Proxy, Any], fx.Proxy]:
    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    return method


_AUGMENTED = (
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift,
)  # fmt: skip
for _op in _AUGMENTED:
    setattr(_FaithfulProxy, f"__{_op.__name__}__", _augmented(_op))

# A tensor (a buffer read as a plain tensor) written with a graph value (``t[0] = x.mean()``,
# ``t += x.sum()``) reaches torch.fx as the method ``__setitem__`` / ``__iadd__``: recorded as
# the operator, whose write the in-place analysis knows (``repfx.ir.graph.writes_in_place``).
_WRITING_DUNDERS = {f"__{op.__name__}__": op for op in (*_AUGMENTED, operator.setitem)}


class _FallbackTracer(fx.Tracer):
    """Traces through modules where it can; turns modules it cannot trace into leaves, and
    keeps submodules with forward hooks as leaves (so that the hooks run).

    ``proxy_buffers``: buffers are read as graph values, so that an in-place write to one
    (``self.calls.add_(1)``) is recorded rather than run once on the real buffer while
    tracing, and what the forward computes from one is computed by the graph (see
    :func:`capture`); ``True`` for every buffer, or the ``id`` of each buffer to read so."""

    def __init__(self, proxy_buffers: Proxied = False) -> None:
        super().__init__(autowrap_functions=GUARDS)  # (a folded module's guards)
        self.opaque: dict[str, str] = {}
        self.proxy_buffer_attributes = bool(proxy_buffers)
        self._proxied = proxy_buffers

    def _reads_as_graph_value(self, value: Any) -> bool:
        if isinstance(value, nn.Parameter):
            return True
        if not isinstance(value, torch.Tensor) or not self._proxied:
            return False
        return self._proxied is True or id(value) in self._proxied

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _FaithfulProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, *rest, **more) -> Any:
        """As ``fx.Tracer.create_proxy``; a writing dunder method becomes its operator."""
        if kind == "call_method" and target in _WRITING_DUNDERS:
            kind, target = "call_function", _WRITING_DUNDERS[target]
        return super().create_proxy(kind, target, args, kwargs, *rest, **more)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """As ``fx.Tracer.getattr``, with a name lookup built once instead of a scan of every
        parameter per access (which makes tracing quadratic in model size)."""
        is_tensor = self._reads_as_graph_value(attr_val)
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

    def iter(self, obj: fx.Proxy) -> Iterator[fx.Proxy]:
        """``list(x.chunk(2, 1))``, ``for t in x.split([2, 3])``: a split into at most ``n``
        parts iterates as ``n`` indexed parts (``torch.fx`` traces only tuple unpacking). Where
        the tensor splits into fewer (``chunk`` of a short axis), the missing part's index
        raises ``IndexError`` when the graph runs, never silently."""
        count = split_count(obj.node)
        if count is None:
            return super().iter(obj)
        return iter([obj[i] for i in range(count)])

    def create_args_for_root(
        self, root_fn: Callable[..., Any], is_module: bool, concrete_args: Any = None
    ) -> tuple[Callable[..., Any], list[Any]]:
        """As ``fx.Tracer.create_args_for_root``; an output holding containers ``torch.fx``
        would rebuild as their base types (a ``ModelOutput``, an ``OrderedDict``) is traced as
        its leaves, and the graph's code rebuilds the containers (:mod:`.outputs`).

        ``*args`` / ``**kwargs`` named in ``concrete_args`` (as ``"*args": ()``) are traced as
        those empty values rather than as proxies (which ``torch.fx`` cannot iterate), and
        the graph takes no such argument."""
        concrete_args, empty_varargs = _split_varargs(concrete_args)
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        args = [_empty_if_named(a, empty_varargs) for a in args]

        def traced(*inputs: Any) -> Any:
            out = fn(*inputs)
            flat = None if isinstance(self.graph._codegen, _PyTreeCodeGen) else flat_output(out)
            if flat is None:
                return out
            leaves, spec = flat
            self.graph._codegen = RestoreOutputContainers(spec)
            return leaves

        return traced, args

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


_SPLITS = {"chunk", "split", "tensor_split"}
_PART_KEYWORDS = {"chunks", "split_size", "split_size_or_sections", "sections", "indices"}


def _split_name(node: fx.Node) -> str | None:
    """``"chunk"`` for ``x.chunk(...)`` and ``torch.chunk(x, ...)``; likewise the other splits."""
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", None)
    else:
        return None
    return name if name in _SPLITS else None


def split_count(node: fx.Node) -> int | None:
    """The most parts ``node`` (a ``chunk`` / ``split`` / ``tensor_split`` call) splits into,
    where its arguments fix it: ``chunk(n)`` at most ``n``, ``split([a, b])`` 2,
    ``tensor_split(n)`` ``n``, ``tensor_split([i, j])`` 3. ``None`` where the count depends on a
    size (``split(2)``) or the node splits nothing."""
    name = _split_name(node)
    if name is None:
        return None
    named = [v for k, v in node.kwargs.items() if k in _PART_KEYWORDS]
    parts = node.args[1] if len(node.args) > 1 else next(iter(named), None)
    if isinstance(parts, (list, tuple)) and all(isinstance(p, int) for p in parts):
        return len(parts) + (name == "tensor_split")
    if isinstance(parts, int) and not isinstance(parts, bool) and name != "split":
        return parts
    return None


def _split_varargs(concrete_args: Any) -> tuple[Any, dict[str, Any]]:
    """``concrete_args`` without its ``*args`` / ``**kwargs`` entries, and those entries."""
    if not isinstance(concrete_args, dict):
        return concrete_args, {}
    starred = {k: v for k, v in concrete_args.items() if k.startswith("*")}
    rest = {k: v for k, v in concrete_args.items() if not k.startswith("*")}
    return (rest or None), starred


def _empty_if_named(arg: Any, empty_varargs: dict[str, Any]) -> Any:
    """The value ``empty_varargs`` gives the placeholder ``arg`` traces (erasing the
    placeholder), or ``arg``."""
    node = getattr(arg, "node", None)
    if not isinstance(node, fx.Node) or node.op != "placeholder":
        return arg
    if node.target not in empty_varargs:
        return arg
    node.graph.erase_node(node)
    return empty_varargs[node.target]


def capture(
    model: nn.Module, defaults: dict[str, Any] | None = None
) -> tuple[fx.GraphModule, dict[str, str]]:
    """Trace ``model`` (already repfx's copy). Returns the graph module and the paths of
    modules kept as opaque leaves, with the reason each could not be traced.

    ``defaults``: arguments of ``forward`` the example inputs leave at their default values
    (``mask=None``), traced as those constants (``torch.fx`` concrete arguments) rather than
    as inputs that may be anything (which takes ``if mask is not None`` for true).

    Refuses hooks it cannot honour, bakes deterministic parametrizations, and rewrites in-place
    ops out of place where that is exact, marking the others (see the module docstring).

    Buffers are read as plain tensors first (control flow on one stays possible). Where the
    trace computed something from a tensor the graph writes when it runs (:mod:`.live_state`:
    ``2 * self.bn.running_mean`` beside a training-mode batch norm, ``self.count.float()``
    beside ``self.count += 1``), torch.fx would keep the value it had while tracing: the model
    is traced again with those buffers as graph values, and refused where the read does not go
    through a buffer (a plain tensor attribute naming the same memory)."""
    refuse_hooks(model)
    bake_parametrizations(model)
    state, bindings = SavedState(unrecorded_tensors(model)), Bindings(model)
    proxied: Proxied = False
    attributes = set(vars(model))
    while True:
        try:
            tracer, eager, proxied = _trace_recording_writes(
                model, state, bindings, proxied, defaults
            )
        except CaptureError as exc:
            raise _explained(exc, model, proxied) from exc
        gm = fx.GraphModule(tracer.root, tracer.graph, class_name=type(model).__name__)
        functionalize(gm)
        frozen = eager.read & keys_of(live_tensors(gm))
        created = {n for n in set(vars(model)) - attributes if n.startswith("_tensor_constant")}
        if not frozen:
            copy_written_constants(gm, created)
            return gm, tracer.opaque
        names = _names_of(model, frozen)
        for name in created:  # (stored by the trace now discarded)
            delattr(model, name)
        proxied = _proxy_more(model, proxied, frozen, names)


def _refuse_frozen_draws(model: nn.Module, eager: EagerReads) -> None:
    """A random op the trace ran eagerly drew its numbers once: the graph would return that
    draw on every call."""
    if eager.random:
        raise CaptureError(
            f"{type(model).__name__}.forward draws random numbers ({eager.random[0]}) from "
            "arguments torch.fx does not record, such as torch.randn(4): the folded module "
            "would repeat one draw on every call. Draw from the input (torch.randn_like(x), "
            "x.new_empty(4).normal_())"
        )


def _trace_recording_writes(
    model: nn.Module,
    state: SavedState,
    bindings: Bindings,
    proxied: Proxied,
    defaults: dict[str, Any] | None,
) -> tuple[_FallbackTracer, EagerReads, Proxied]:
    """Trace; where the forward wrote to a buffer while being traced (torch.fx ran that write
    on the real buffer instead of recording it), put it back and trace again with every buffer
    as a graph value. A write no trace records is refused. Returns the buffers read as graph
    values too."""
    tracer, eager = _trace_keeping_bindings(model, bindings, proxied, defaults)
    changed = _written_while_tracing(model, state, eager)  # (each put back as it was)
    _refuse_frozen_draws(model, eager)
    if changed and proxied is not True:
        proxied = True
        tracer, eager = _trace_keeping_bindings(model, bindings, proxied, defaults)
        changed = _written_while_tracing(model, state, eager)
    if not changed:
        return tracer, eager, proxied
    raise CaptureError(
        f"{type(model).__name__}.forward writes to {', '.join(changed)} through a "
        "tensor torch.fx does not record (a plain tensor attribute, or one sharing "
        "memory with it): the write would be lost. Register that tensor as a buffer "
        "(module.register_buffer(name, tensor))"
    )


def _written_while_tracing(model: nn.Module, state: SavedState, eager: EagerReads) -> list[str]:
    """The module tensors a trace wrote to (by value, or by an in-place op that left the value
    as it was), each put back as it was."""
    changed = state.restore()
    return changed or [n for n, t in unrecorded_tensors(model) if storage_key(t) in eager.written]


def _names_of(model: nn.Module, keys: set[int]) -> str:
    """The names of the tensors of ``model`` whose memory is in ``keys`` (three at most)."""
    names = [name for name, t in module_tensors(model) if storage_key(t) in keys]
    names = [n for n in names if not n.startswith("_tensor_constant")]  # (the trace's own)
    return ", ".join(names[:3]) or "a tensor it creates and writes in place"


def _proxy_more(model: nn.Module, proxied: Proxied, frozen: set[int], names: str) -> Proxied:
    """``proxied`` with every buffer whose memory is in ``frozen`` (memory the graph writes,
    which the trace computed from, known by ``names``); a :class:`CaptureError` when that adds
    none, as the trace read that memory through a name torch.fx cannot make a graph value."""
    wanted = {id(t) for _, t in model.named_buffers() if storage_key(t) in frozen}
    if proxied is not True and not wanted <= (proxied or frozenset()):
        return frozenset(wanted | (proxied or frozenset()))
    raise CaptureError(
        f"{type(model).__name__}.forward computes a value from {names} while "
        "torch.fx traces it, through a name torch.fx cannot read as a graph value (a plain "
        "tensor attribute sharing that memory, a module's _buffers), and the model writes that "
        "memory when it runs (running statistics of a training-mode norm, an in-place "
        "update): the folded module would keep the value it had at capture time. Read it "
        "through the buffer itself (self.bn.running_mean), or register the tensor as a buffer"
    )


def _explained(error: CaptureError, model: nn.Module, proxied: Proxied) -> CaptureError:
    """``error``, saying which buffers the failed trace read as graph values, and why."""
    if not isinstance(proxied, frozenset):
        return error
    names = [name for name, b in model.named_buffers() if id(b) in proxied]
    return CaptureError(
        f"{error}; traced with {', '.join(names[:3])} as graph values, as the model writes "
        "them when it runs and the forward computes from them (read as plain tensors, torch.fx "
        "would keep the values they had at capture time)"
    )


def _trace_keeping_bindings(
    model: nn.Module, bindings: Bindings, proxy_buffers: Proxied, defaults: dict[str, Any] | None
) -> tuple[_FallbackTracer, EagerReads]:
    """:func:`_trace`, then every buffer or tensor attribute the forward assigned to bound back
    to its tensor. An assignment the graph records as an in-place update of that same tensor
    (``self.n += 1`` on a traced buffer) is kept; any other would be lost: refused."""
    try:
        with EagerReads() as eager:
            tracer = _trace(model, proxy_buffers, defaults)
    finally:
        rebound = bindings.rebound()
    lost = [name for name, value in rebound if not _updates_in_place(value, name)]
    if lost:
        raise CaptureError(
            f"{type(model).__name__}.forward assigns a new tensor to {', '.join(lost)} "
            "(self.name = ...): torch.fx records no assignment to an attribute, and the "
            "folded module would keep the old one. Update it in place instead "
            "(self.name.copy_(...), self.name.add_(1))"
        )
    return tracer, eager


def _updates_in_place(value: object, name: str) -> bool:
    """Is ``value`` (what the forward assigned to ``name``) the graph's in-place update of that
    tensor itself (``self.n += 1``: ``iadd`` of ``get_attr n``)?"""
    if not isinstance(value, fx.Proxy):
        return False
    node = value.node
    source = node.args[0] if node.args else None
    return (
        writes_in_place(node)
        and isinstance(source, fx.Node)
        and source.op == "get_attr"
        and source.target == name
    )


def _trace(
    model: nn.Module, proxy_buffers: Proxied, defaults: dict[str, Any] | None
) -> _FallbackTracer:
    tracer = _FallbackTracer(proxy_buffers)
    try:
        tracer.trace(model, concrete_args=defaults or None)
    except Exception as exc:
        raise CaptureError(
            f"cannot trace {type(model).__name__}.forward with torch.fx ({one_line(exc)})"
        ) from exc
    _defaults_checked_by_repfx(tracer.graph)
    return tracer


def _defaults_checked_by_repfx(graph: fx.Graph) -> None:
    """torch.fx checks that an argument traced at its default ``None`` is still ``None`` with
    its own ``_assert_is_none``, which raises a bare ``AssertionError`` (and which a graph
    module loaded twice by ``torch.load`` cannot find): :func:`require_none` instead."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target is _assert_is_none:
            value, message = node.args  # ("labels has been specialized to have value None…")
            node.target, node.args = require_none, (value, str(message).partition(" ")[0])
