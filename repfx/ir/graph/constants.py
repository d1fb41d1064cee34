"""Which nodes are constants, and which calls write to their inputs.

A node is a constant when it depends only on module attributes through torch / operator calls
that neither write to a tensor nor draw random numbers (:class:`ConstantFolder`, which evaluates
it); capture marks every node that an in-place op may write to (:data:`MUTATED_KEY`), and such a
node — or any ``get_attr`` of a tensor whose memory one of them holds — is never a constant.
The in-place analysis (:func:`writes_in_place`, :func:`inplace_flag`, :func:`is_inplace_name`,
:func:`call_signature`) also serves capture, which rewrites in-place ops to their out-of-place
forms.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
from typing import Any

import torch
from torch import fx
from torch.utils._python_dispatch import TorchDispatchMode

from .aten import draws_random
from .memory import storage_key
from .modules import fetch_attr

MUTATED_KEY = "repfx_mutated"  # node.meta: an in-place op may write to this value (capture)
# node.meta: a private tensor handed last to code that may write to it (capture); a rewrite may
# replace it only by a value that shares memory with nothing else (the commit point checks)
HANDED_KEY = "repfx_handed_to_unknown_code"


def may_be_written(node: fx.Node) -> bool:
    """Capture marked ``node`` as written, or handed to code that may write to it."""
    return bool(node.meta.get(MUTATED_KEY) or node.meta.get(HANDED_KEY))


class ConstantFolder:
    """Evaluates nodes that depend only on module attributes (``get_attr``), e.g.
    ``self.gamma[:, None, None]`` or ``self.gamma.view(1, -1, 1, 1)``.

    Only calls of torch / ``operator`` callables are evaluated, and only those that provably
    compute the same value on every run without side effects (:func:`may_evaluate`): no
    in-place or ``out=`` form, no node capture marked as possibly written to
    (:data:`MUTATED_KEY`), and — checked on the ATen ops each call actually dispatches, before
    each one runs — no op that draws random numbers (``torch.Tag.nondeterministic_seeded``:
    ``rand_like``, ``bernoulli``, training-mode dropout, ``normal_``, ``multinomial``, ...),
    writes to a tensor (a mutable schema) or returns uninitialised memory (``empty*``).
    A placeholder (a graph input, or a parameter that arrives as one) is never a constant.

    Results are memoised, except a ``get_attr``'s own value, which is always re-read: passes
    overwrite an attribute in place only when its single reader is the op being rewritten
    (``repfx.passes.rewrite.set_slot``), so no memoised derived value can go stale, and whether
    a node is constant never changes. One folder serves a pass from start to end.
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self._cache: dict[fx.Node, torch.Tensor | None] = {}
        self._written: set[int] | None = None

    def written(self, tensor: torch.Tensor) -> bool:
        """Does the graph write to ``tensor``'s memory? A module tensor one ``get_attr`` writes
        (capture marked it, :data:`MUTATED_KEY`: ``self.bn.running_mean[:2] += 1``,
        ``self.w.data.mul_(2)``) is written for every other reader too — another ``get_attr``
        of it, or the module that owns it — so it is judged by storage."""
        if self._written is None:
            self._written = {
                storage_key(value)
                for n in self.gm.graph.nodes
                if n.op == "get_attr"
                and may_be_written(n)
                and isinstance(value := fetch_attr(self.gm, n.target), torch.Tensor)
            }
        return bool(self._written) and storage_key(tensor) in self._written

    def value(self, arg: Any) -> torch.Tensor | None:
        if not isinstance(arg, fx.Node):
            return None
        if arg.op == "get_attr":
            return self._evaluate(arg)
        # Inputs first, iteratively (a long chain must not exhaust the Python stack), and only
        # until one is known not to be constant.
        stack = [arg]
        while stack:
            node = stack[-1]
            if node in self._cache:
                stack.pop()
                continue
            if node.op in ("call_function", "call_method"):
                inputs = node.all_input_nodes
                if any(n not in self._cache and n.op != "get_attr" for n in inputs):
                    known_none = any(self._cache.get(n, 0) is None for n in inputs)
                    if not known_none:
                        stack.append(
                            next(n for n in inputs if n not in self._cache and n.op != "get_attr")
                        )
                        continue
            self._cache[node] = self._evaluate(node)
            stack.pop()
        return self._cache[arg]

    def is_constant(self, arg: Any) -> bool:
        return self.value(arg) is not None

    def _evaluate(self, node: fx.Node) -> torch.Tensor | None:
        if may_be_written(node):
            return None
        if node.op == "get_attr":
            return self._attribute(node)
        inputs = node.all_input_nodes
        if not inputs or node.op not in ("call_function", "call_method"):
            return None  # e.g. torch.ones(...) factories: not worth folding
        values = {
            n: self._evaluate(n) if n.op == "get_attr" else self._cache.get(n) for n in inputs
        }
        if any(v is None for v in values.values()) or not may_evaluate(node):
            return None
        args = fx.node.map_arg(node.args, values.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, values.__getitem__)
        guard = contextlib.nullcontext() if _known_pure(node) else _DeterministicOnly()
        try:
            with torch.no_grad(), guard:
                if node.op == "call_method":
                    out = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    out = node.target(*args, **kwargs)
        except Exception:  # an impure op (_ImpureOp), or any failure: not a constant
            return None
        return out if isinstance(out, torch.Tensor) else None

    def _attribute(self, node: fx.Node) -> torch.Tensor | None:
        """A ``get_attr``'s tensor, unless the graph writes to its memory."""
        value = fetch_attr(self.gm, node.target)
        return value if isinstance(value, torch.Tensor) and not self.written(value) else None


class _ImpureOp(RuntimeError):
    pass


# Layout and arithmetic ops that are deterministic and write nothing, whatever their arguments
# (in-place forms are refused before): evaluated without the dispatch-mode check, which costs a
# Python round trip per ATen op (and, the first time, an import of torch._dynamo).
_PURE_NAMES = frozenset(
    {
        "view", "reshape", "unsqueeze", "squeeze", "permute", "transpose", "flatten", "expand",
        "expand_as", "view_as", "reshape_as", "contiguous", "getitem", "mul", "add", "sub",
        "truediv", "div", "neg", "reciprocal", "rsqrt", "sqrt", "pow", "abs", "t",
    }
)  # fmt: skip


def _known_pure(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _PURE_NAMES
    return getattr(node.target, "__name__", "").strip("_") in _PURE_NAMES and (
        getattr(node.target, "__module__", None) in ("_operator", "operator", "torch")
        or node.target in (torch.mul, torch.add, torch.sub, torch.div, torch.reshape)
    )


_UNINITIALISED = frozenset(
    {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
)


class _DeterministicOnly(TorchDispatchMode):
    """Refuses every ATen op that is random or writes to a tensor (before it runs), or that
    returns uninitialised memory (an ``empty*`` of any elements: the zero-element workspace
    ``F.batch_norm`` allocates holds no value)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if draws_random(func) or func._schema.is_mutable:
            raise _ImpureOp(str(func))
        out = func(*args, **(kwargs or {}))
        name = func.name().split("::")[-1].split(".")[0]
        if name in _UNINITIALISED and not (isinstance(out, torch.Tensor) and out.numel() == 0):
            raise _ImpureOp(str(func))
        return out


_INPLACE_OPERATORS = frozenset(
    {
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        operator.ifloordiv,
        operator.imod,
        operator.ipow,
        operator.iand,
        operator.ior,
        operator.ixor,
        operator.ilshift,
        operator.irshift,
        operator.imatmul,
        operator.iconcat,
        operator.setitem,
        operator.delitem,
    }
)


# The same operators called as methods (``t.__iadd__(y)``, ``t.__setitem__(i, v)``), as a graph
# from another tracer may record them.
_INPLACE_DUNDERS = frozenset(f"__{op.__name__}__" for op in _INPLACE_OPERATORS)


def is_inplace_name(name: str) -> bool:
    """``relu_``, ``add_``, ``F.elu_``: PyTorch's spelling of an op that writes to its input;
    ``__iadd__``, ``__setitem__``: Python's."""
    return (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDERS


@functools.cache
def call_signature(target: Any) -> inspect.Signature | None:
    """``inspect.signature`` of a call target, or ``None`` (a builtin without one)."""
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):
        return None


def inplace_flag(node: fx.Node) -> Any:
    """The ``inplace=`` argument of a call whose target takes one (``F.relu(x, inplace=True)``,
    a ``torch.nn`` module's ``inplace`` attribute is the module's business); ``False`` when the
    target has no such parameter. May be a node (not known before run time)."""
    if node.op != "call_function":
        return False
    sig = call_signature(node.target)
    if sig is None or "inplace" not in sig.parameters:
        return False
    try:
        bound = sig.bind(*node.args, **node.kwargs)
    except TypeError:
        return True  # malformed: assume the worst
    return bound.arguments.get("inplace", sig.parameters["inplace"].default)


def writes_in_place(node: fx.Node) -> bool:
    """Is ``node`` a function / method call that writes to one of its inputs (an in-place name
    such as ``add_``, an augmented-assignment or ``setitem`` operator, an ``out=`` argument, a
    mutable ATen overload, or ``inplace=`` not known to be ``False``)? Modules are judged by
    ``repfx.capture.writes``."""
    if node.op not in ("call_function", "call_method"):
        return False
    if node.kwargs.get("out") is not None:  # (torch.fx records ``out=None`` with the defaults)
        return True
    if node.op == "call_method":
        return not isinstance(node.target, str) or is_inplace_name(node.target)
    target = node.target
    if target in _INPLACE_OPERATORS or is_inplace_name(getattr(target, "__name__", "") or ""):
        return True
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    return inplace_flag(node) is not False


def is_torch_callable(target: Any) -> bool:
    """A torch, ``torch.Tensor`` or ``operator`` callable (not user code, which may have side
    effects a fold would run only once)."""
    if target is getattr:
        return True
    if getattr(target, "__objclass__", None) in (torch._C.TensorBase, torch.Tensor):
        return True
    module = getattr(target, "__module__", None) or ""
    return module.split(".")[0] in ("torch", "_operator", "operator")


def may_evaluate(node: fx.Node) -> bool:
    """May ``node`` be evaluated once, at fold time, in place of every run? (A call of a torch
    or operator callable that writes to nothing; random ops are refused while it runs.)"""
    if node.op not in ("call_function", "call_method") or node.meta.get(MUTATED_KEY):
        return False
    if writes_in_place(node):
        return False
    return node.op == "call_method" or is_torch_callable(node.target)
