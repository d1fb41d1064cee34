"""What a bytecode instruction does, by kind: the one table capture's code readers consult.

Two readers prove things from a function's bytecode: :mod:`.opaque` (the parent of a child left
opaque only ever calls the child) and :mod:`.hooks` (a forward hook only computes out of place,
or never reads the module it is given). CPython's opcodes change from one release to the next:
``LOAD_METHOD`` became a form of ``LOAD_ATTR`` and ``LOAD_SUPER_ATTR`` appeared in 3.12,
``PRECALL`` lived in 3.11 only, 3.12 and 3.13 added ``LOAD_FAST_CHECK``, ``LOAD_FAST_AND_CLEAR``
and the superinstructions ``LOAD_FAST_LOAD_FAST`` / ``STORE_FAST_LOAD_FAST``, 3.13 pushes a
closure's cells with ``LOAD_FAST``, 3.14 adds ``LOAD_FAST_BORROW`` and ``LOAD_SMALL_INT``. So
the readers never name an opcode: :func:`instructions` gives each instruction a :class:`Kind`
and, where it takes variables, the variables whose values it pushes, those it binds or deletes
and those whose cells it pushes. It reads

* ``dis``'s own metadata: ``dis.haslocal`` / ``dis.hasfree`` (the opcodes that take a local,
  cell or free variable), ``argval`` (the variable, or a tuple of them for a superinstruction),
  ``argrepr`` (``+=`` for an augmented ``BINARY_OP``);
* families by their words: a variable opcode is one ``LOAD_*`` / ``STORE_*`` / ``DELETE_*`` part
  per variable it names (``STORE_FAST_LOAD_FAST``: store the first, push the second; a
  ``*_AND_CLEAR`` load also unbinds), a ``BINARY_*`` opcode computes out of place, an
  ``INPLACE_*`` one (before 3.11) writes;
* :data:`_BY_NAME`: the few opnames whose meaning is the same in every release that has them.

It is conservative: an instruction it does not know is :attr:`Kind.UNKNOWN`, which every reader
takes to do anything (the instance escapes, the hook writes), and a variable opcode it cannot
split into parts is taken to both read and rebind every variable it names. A new opcode makes a
reader refuse, never accept.
"""

from __future__ import annotations

import dis
import enum
import re
import sys
import types
from dataclasses import dataclass
from typing import Any


class Kind(enum.Enum):
    VARIABLE = "pushes, binds or deletes local, cell or free variables"
    CELL = "pushes a variable's cell, to build a closure"
    NEUTRAL = "touches no value"
    COMPUTE = "pushes a constant, computes out of place, pops or returns: writes nothing"
    IN_PLACE = "augmented arithmetic (a += b): may write to its operand"
    GLOBAL = "pushes a global or builtin, by name"
    IMPORT = "imports a module, or a name from one"
    ATTRIBUTE = "reads obj.name (for a call or as a value)"
    ATTRIBUTE_STORE = "sets or deletes obj.name"
    SUPER_ATTRIBUTE = "reads super().name (zero-argument super; super(cls, obj).name is UNKNOWN)"
    DUPLICATE = "pushes a copy of the top of the stack"
    CALL = "calls, with as many arguments as its argument says"
    UNKNOWN = "anything"


_COMPUTE = (
    "LOAD_CONST", "LOAD_SMALL_INT", "RETURN_VALUE", "RETURN_CONST", "POP_TOP", "UNARY_NEGATIVE",
    "BUILD_TUPLE", "BUILD_LIST", "BUILD_SLICE", "LIST_EXTEND", "LIST_TO_TUPLE",
)  # fmt: skip
_BY_NAME: dict[str, Kind] = {
    **dict.fromkeys(
        ("RESUME", "NOP", "CACHE", "EXTENDED_ARG", "MAKE_CELL", "COPY_FREE_VARS"), Kind.NEUTRAL
    ),
    "LOAD_CLOSURE": Kind.CELL,
    **dict.fromkeys(_COMPUTE, Kind.COMPUTE),
    **dict.fromkeys(("LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS"), Kind.GLOBAL),
    **dict.fromkeys(("IMPORT_NAME", "IMPORT_FROM"), Kind.IMPORT),
    **dict.fromkeys(("LOAD_ATTR", "LOAD_METHOD"), Kind.ATTRIBUTE),
    **dict.fromkeys(("STORE_ATTR", "DELETE_ATTR"), Kind.ATTRIBUTE_STORE),
    "DUP_TOP": Kind.DUPLICATE,
    # calls whose argument counts their arguments (not CALL_FUNCTION_EX, whose argument is flags)
    **dict.fromkeys(("PRECALL", "CALL", "CALL_FUNCTION"), Kind.CALL),
}
_VARIABLE_OPCODES = frozenset(dis.haslocal) | frozenset(dis.hasfree)
_PARTS = re.compile(r"_(?=(?:LOAD|STORE|DELETE)_)")  # STORE_FAST_LOAD_FAST → STORE_FAST, LOAD_FAST


@dataclass(frozen=True)
class Instruction:
    """One instruction, as the readers see it."""

    kind: Kind
    opname: str  # for messages only: readers decide by ``kind``
    arg: int | None
    argval: Any
    loads: tuple[str, ...] = ()  # variables whose values it pushes, in order (the last on top)
    stores: tuple[str, ...] = ()  # variables it binds or deletes
    cells: tuple[str, ...] = ()  # variables whose cells it pushes (to build a closure)
    method_call: bool = False  # an attribute read that Python emits only to call it

    @property
    def pure(self) -> bool:
        """Does it only push, compute out of place, pop or return (write nothing, call nothing
        but an operator)?"""
        if self.kind is Kind.VARIABLE:
            return not self.stores and not self.cells
        return self.kind in (Kind.NEUTRAL, Kind.COMPUTE)


def instructions(code: types.CodeType) -> list[Instruction]:
    """The instructions of ``code`` (not of the code nested in it), classified."""
    return [_classify(ins, code.co_cellvars) for ins in dis.get_instructions(code)]


def _classify(ins: dis.Instruction, cellvars: tuple[str, ...]) -> Instruction:
    kind = _BY_NAME.get(ins.opname)
    if kind is Kind.CELL:
        return Instruction(kind, ins.opname, ins.arg, ins.argval, cells=_names(ins.argval))
    if kind is None and ins.opcode in _VARIABLE_OPCODES:
        return _variable(ins, cellvars)
    if kind is None:
        kind = _by_family(ins)
    method_call = kind is Kind.ATTRIBUTE and _is_method_load(ins)
    return Instruction(kind, ins.opname, ins.arg, ins.argval, method_call=method_call)


def _by_family(ins: dis.Instruction) -> Kind:
    name = ins.opname
    if name == "LOAD_SUPER_ATTR":  # (3.12+) the second-lowest bit: super(cls, obj), not super()
        return Kind.UNKNOWN if ins.arg is None or ins.arg & 2 else Kind.SUPER_ATTRIBUTE
    if name == "COPY":
        return Kind.DUPLICATE if ins.arg == 1 else Kind.UNKNOWN
    if name == "BINARY_OP":  # argrepr: the operator, "+", "+=", "[]" (3.14's subscript)
        augmented = not ins.argrepr or ins.argrepr.endswith("=")
        return Kind.IN_PLACE if augmented else Kind.COMPUTE
    if name.startswith("INPLACE_"):  # before 3.11
        return Kind.IN_PLACE
    if name.startswith("BINARY_") and "INPLACE" not in name:  # BINARY_SUBSCR, BINARY_SLICE, ...
        return Kind.COMPUTE
    return Kind.UNKNOWN


def _variable(ins: dis.Instruction, cellvars: tuple[str, ...]) -> Instruction:
    """An opcode that takes variables, split into one load / store / delete part per variable.
    A ``LOAD_FAST*`` part on a cell variable pushes the cell (3.13's closures; the cell's value
    is read by ``LOAD_DEREF``)."""
    names = _names(ins.argval)
    parts = _PARTS.split(ins.opname)
    if len(parts) != len(names) or not all(p.startswith(_PART_WORDS) for p in parts):
        return Instruction(Kind.UNKNOWN, ins.opname, ins.arg, ins.argval, names, names)
    loads, stores, cells = [], [], []
    for part, name in zip(parts, names, strict=True):
        if part.startswith("LOAD_FAST") and name in cellvars:
            cells.append(name)
        elif part.startswith("LOAD_"):
            loads.append(name)
        if not part.startswith("LOAD_") or "CLEAR" in part:
            stores.append(name)
    return Instruction(
        Kind.VARIABLE, ins.opname, ins.arg, ins.argval, tuple(loads), tuple(stores), tuple(cells)
    )


_PART_WORDS = ("LOAD_", "STORE_", "DELETE_")


def _names(argval: Any) -> tuple[str, ...]:
    return tuple(argval) if isinstance(argval, tuple) else (argval,)


def _is_method_load(ins: dis.Instruction) -> bool:
    """``LOAD_METHOD`` (≤ 3.11) or method-form ``LOAD_ATTR`` (≥ 3.12, the low bit of its
    argument): emitted only for a call ``obj.attr(...)``."""
    if ins.opname == "LOAD_METHOD":
        return True
    return sys.version_info >= (3, 12) and ins.arg is not None and bool(ins.arg & 1)
