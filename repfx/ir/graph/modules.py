"""What a node names in its graph module, and whether that module behaves as its ``torch.nn``
class.

* lookups: :func:`module_of` (the module a ``call_module`` node calls), :func:`fetch_attr` and
  :func:`owner_and_name` (what a dotted attribute path names);
* hooks: :func:`has_hooks`, :func:`global_forward_hooks` (a hooked module is never rewritten);
* plain modules: a module is treated as the ``torch.nn`` class it derives from only when it
  provably behaves as that class (:func:`is_plain`);
* words for reports and reasons: :func:`op_name` (what a node computes), :func:`where` (where).
"""

from __future__ import annotations

import functools
import types
from typing import Any

from torch import fx, nn


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    """The module a ``call_module`` node calls: ``gm.get_submodule(node.target)``, walking the
    module dicts directly (passes look modules up at every node they visit, and
    ``nn.Module.__getattr__`` made that a tenth of a fold's time)."""
    module: nn.Module = gm
    for part in node.target.split("."):
        child = module._modules.get(part)
        if child is None:  # not a registered child: get_submodule's answer, or its error
            return gm.get_submodule(node.target)
        module = child
    return module


def fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def owner_and_name(gm: fx.GraphModule, target: str) -> tuple[nn.Module, str]:
    path, _, name = target.rpartition(".")
    return (gm.get_submodule(path) if path else gm), name


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


# --------------------------------------------------------------------------------- words


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
