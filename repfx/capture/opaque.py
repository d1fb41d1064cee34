"""May a child of an untraceable module be replaced by its folded ``GraphModule``?

``repfx.fold`` keeps a submodule whose ``forward`` cannot be traced as an opaque leaf, and
folds each of its children on its own. Swapping a child ``parent.<name>`` for a folded
``GraphModule`` is exact only if the parent's code does nothing with the child but call it:
the folded module computes the same function, but it has other attributes, parameters, type,
length, items and submodules.

:func:`child_reason` decides this from what the parent's code can reach, not from how its
source is spelled. It reads the bytecode of the class's ``forward`` and of every method and
property of the parent class that code may reach (``self.helper(...)``, ``self.prop``,
``super().forward(...)``, functions nested in them, comprehensions), whatever the name of their
first parameter. Every load of ``self`` must be immediately followed by an attribute access
(``self.<attr>``); the only access allowed on the child is a direct call ``self.<child>(...)``
(bytecode ``LOAD_METHOD`` / method-form ``LOAD_ATTR``, which Python emits only for a call).
Anything else is a reason:

* ``self`` escaping — passed to a function (``getattr(self, name)``, ``helper(self)``,
  ``vars(self)``), stored, rebound, or reached through ``locals()`` / frames;
* the child read as a value — ``self.block[0]``, ``for m in self.block``, ``len(self.block)``,
  ``self.block.weight``, ``self.block.forward(x)`` (a ``ModuleList`` / ``ModuleDict`` /
  indexed ``Sequential`` child is therefore refused);
* ``nn.Module`` machinery that reaches children — ``self.children()``, ``self._modules``,
  ``self.named_modules()``, ``self.apply(...)``, ``self.__dict__``;
* an instance attribute other than the child that holds it (``self.layers = [self.a]``), or
  another module of the tree that holds the child or the parent;
* forward hooks on the parent whose code reads the module they are given, global hooks,
  and classes that override ``__call__`` / ``__getattr__`` / ``__getattribute__``.
"""

from __future__ import annotations

import dis
import functools
import sys
import types
from collections.abc import Iterator
from typing import Any

from torch import nn

from ..ir.graph import global_forward_hooks

_SELF_LOADS = {"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_BORROW", "LOAD_DEREF", "LOAD_CLOSURE"}
_PAIR_LOADS = {"LOAD_FAST_LOAD_FAST", "LOAD_FAST_BORROW_LOAD_FAST_BORROW"}
_SELF_STORES = {"STORE_FAST", "DELETE_FAST", "STORE_DEREF", "DELETE_DEREF", "STORE_FAST_LOAD_FAST"}
_ATTR_LOADS = {"LOAD_ATTR", "LOAD_METHOD"}
_CALLS = {"PRECALL", "CALL", "CALL_FUNCTION"}
_INTROSPECTION_GLOBALS = {"locals", "vars", "globals", "eval", "exec", "compile", "__import__"}
_FRAME_ATTRS = {"_getframe", "currentframe", "f_locals", "f_back", "f_globals"}
_CALL_MACHINERY = ("__call__", "_call_impl", "_wrapped_call_impl", "__getattr__")
_CALL_MACHINERY += ("__getattribute__",)
_CONTAINERS = (list, tuple, set, frozenset, dict)
_MAX_DEPTH = 4  # how deep attribute containers are searched for the child


def child_reason(parent: nn.Module, name: str) -> str | None:
    """Why the child ``name`` of ``parent`` (a module kept as an opaque leaf) may not be replaced
    by a folded ``GraphModule``; ``None`` when it may (the parent only ever calls it)."""
    child = parent._modules.get(name)
    if child is None:
        return f"{name!r} is not a child module of {type(parent).__name__}"
    for reason in _static_reasons(parent, name, child):
        return reason
    holders = _attributes_holding(parent, child) | {"_modules", "_parameters", "_buffers"}
    analysis = _Analysis(type(parent), name, holders)
    if not has_own_forward(parent):
        return f"{type(parent).__name__} has no forward of its own"
    forward_owner = _defining_class(type(parent), "forward")
    return analysis.function(forward_owner.__dict__["forward"], forward_owner, "forward")


def has_own_forward(module: nn.Module) -> bool:
    """Does ``module``'s class define a ``forward`` (``nn.ModuleList`` / ``ModuleDict`` do not)?"""
    owner = _defining_class(type(module), "forward")
    return owner is not None and owner not in nn.Module.__mro__


def descent_reason(parent: nn.Module, name: str) -> str | None:
    """Why the child ``name`` of ``parent``, which the parent's code reaches other than by
    calling it (and which therefore stays as it is), may not have its own children replaced
    even where a run of the parent shows the replacements change nothing (``repfx.fold_inside``):
    code other than the parent's may reach it (another path to it, a module holding it, global
    hooks), and a run of the parent would not show what that code does. ``None``: only the
    parent's code (and its hooks) can reach the child."""
    child = parent._modules.get(name)
    if child is None:
        return f"{name!r} is not a child module of {type(parent).__name__}"
    if global_forward_hooks():
        return "global module forward hooks are registered"
    return next(_other_holder_reasons(parent, name, child), None)


def _static_reasons(parent: nn.Module, name: str, child: nn.Module) -> Iterator[str]:
    """Reasons that need no code reading: hooks, call machinery, other holders of the child."""
    yield from _hook_reasons(parent)
    yield from _call_override_reasons(parent)
    yield from _other_holder_reasons(parent, name, child)


def _hook_reasons(parent: nn.Module) -> Iterator[str]:
    """Global forward hooks, and hooks of the parent that read the module they are given."""
    if global_forward_hooks():
        yield "global module forward hooks are registered"
    for hook in _hooks_of(parent):
        if _hook_reads_module(hook):
            yield "a forward hook of the parent reads the module it is given"


def _call_override_reasons(parent: nn.Module) -> Iterator[str]:
    """Call machinery (``__call__``, ``__getattr__``, ...) overridden by the parent's class, or
    a ``forward`` / ``__call__`` replaced on the instance."""
    for attr in _CALL_MACHINERY:
        owner = _defining_class(type(parent), attr)
        if owner is not None and owner not in nn.Module.__mro__:
            yield f"{type(parent).__name__} overrides {attr}"
    if "forward" in vars(parent) or "__call__" in vars(parent):
        yield "the parent's forward is replaced on the instance"


def _other_holder_reasons(parent: nn.Module, name: str, child: nn.Module) -> Iterator[str]:
    """Other paths to the child in the parent's tree, and modules outside the child that hold
    a reference to the child or the parent."""
    for path, module in parent.named_modules(remove_duplicate=False):
        if module is child and path != name:
            yield f"the child is also reachable as {path or 'the parent'}"
        elif module is not parent and not _inside(path, name) and _holds(module, child, parent):
            yield f"{path} holds a reference to the child or the parent"


def _inside(path: str, name: str) -> bool:
    return path == name or path.startswith(f"{name}.")


def _hooks_of(module: nn.Module) -> list[Any]:
    return [
        *getattr(module, "_forward_hooks", {}).values(),
        *getattr(module, "_forward_pre_hooks", {}).values(),
    ]


def _hook_reads_module(hook: Any) -> bool:
    """Does a hook's code read its first argument (the module)? Unknown callables: assume so."""
    bound = 0
    while isinstance(hook, (functools.partial, types.MethodType)):
        if isinstance(hook, types.MethodType):
            bound, hook = bound + 1, hook.__func__
        else:
            bound, hook = bound + len(hook.args), hook.func
    code = getattr(hook, "__code__", None)
    if not isinstance(hook, types.FunctionType) or code is None or code.co_argcount <= bound:
        return True
    module_arg = code.co_varnames[bound]
    return module_arg in code.co_cellvars or any(
        ins.opname in _SELF_LOADS and ins.argval == module_arg for ins in dis.get_instructions(code)
    )


def _holds(module: nn.Module, *targets: nn.Module) -> bool:
    """Does a non-module attribute of ``module`` hold one of ``targets``?"""
    return any(
        _contains(value, targets, _MAX_DEPTH)
        for key, value in vars(module).items()
        if key not in ("_modules", "_parameters", "_buffers")
    )


def _attributes_holding(parent: nn.Module, child: nn.Module) -> set[str]:
    """Instance attributes of ``parent`` (besides its module registry) that hold ``child``."""
    return {
        key
        for key, value in vars(parent).items()
        if key != "_modules" and _contains(value, (child,), _MAX_DEPTH)
    }


def _contains(value: Any, targets: tuple[nn.Module, ...], depth: int) -> bool:
    if any(value is t for t in targets):
        return True
    if depth == 0 or not isinstance(value, _CONTAINERS):
        return False
    items = [*value.keys(), *value.values()] if isinstance(value, dict) else list(value)
    return any(_contains(item, targets, depth - 1) for item in items)


def _defining_class(cls: type, attr: str) -> type | None:
    """The class of ``cls``'s MRO whose ``__dict__`` defines ``attr``."""
    return next((c for c in cls.__mro__ if attr in vars(c)), None)


class _Analysis:
    """Reads the code reachable from the parent's ``forward`` (see the module docstring)."""

    def __init__(self, cls: type, child: str, holders: set[str]):
        self.cls, self.child, self.holders = cls, child, holders
        self.seen: set[types.CodeType] = set()

    # --------------------------------------------------------------------- functions

    def function(self, value: Any, owner: type, what: str) -> str | None:
        """A method (``self`` is its first positional parameter) defined in ``owner``."""
        if isinstance(value, (staticmethod, classmethod)):
            return None  # never receives the instance
        if isinstance(value, property):
            accessors = [f for f in (value.fget, value.fset, value.fdel) if f is not None]
            return next(filter(None, (self.function(f, owner, what) for f in accessors)), None)
        if not isinstance(value, types.FunctionType):
            return f"{what} of {owner.__name__} is not a plain function (cannot be read)"
        code = value.__code__
        if code in self.seen:
            return None
        self.seen.add(code)
        if code.co_argcount < 1:
            return f"{what} of {owner.__name__} takes the instance through *args"
        return self.code(code, {code.co_varnames[0]}, owner, what)

    def code(self, code: types.CodeType, selves: set[str], owner: type, what: str) -> str | None:
        instructions = list(dis.get_instructions(code))
        for i in range(len(instructions)):
            reason = self.instruction(instructions, i, selves, owner, what)
            if reason is not None:
                return reason
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                nested = {s for s in selves if s in const.co_freevars}
                reason = self.code(const, nested, owner, what)
                if reason is not None:
                    return reason
        return None

    # ------------------------------------------------------------------ instructions

    def instruction(
        self, instructions: list[dis.Instruction], i: int, selves: set[str], owner: type, what: str
    ) -> str | None:
        ins = instructions[i]
        where = f"{what} of {owner.__name__}"
        reason = _instance_escape(ins, selves, where)
        if reason is not None:
            return reason
        if ins.opname == "LOAD_GLOBAL" and ins.argval == "super":
            return self.zero_argument_super(instructions, i, selves, owner, where)
        if not _loads_self(ins, selves) or ins.opname == "LOAD_CLOSURE":
            return None  # a closure over self: the nested code is read too
        return self.self_use(instructions, i + 1, owner, where)

    def self_use(
        self, instructions: list[dis.Instruction], j: int, owner: type, where: str
    ) -> str | None:
        """What the instruction after a load of ``self`` does with it."""
        nxt = instructions[j] if j < len(instructions) else None
        if nxt is None:
            return f"{where} passes its instance on"
        if nxt.opname in _ATTR_LOADS:
            return self.attribute(nxt.argval, _is_method_load(nxt), where)
        if nxt.opname in ("COPY", "DUP_TOP") and j + 1 < len(instructions):
            after = instructions[j + 1]  # self.attr += ... : read, then store the same attribute
            if after.opname in _ATTR_LOADS and nxt.argval in (1, None):
                return self.attribute(after.argval, False, where)
        if nxt.opname in ("STORE_ATTR", "DELETE_ATTR"):
            return self.attribute(nxt.argval, False, where, storing=True)
        if nxt.opname == "LOAD_SUPER_ATTR":
            return self.super_attribute(nxt.argval, owner, where)
        return f"{where} passes its instance on (self followed by {nxt.opname})"

    def zero_argument_super(
        self, instructions: list[dis.Instruction], i: int, selves: set[str], owner: type, where: str
    ) -> str | None:
        """``super().attr`` before Python 3.12: ``super`` reads the instance from the frame."""
        if any(ins.opname == "LOAD_SUPER_ATTR" for ins in instructions[i + 1 : i + 4]):
            return None  # Python ≥ 3.12: read where the instance is loaded
        j = i + 1
        while j < len(instructions) and instructions[j].opname in _CALLS:
            if instructions[j].arg not in (0, None):
                return f"{where} calls super() with arguments"
            j += 1
        if j >= len(instructions) or instructions[j].opname not in _ATTR_LOADS or not selves:
            return f"{where} uses super() in a way that cannot be read"
        return self.super_attribute(instructions[j].argval, owner, where)

    # -------------------------------------------------------------------- attributes

    def attribute(self, attr: str, is_call: bool, where: str, storing: bool = False) -> str | None:
        """``self.<attr>`` (loaded, or stored to when ``storing``)."""
        if attr == self.child:
            if is_call and not storing:
                return None
            return f"{where} uses self.{attr} other than by calling it"
        if attr in self.holders or attr.startswith("__"):
            return f"{where} reads self.{attr}, which reaches the child"
        owner = _defining_class(self.cls, attr)
        if owner is None:
            return None  # an instance attribute: another submodule, a tensor, a setting
        if owner in nn.Module.__mro__:
            return f"{where} uses nn.Module.{attr}, which can reach every child"
        return self.function(owner.__dict__[attr], owner, attr) if _is_code(owner, attr) else None

    def super_attribute(self, attr: str, owner: type, where: str) -> str | None:
        """``super().<attr>`` in a method of ``owner``: resolved past ``owner`` in the MRO."""
        mro = self.cls.__mro__
        rest = mro[mro.index(owner) + 1 :] if owner in mro else ()
        found = next((c for c in rest if attr in vars(c)), None)
        if found is None or found in nn.Module.__mro__:
            return f"{where} calls super().{attr}, which can reach every child"
        return self.function(found.__dict__[attr], found, attr)


def _instance_escape(ins: dis.Instruction, selves: set[str], where: str) -> str | None:
    """How one instruction, on its own, lets the code reach the instance other than by an
    attribute access: rebinding it, introspection, frames, passing it on; ``None``: it does not."""
    if ins.opname in _SELF_STORES and _names(ins.argval) & selves:
        return f"{where} rebinds or deletes its instance"
    if ins.opname == "LOAD_GLOBAL" and ins.argval in _INTROSPECTION_GLOBALS:
        return f"{where} calls {ins.argval}(), which can reach the instance"
    if ins.opname in _ATTR_LOADS and ins.argval in _FRAME_ATTRS:
        return f"{where} inspects frames"
    if ins.opname in _PAIR_LOADS and ins.argval[0] in selves:
        return f"{where} passes its instance on"
    return None


def _loads_self(ins: dis.Instruction, selves: set[str]) -> bool:
    """Does the instruction push the instance (alone, or last of a pair of loads)?"""
    return (ins.opname in _SELF_LOADS and ins.argval in selves) or (
        ins.opname in _PAIR_LOADS and ins.argval[-1] in selves
    )


def _names(argval: Any) -> set[str]:
    return set(argval) if isinstance(argval, tuple) else {argval}


def _is_method_load(ins: dis.Instruction) -> bool:
    """``LOAD_METHOD`` (≤ 3.11) or method-form ``LOAD_ATTR`` (≥ 3.12): emitted only for a call
    ``obj.attr(...)``."""
    if ins.opname == "LOAD_METHOD":
        return True
    return ins.opname == "LOAD_ATTR" and ins.arg is not None and _method_flag(ins.arg)


def _method_flag(arg: int) -> bool:
    return sys.version_info >= (3, 12) and bool(arg & 1)


def _is_code(owner: type, attr: str) -> bool:
    value = owner.__dict__[attr]
    return isinstance(value, (types.FunctionType, property, staticmethod, classmethod)) or (
        hasattr(type(value), "__get__")
    )
