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
Instructions are read by what they do (:mod:`.bytecode`), not by the opcode names of one
Python release; one the table does not know counts as a use of the instance it cannot read.
Anything else is a reason (a :class:`repfx.ir.match.Fail`):

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

import types
from collections.abc import Iterator
from typing import Any

from torch import nn

from ..ir.graph import global_forward_hooks
from ..ir.match import Fail
from .bytecode import Instruction, Kind, instructions
from .hooks import forward_hooks, hook_reads_module

_INTROSPECTION_GLOBALS = {"locals", "vars", "globals", "eval", "exec", "compile", "__import__"}
_FRAME_ATTRS = {"_getframe", "currentframe", "f_locals", "f_back", "f_globals"}
_CALL_MACHINERY = ("__call__", "_call_impl", "_wrapped_call_impl", "__getattr__")
_CALL_MACHINERY += ("__getattribute__",)
_CONTAINERS = (list, tuple, set, frozenset, dict)
_MAX_DEPTH = 4  # how deep attribute containers are searched for the child


def child_reason(parent: nn.Module, name: str) -> Fail | None:
    """Why the child ``name`` of ``parent`` (a module kept as an opaque leaf) may not be replaced
    by a folded ``GraphModule``; ``None`` when it may (the parent only ever calls it)."""
    child = parent._modules.get(name)
    if child is None:
        return Fail(f"{name!r} is not a child module of {type(parent).__name__}")
    static = next(_static_reasons(parent, name, child), None)
    if static is not None:
        return static
    holders = _attributes_holding(parent, child) | {"_modules", "_parameters", "_buffers"}
    analysis = _Analysis(type(parent), name, holders)
    if not has_own_forward(parent):
        return Fail(f"{type(parent).__name__} has no forward of its own")
    forward_owner = _defining_class(type(parent), "forward")
    return analysis.function(forward_owner.__dict__["forward"], forward_owner, "forward")


def has_own_forward(module: nn.Module) -> bool:
    """Does ``module``'s class define a ``forward`` (``nn.ModuleList`` / ``ModuleDict`` do not)?"""
    owner = _defining_class(type(module), "forward")
    return owner is not None and owner not in nn.Module.__mro__


def descent_reason(parent: nn.Module, name: str) -> Fail | None:
    """Why the child ``name`` of ``parent``, which the parent's code reaches other than by
    calling it (and which therefore stays as it is), may not have its own children replaced
    even where a run of the parent shows the replacements change nothing (``repfx.fold_inside``):
    code other than the parent's may reach it (another path to it, a module holding it, global
    hooks), and a run of the parent would not show what that code does. ``None``: only the
    parent's code (and its hooks) can reach the child."""
    child = parent._modules.get(name)
    if child is None:
        return Fail(f"{name!r} is not a child module of {type(parent).__name__}")
    if global_forward_hooks():
        return Fail("global module forward hooks are registered")
    return next(_other_holder_reasons(parent, name, child), None)


def _static_reasons(parent: nn.Module, name: str, child: nn.Module) -> Iterator[Fail]:
    """Reasons that need no code reading: hooks, call machinery, other holders of the child."""
    yield from _hook_reasons(parent)
    yield from _call_override_reasons(parent)
    yield from _other_holder_reasons(parent, name, child)


def _hook_reasons(parent: nn.Module) -> Iterator[Fail]:
    """Global forward hooks, and hooks of the parent that read the module they are given."""
    if global_forward_hooks():
        yield Fail("global module forward hooks are registered")
    for hook in forward_hooks(parent):
        if hook_reads_module(hook):
            yield Fail("a forward hook of the parent reads the module it is given")


def _call_override_reasons(parent: nn.Module) -> Iterator[Fail]:
    """Call machinery (``__call__``, ``__getattr__``, ...) overridden by the parent's class, or
    a ``forward`` / ``__call__`` replaced on the instance."""
    for attr in _CALL_MACHINERY:
        owner = _defining_class(type(parent), attr)
        if owner is not None and owner not in nn.Module.__mro__:
            yield Fail(f"{type(parent).__name__} overrides {attr}")
    if "forward" in vars(parent) or "__call__" in vars(parent):
        yield Fail("the parent's forward is replaced on the instance")


def _other_holder_reasons(parent: nn.Module, name: str, child: nn.Module) -> Iterator[Fail]:
    """Other paths to the child in the parent's tree, and modules outside the child that hold
    a reference to the child or the parent."""
    for path, module in parent.named_modules(remove_duplicate=False):
        if module is child and path != name:
            yield Fail(f"the child is also reachable as {path or 'the parent'}")
        elif module is not parent and not _inside(path, name) and _holds(module, child, parent):
            yield Fail(f"{path} holds a reference to the child or the parent")


def _inside(path: str, name: str) -> bool:
    return path == name or path.startswith(f"{name}.")


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

    def function(self, value: Any, owner: type, what: str) -> Fail | None:
        """A method (``self`` is its first positional parameter) defined in ``owner``."""
        if isinstance(value, (staticmethod, classmethod)):
            return None  # never receives the instance
        if isinstance(value, property):
            accessors = [f for f in (value.fget, value.fset, value.fdel) if f is not None]
            fails = (self.function(f, owner, what) for f in accessors)
            return next((fail for fail in fails if fail is not None), None)
        if not isinstance(value, types.FunctionType):
            return Fail(f"{what} of {owner.__name__} is not a plain function (cannot be read)")
        code = value.__code__
        if code in self.seen:
            return None
        self.seen.add(code)
        if code.co_argcount < 1:
            return Fail(f"{what} of {owner.__name__} takes the instance through *args")
        return self.code(code, {code.co_varnames[0]}, owner, what)

    def code(self, code: types.CodeType, selves: set[str], owner: type, what: str) -> Fail | None:
        read = instructions(code)
        for i in range(len(read)):
            fail = self.instruction(read, i, selves, owner, what)
            if fail is not None:
                return fail
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                nested = {s for s in selves if s in const.co_freevars}
                fail = self.code(const, nested, owner, what)
                if fail is not None:
                    return fail
        return None

    # ------------------------------------------------------------------ instructions

    def instruction(
        self, read: list[Instruction], i: int, selves: set[str], owner: type, what: str
    ) -> Fail | None:
        ins = read[i]
        where = f"{what} of {owner.__name__}"
        fail = _instance_escape(ins, selves, where)
        if fail is not None:
            return fail
        if ins.kind is Kind.GLOBAL and ins.argval == "super":
            return self.zero_argument_super(read, i, selves, owner, where)
        if not ins.loads or ins.loads[-1] not in selves:
            return None  # (a closure over self pushes its cell: the nested code is read too)
        return self.self_use(read, i + 1, owner, where)

    def self_use(self, read: list[Instruction], j: int, owner: type, where: str) -> Fail | None:
        """What the instruction after a load of ``self`` does with it."""
        nxt = read[j] if j < len(read) else None
        if nxt is None:
            return Fail(f"{where} passes its instance on")
        if nxt.kind is Kind.ATTRIBUTE:
            return self.attribute(nxt.argval, nxt.method_call, where)
        if nxt.kind is Kind.DUPLICATE and j + 1 < len(read):
            after = read[j + 1]  # self.attr += ... : read, then store the same attribute
            if after.kind is Kind.ATTRIBUTE:
                return self.attribute(after.argval, False, where)
        if nxt.kind is Kind.ATTRIBUTE_STORE:
            return self.attribute(nxt.argval, False, where, storing=True)
        if nxt.kind is Kind.SUPER_ATTRIBUTE:
            return self.super_attribute(nxt.argval, owner, where)
        return Fail(f"{where} passes its instance on (self followed by {nxt.opname})")

    def zero_argument_super(
        self, read: list[Instruction], i: int, selves: set[str], owner: type, where: str
    ) -> Fail | None:
        """``super().attr`` before Python 3.12: ``super`` reads the instance from the frame."""
        if any(ins.kind is Kind.SUPER_ATTRIBUTE for ins in read[i + 1 : i + 4]):
            return None  # Python ≥ 3.12: read where the instance is loaded
        j = i + 1
        while j < len(read) and read[j].kind is Kind.CALL:
            if read[j].arg not in (0, None):
                return Fail(f"{where} calls super() with arguments")
            j += 1
        if j >= len(read) or read[j].kind is not Kind.ATTRIBUTE or not selves:
            return Fail(f"{where} uses super() in a way that cannot be read")
        return self.super_attribute(read[j].argval, owner, where)

    # -------------------------------------------------------------------- attributes

    def attribute(self, attr: str, is_call: bool, where: str, storing: bool = False) -> Fail | None:
        """``self.<attr>`` (loaded, or stored to when ``storing``)."""
        if attr == self.child:
            if is_call and not storing:
                return None
            return Fail(f"{where} uses self.{attr} other than by calling it")
        if attr in self.holders or attr.startswith("__"):
            return Fail(f"{where} reads self.{attr}, which reaches the child")
        owner = _defining_class(self.cls, attr)
        if owner is None:
            return None  # an instance attribute: another submodule, a tensor, a setting
        if owner in nn.Module.__mro__:
            return Fail(f"{where} uses nn.Module.{attr}, which can reach every child")
        return self.function(owner.__dict__[attr], owner, attr) if _is_code(owner, attr) else None

    def super_attribute(self, attr: str, owner: type, where: str) -> Fail | None:
        """``super().<attr>`` in a method of ``owner``: resolved past ``owner`` in the MRO."""
        mro = self.cls.__mro__
        rest = mro[mro.index(owner) + 1 :] if owner in mro else ()
        found = next((c for c in rest if attr in vars(c)), None)
        if found is None or found in nn.Module.__mro__:
            return Fail(f"{where} calls super().{attr}, which can reach every child")
        return self.function(found.__dict__[attr], found, attr)


def _instance_escape(ins: Instruction, selves: set[str], where: str) -> Fail | None:
    """How one instruction, on its own, lets the code reach the instance other than by an
    attribute access: rebinding it, introspection, frames, passing it on; ``None``: it does not.
    (An instruction the table cannot read names its variables as both loaded and stored.)"""
    if selves.intersection(ins.stores):
        return Fail(f"{where} rebinds or deletes its instance")
    if ins.kind in (Kind.GLOBAL, Kind.IMPORT) and ins.argval in _INTROSPECTION_GLOBALS:
        return Fail(f"{where} calls {ins.argval}(), which can reach the instance")
    if ins.kind in (Kind.ATTRIBUTE, Kind.GLOBAL, Kind.IMPORT) and ins.argval in _FRAME_ATTRS:
        return Fail(f"{where} inspects frames")
    if selves.intersection(ins.loads[:-1]):  # a pair of loads pushes self under another value
        return Fail(f"{where} passes its instance on")
    return None


def _is_code(owner: type, attr: str) -> bool:
    value = owner.__dict__[attr]
    return isinstance(value, (types.FunctionType, property, staticmethod, classmethod)) or (
        hasattr(type(value), "__get__")
    )
