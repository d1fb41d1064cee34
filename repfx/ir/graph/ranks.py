"""Graph utilities shared by views and passes: module lookup, constants, ranks, use counts.

Ranks: with example inputs, ``ShapeProp`` metadata gives every node's shape. Without them,
:func:`annotate_ranks` infers ranks structurally: ConvNd / BatchNormNd (N ≥ 2) / poolNd outputs
have rank N + 2 (repfx assumes batched inputs there — pass example inputs to have this
checked), rank-preserving ops (activations, norms, linear, elementwise arithmetic) keep their
input's rank, ``permute`` / ``view`` / ``reshape`` / ``flatten`` compute it. Anything else is
unknown, and folds that need it are skipped with a reason. Casts (``x.long()``, ``x.to(dtype)``,
``x.view(dtype)``) keep the rank and set the floating flag from the dtype they produce.

Constants: a node is a constant when it depends only on module attributes through torch /
operator calls that neither write to a tensor nor draw random numbers (see
:class:`ConstantFolder`); capture marks every node that an in-place op may write to
(:data:`MUTATED_KEY`), and such a node is never a constant.

Plain modules: a module is treated as the ``torch.nn`` class it derives from only when it
provably behaves as that class (:func:`is_plain`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import types
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..norms import NORM_FUNCTIONS, NORM_MODULES

RANK_KEY = "repfx_rank"
FLOAT_KEY = "repfx_float"
# node.meta entries that describe a node's value (shape propagation, dynamo, export)
VALUE_KEYS = ("tensor_meta", "val", "example_value")
MUTATED_KEY = "repfx_mutated"  # node.meta: an in-place op may write to this value (capture)


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    return gm.get_submodule(node.target)


def has_hooks(module: nn.Module) -> bool:
    """Forward hooks and pre-hooks (with or without kwargs, ``always_call`` or not) observe and
    may change a module's inputs and outputs: such a module is never rewritten or removed, since
    its hooks would then see different values. Global module hooks
    (``torch.nn.modules.module.register_module_forward_hook`` / ``_pre_hook``) count for every
    module. Backward hooks do not run in eval-mode inference, state-dict hooks never change
    values: neither counts."""
    return bool(
        getattr(module, "_forward_hooks", None)
        or getattr(module, "_forward_pre_hooks", None)
        or global_forward_hooks()
    )


def global_forward_hooks() -> list[str]:
    """The kinds of global module forward hooks registered now (empty when none is)."""
    module = nn.modules.module
    found = []
    if getattr(module, "_global_forward_hooks", None):
        found.append("global forward hooks (register_module_forward_hook)")
    if getattr(module, "_global_forward_pre_hooks", None):
        found.append("global forward pre-hooks (register_module_forward_pre_hook)")
    return found


# ------------------------------------------------------------------------- plain modules

# Methods a subclass may override without changing what ``forward`` computes from the state.
_INERT_OVERRIDES = frozenset(
    {
        "__init__",
        "extra_repr",
        "reset_parameters",
        "_reset_parameters",
        "reset_running_stats",
        "_load_from_state_dict",
        "__setstate__",
        "__repr__",
        "_get_name",
    }
)
# Class bookkeeping Python adds to every class dict.
_CLASS_BOOKKEEPING = frozenset(
    {
        "__module__",
        "__qualname__",
        "__doc__",
        "__dict__",
        "__weakref__",
        "__annotations__",
        "__firstlineno__",
        "__static_attributes__",
        "__orig_bases__",
        "__parameters__",
        "__constants__",
        "__abstractmethods__",
        "_abc_impl",
        "_version",
    }
)


def is_plain(module: nn.Module, bases: type | tuple[type, ...]) -> bool:
    """Does ``module`` provably compute what the ``torch.nn`` class in ``bases`` it derives
    from computes (given its state: weights, stride, eps, ...)?

    True when neither its class nor the instance changes any behaviour of that base: every
    class between it and the base overrides only inert methods (``__init__``, ``extra_repr``,
    ``reset_parameters``, ``_load_from_state_dict``, ...) and adds only new methods or plain
    data (no property or other descriptor, which could shadow an attribute ``forward`` reads);
    no mixin sits between the base and ``nn.Module`` in the MRO; and the instance does not
    rebind a method. A subclass overriding ``_conv_forward``, ``_check_input_dim`` or
    ``forward``, or a parametrized module (its weight is a property), is not plain.
    """
    candidates = bases if isinstance(bases, tuple) else (bases,)
    base = next((b for b in candidates if isinstance(module, b)), None)
    if base is None or not _class_is_plain(type(module), base):
        return False
    return not any(callable(getattr(base, name, None)) for name in vars(module))


@functools.cache
def _class_is_plain(cls: type, base: type) -> bool:
    mro = cls.__mro__
    if mro[mro.index(base) :] != base.__mro__:
        return False  # a mixin between the base and nn.Module
    return all(
        _inert_entry(base, name, value)
        for klass in mro[: mro.index(base)]
        for name, value in vars(klass).items()
    )


def _inert_entry(base: type, name: str, value: Any) -> bool:
    """Can this class-dict entry of a subclass of ``base`` leave ``base``'s behaviour as is?"""
    if name in _INERT_OVERRIDES or name in _CLASS_BOOKKEEPING:
        return True
    if isinstance(value, (types.FunctionType, staticmethod, classmethod)):
        return not hasattr(base, name)  # a new method: base's code never calls it
    if hasattr(type(value), "__get__"):
        return False  # a property or other descriptor may shadow what forward reads
    return not callable(getattr(base, name, None))


def op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """What ``node`` computes, in a word: its module's class, or its function / method name."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def where(node: fx.Node) -> str:
    """A readable location: the module path of the op, and the node name for functions."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = next(reversed(stack.values()))[0]
        if path:
            return f"{path}:{node.name}"
    return node.name


# ----------------------------------------------------------------------------- constants


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
        if node.meta.get(MUTATED_KEY):
            return None
        if node.op == "get_attr":
            value = fetch_attr(self.gm, node.target)
            return value if isinstance(value, torch.Tensor) else None
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
        if torch.Tag.nondeterministic_seeded in func.tags or func._schema.is_mutable:
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


def is_inplace_name(name: str) -> bool:
    """``relu_``, ``add_``, ``F.elu_``: PyTorch's spelling of an op that writes to its input."""
    return name.endswith("_") and not name.endswith("__")


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
    ``repfx.capture.fx``."""
    if node.op not in ("call_function", "call_method"):
        return False
    if "out" in node.kwargs:
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


def fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def owner_and_name(gm: fx.GraphModule, target: str) -> tuple[nn.Module, str]:
    path, _, name = target.rpartition(".")
    return (gm.get_submodule(path) if path else gm), name


# ----------------------------------------------------------------------------- use counts


def tensor_use_counts(gm: fx.GraphModule, consts: ConstantFolder) -> Counter[int]:
    """How many call sites read each parameter / buffer (keyed by ``id(tensor)``).

    A module called twice counts each of its tensors twice; a ``get_attr`` counts once per
    non-constant op that consumes it, directly or through constant expressions such as
    ``gamma.view(1, -1, 1, 1)``.
    """
    uses: Counter[int] = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            for t in _module_tensors(module_of(gm, node)):
                uses[id(t)] += 1
        elif node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                uses[id(value)] += max(1, len(consumers_through_constants(node, consts)))
    return uses


def consumers_through_constants(node: fx.Node, consts: ConstantFolder) -> list[fx.Node]:
    """The non-constant nodes that read ``node``, looking through constant expressions."""
    found: list[fx.Node] = []
    stack = list(node.users)
    while stack:
        user = stack.pop()
        if consts.is_constant(user):
            stack.extend(user.users)
        elif user not in found:
            found.append(user)
    return found


def attr_tensors_read_by(node: fx.Node, consts: ConstantFolder) -> list[torch.Tensor]:
    """The module tensors that a ``call_function`` / ``call_method`` node reads through its
    constant inputs."""
    out: list[torch.Tensor] = []
    stack = [n for n in node.all_input_nodes if consts.is_constant(n)]
    while stack:
        n = stack.pop()
        if n.op == "get_attr":
            out.append(fetch_attr(consts.gm, n.target))
        else:
            stack.extend(n.all_input_nodes)
    return out


def _module_tensors(m: nn.Module) -> list[torch.Tensor]:
    return [*m.parameters(), *(b for b in m.buffers() if b is not None)]


def module_call_counts(gm: fx.GraphModule) -> Counter[str]:
    """Call sites per module object (keyed by the node target of its first path)."""
    by_id: Counter[int] = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            by_id[id(module_of(gm, node))] += 1
    counts: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = by_id[id(module_of(gm, node))]
    return counts


# ----------------------------------------------------------------------------- ranks


def _meta_tensor(node: fx.Node) -> Any:
    """What is recorded about the value of ``node``: ``tensor_meta`` (shape propagation), or the
    fake tensor dynamo / export attach (``val`` / ``example_value``); ``None`` when neither."""
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return meta
    for key in VALUE_KEYS[1:]:
        value = node.meta.get(key)
        if isinstance(value, torch.Tensor):
            return value
    return None


def rank_of(node: Any) -> int | None:
    if not isinstance(node, fx.Node):
        return None
    meta = _meta_tensor(node)
    if meta is not None:
        return len(meta.shape)
    return node.meta.get(RANK_KEY)


def known_dtype(node: Any) -> torch.dtype | None:
    """The dtype of ``node``'s value when shapes were recorded, else ``None``."""
    meta = _meta_tensor(node) if isinstance(node, fx.Node) else None
    return None if meta is None else meta.dtype


class _UnknownOperand(Exception):
    pass


def dtype_on_meta_tensors(node: fx.Node) -> torch.dtype | None:
    """The dtype a torch function / tensor method node computes, found by running it on meta
    tensors with its tensor operands' recorded dtypes and ranks (every size 1, so that any
    broadcast works; ranks matter to type promotion: a 0-d tensor promotes like a scalar).
    ``None`` when an operand's dtype or rank is unknown, or the op does not run on meta."""
    if node.op == "call_function" and not is_torch_callable(node.target):
        return None
    if node.op not in ("call_function", "call_method"):
        return None

    def on_meta(arg: fx.Node) -> torch.Tensor:
        dtype, rank = known_dtype(arg), rank_of(arg)
        if dtype is None or rank is None:
            raise _UnknownOperand
        return torch.empty((1,) * rank, dtype=dtype, device="meta")

    try:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), on_meta)
        if node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            out = node.target(*args, **kwargs)
    except Exception:  # an unknown operand, or an op meta tensors do not support
        return None
    return out.dtype if isinstance(out, torch.Tensor) else None


def is_floating(node: Any) -> bool:
    """True only when ``node`` is known to be a floating-point tensor (recorded dtype, or the
    structural flag :data:`FLOAT_KEY`); unknown is ``False``."""
    if not isinstance(node, fx.Node):
        return False
    dtype = known_dtype(node)
    if dtype is not None:
        return dtype.is_floating_point
    return bool(node.meta.get(FLOAT_KEY, False))


def static_shape(node: Any) -> tuple[int, ...] | None:
    """The recorded shape of ``node`` when every dim is a plain int (not symbolic)."""
    meta = _meta_tensor(node) if isinstance(node, fx.Node) else None
    if meta is None or not all(type(d) is int for d in meta.shape):
        return None
    return tuple(meta.shape)


_FIXED_RANK_MODULES: tuple[tuple[type, int], ...] = (
    (nn.Conv1d, 3),
    (nn.Conv2d, 4),
    (nn.Conv3d, 5),
    (nn.ConvTranspose1d, 3),
    (nn.ConvTranspose2d, 4),
    (nn.ConvTranspose3d, 5),
    (nn.BatchNorm2d, 4),
    (nn.BatchNorm3d, 5),
    (nn.MaxPool1d, 3),
    (nn.MaxPool2d, 4),
    (nn.MaxPool3d, 5),
    (nn.AvgPool1d, 3),
    (nn.AvgPool2d, 4),
    (nn.AvgPool3d, 5),
    (nn.AdaptiveAvgPool1d, 3),
    (nn.AdaptiveAvgPool2d, 4),
    (nn.AdaptiveAvgPool3d, 5),
)
_FLOAT_MODULES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    *NORM_MODULES,
)
_RANK_PRESERVING_MODULES = (
    nn.Linear,
    *NORM_MODULES,
    nn.BatchNorm1d,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.Mish,
    nn.ELU,
    nn.PReLU,
    nn.Softmax,
)
_ELEMENTWISE_FUNCS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.addcmul,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    F.relu,
    F.gelu,
    F.silu,
    F.hardswish,
    F.hardsigmoid,
    *NORM_FUNCTIONS,
    F.batch_norm,
    F.linear,
    F.dropout,
    F.softmax,
    F.leaky_relu,
    F.mish,
}
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "addcmul", "relu", "sigmoid", "tanh", "contiguous", "softmax",
    "clone", "mul_", "add_", "sub_", "div_", "neg",
}  # fmt: skip
_FLOAT_FUNCS = {F.gelu, *NORM_FUNCTIONS, F.batch_norm, F.linear, F.conv1d, F.conv2d}
_CONV_FUNC_RANKS = {F.conv1d: 3, F.conv2d: 4, F.conv3d: 5}

# Casts keep the rank; the value is floating exactly when the dtype they produce is.
_CAST_DTYPES: dict[str, torch.dtype] = {
    "float": torch.float32,
    "double": torch.float64,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "long": torch.int64,
    "int": torch.int32,
    "short": torch.int16,
    "char": torch.int8,
    "byte": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_ARG_METHODS = {"to", "type", "view"}  # x.to(dtype), x.type(dtype), x.view(dtype)


def annotate_ranks(gm: fx.GraphModule) -> None:
    """Store a structurally inferred rank (and whether the value is floating) on every node.

    Constant expressions (``gamma.unsqueeze(-1)``, ``gamma[:, None, None]``) get their value's.
    Inference never fails: what cannot be inferred (symbolic shape arithmetic, unknown ops) is
    unknown (``None``, not floating).
    """
    consts = ConstantFolder(gm)
    for node in gm.graph.nodes:
        value = consts.value(node)
        if value is not None:
            rank, is_float = value.dim(), value.is_floating_point()
        else:
            rank, is_float = _infer(gm, node)
        node.meta[RANK_KEY] = rank if type(rank) is int else None
        node.meta[FLOAT_KEY] = bool(is_float)


def forget_annotations(module: nn.Module) -> None:
    """Remove what :func:`annotate_ranks` stored from every graph in ``module``'s tree: the
    annotations serve the passes, and a returned graph's ``node.meta`` holds no repfx keys."""
    for gm in module.modules():
        if isinstance(gm, fx.GraphModule):
            for node in gm.graph.nodes:
                node.meta.pop(RANK_KEY, None)
                node.meta.pop(FLOAT_KEY, None)


def _infer(gm: fx.GraphModule, node: fx.Node) -> tuple[int | None, bool]:
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    in_float = any(n.meta.get(FLOAT_KEY, False) for n in node.all_input_nodes)
    if node.op == "get_attr":
        value = fetch_attr(gm, node.target)
        if isinstance(value, torch.Tensor):
            return value.dim(), value.is_floating_point()
        return None, False
    if node.op == "call_module":
        return _infer_module(module_of(gm, node), first, in_float)
    if node.op == "call_function":
        return _infer_function(node, first, in_float)
    if node.op == "call_method" and isinstance(node.target, str):
        return _infer_method(node, first, in_float)
    return None, False


def _infer_module(m: nn.Module, first: fx.Node | None, in_float: bool) -> tuple[int | None, bool]:
    """Modules that provably are the ``torch.nn`` class they derive from (:func:`is_plain`)."""
    is_float = is_plain(m, _FLOAT_MODULES) or in_float
    for base, rank in _FIXED_RANK_MODULES:
        if is_plain(m, base):
            return rank, is_float  # batched input assumed
    if is_plain(m, _RANK_PRESERVING_MODULES):
        return rank_of(first), is_float
    if is_plain(m, nn.Flatten):
        return _flatten_rank(rank_of(first), m.start_dim, m.end_dim), is_float
    return None, False


def _infer_function(
    node: fx.Node, first: fx.Node | None, in_float: bool
) -> tuple[int | None, bool]:
    target = node.target
    if target in _CONV_FUNC_RANKS:
        return _CONV_FUNC_RANKS[target], True
    if target in _ELEMENTWISE_FUNCS:
        return _max_rank(node), in_float or target in _FLOAT_FUNCS
    if target is torch.flatten:
        start = arg_of(node, 1, "start_dim", 0)
        end = arg_of(node, 2, "end_dim", -1)
        return _flatten_rank(rank_of(first), start, end), in_float
    if target in _REDUCTIONS:
        return _reduced_rank(node, rank_of(first)), in_float
    if target is torch.permute:
        return _shape_arg_len(node), in_float
    return None, False


def _infer_method(node: fx.Node, first: fx.Node | None, in_float: bool) -> tuple[int | None, bool]:
    target = node.target
    cast = _cast_result(node, first)
    if cast is not None:
        return rank_of(first), cast
    if target in _ELEMENTWISE_METHODS:
        return _max_rank(node), in_float
    if target in ("permute", "view", "reshape"):
        return _shape_arg_len(node), in_float
    if target in _REDUCTIONS:
        return _reduced_rank(node, rank_of(first)), in_float
    if target == "transpose":
        return rank_of(first), in_float
    if target == "flatten":
        start = arg_of(node, 1, "start_dim", 0)
        end = arg_of(node, 2, "end_dim", -1)
        return _flatten_rank(rank_of(first), start, end), in_float
    return None, False


def _max_rank(node: fx.Node) -> int | None:
    ranks = [rank_of(n) for n in node.all_input_nodes]
    return None if not ranks or None in ranks else max(ranks)


def dtype_argument(node: fx.Node) -> Any:
    """The dtype a ``view`` / ``to`` / ``type`` call converts to: a ``torch.dtype``, a node that
    may be one (``x.to(y.dtype)``, ``x.to(y)``), or ``None`` when it certainly converts to none
    (``x.view(2, 3)``, ``x.to("cpu")``)."""
    if node.op != "call_method" or node.target not in _DTYPE_ARG_METHODS:
        return None
    if "dtype" in node.kwargs:
        return node.kwargs["dtype"]
    args = node.args[1:]
    if node.target == "view":
        if len(args) == 1 and not isinstance(args[0], (int, tuple, list, torch.Size)):
            return args[0]  # a dtype, or a node that may be one
        return None
    for arg in args:
        if isinstance(arg, (torch.dtype, fx.Node)):
            return arg
    return None


def _cast_result(node: fx.Node, first: fx.Node | None) -> bool | None:
    """Is the result of a cast floating? ``None`` when ``node`` is not a cast."""
    target = node.target
    if target in _CAST_DTYPES:
        return _CAST_DTYPES[target].is_floating_point
    if target == "type_as" and len(node.args) == 2:
        return is_floating(node.args[1])
    if target not in _DTYPE_ARG_METHODS or (target == "type" and len(node.args) == 1):
        return None  # not a cast (x.type() is the type's name, not a tensor)
    dtype = dtype_argument(node)
    if dtype is None:
        # x.view(sizes) is no cast; x.to("cpu") keeps the dtype; x.type("torch.HalfTensor")
        # converts to a dtype named by a string: unknown
        return None if target == "view" else is_floating(first) if target == "to" else False
    if isinstance(dtype, torch.dtype):
        return dtype.is_floating_point
    if isinstance(dtype, fx.Node) and known_dtype(dtype) is not None:
        return is_floating(dtype)  # x.to(other_tensor)
    return False  # converts to a dtype known only at run time


_REDUCTIONS = {torch.mean, torch.sum, torch.amax, "mean", "sum", "amax"}


def _reduced_rank(node: fx.Node, rank: int | None) -> int | None:
    """Rank after ``x.mean(dims, keepdim)`` and friends."""
    dims = arg_of(node, 1, "dim", None)
    keepdim = arg_of(node, 2, "keepdim", False)
    if type(rank) is not int or not isinstance(keepdim, bool):
        return None
    dims = (dims,) if type(dims) is int else dims
    if not isinstance(dims, (tuple, list)) or not dims or any(type(d) is not int for d in dims):
        return None
    if keepdim:
        return rank
    return rank - len({d % rank for d in dims}) if rank > 0 else None


def arg_of(node: fx.Node, index: int, name: str, default: Any) -> Any:
    """Argument ``index`` of a call, or its keyword ``name``, or ``default``."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _flatten_rank(rank: int | None, start: Any, end: Any) -> int | None:
    if type(rank) is not int or type(start) is not int or type(end) is not int:
        return None
    if rank == 0:
        return 1  # flattening a 0-d tensor gives a 1-d one
    start, end = start % rank, end % rank
    return rank - (end - start) if start <= end else None


def _shape_arg_len(node: fx.Node) -> int | None:
    """Rank produced by ``x.view(a, b, c)`` / ``x.view((a, b, c))`` / ``x.permute(...)``."""
    dims = node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    elif len(dims) == 1 and isinstance(dims[0], fx.Node):
        return None  # a shape computed at run time
    if any(isinstance(d, torch.dtype) for d in dims):
        return None
    return len(dims) or None


_SHAPE_METHODS = {"size", "dim"}
_SHAPE_LIKE_METHODS = {"reshape_as", "view_as", "expand_as"}


def reads_only_shape(user: fx.Node, node: fx.Node) -> bool:
    """True when ``user`` reads nothing of ``node`` but its shape (``x.shape``, ``x.size()``,
    ``y.reshape_as(x)``): such a use survives any rewrite that keeps ``node``'s shape."""
    if user.op == "call_function" and user.target is getattr:
        return user.args[0] is node and user.args[1:] in (("shape",), ("ndim",))
    if user.op == "call_method" and user.target in _SHAPE_METHODS:
        return user.args[0] is node
    if user.op == "call_method" and user.target in _SHAPE_LIKE_METHODS:
        return user.args[0] is not node and all(a is node for a in user.args[1:])
    return False


def shape_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read only its shape."""
    return [u for u in node.users if reads_only_shape(u, node)]


def value_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values (not only its shape)."""
    return [u for u in node.users if not reads_only_shape(u, node)]
