"""The bytecode table of ``repfx.capture.bytecode``: instructions read by what they do.

Opcodes of other Python releases are emulated by renaming an instruction of this one (the table
reads ``dis`` metadata, the opname's words and the resolved argument, all of which a renamed
instruction carries), so these run on any Python."""

from __future__ import annotations

import dis
import functools

import pytest
from torch import nn

from repfx.capture import bytecode, child_reason
from repfx.capture.bytecode import Kind, instructions
from repfx.capture.hooks import hook_may_write, hook_reads_module


def _sample(self, x):
    return x


_LOAD = next(i for i in dis.get_instructions(_sample) if i.opname.startswith("LOAD_FAST"))


def _renamed(
    opname: str, argval, opcode: int | None = None, arg=None, argrepr=""
) -> dis.Instruction:
    """An instruction of this Python renamed to ``opname``: a variable opcode by default."""
    return _LOAD._replace(
        opname=opname,
        opcode=_LOAD.opcode if opcode is None else opcode,
        arg=arg,
        argval=argval,
        argrepr=argrepr,
    )


def _classify(ins: dis.Instruction, cellvars: tuple[str, ...] = ()) -> bytecode.Instruction:
    return bytecode._classify(ins, cellvars)


@pytest.mark.parametrize(
    ("opname", "argval", "loads", "stores"),
    [
        ("LOAD_FAST", "self", ("self",), ()),
        ("LOAD_FAST_BORROW", "self", ("self",), ()),  # 3.14
        ("LOAD_FAST_CHECK", "self", ("self",), ()),  # 3.12
        ("LOAD_FAST_LOAD_FAST", ("x", "self"), ("x", "self"), ()),  # 3.13: self on top
        ("LOAD_FAST_BORROW_LOAD_FAST_BORROW", ("self", "x"), ("self", "x"), ()),  # 3.14
        ("STORE_FAST_LOAD_FAST", ("y", "self"), ("self",), ("y",)),  # 3.13: y = ...; self.
        ("STORE_FAST_STORE_FAST", ("a", "b"), (), ("a", "b")),
        ("LOAD_FAST_AND_CLEAR", "t", ("t",), ("t",)),  # 3.12 comprehensions: also unbinds
        ("DELETE_FAST", "self", (), ("self",)),
    ],
)
def test_variable_opcodes_split_into_loads_and_stores(opname, argval, loads, stores):
    ins = _classify(_renamed(opname, argval))
    assert (ins.kind, ins.loads, ins.stores) == (Kind.VARIABLE, loads, stores)
    assert ins.pure == (not stores)


def test_a_fast_load_of_a_cell_pushes_the_cell():
    """3.13 builds a closure with ``LOAD_FAST`` of the cell; the cell's value is ``LOAD_DEREF``."""
    ins = _classify(_renamed("LOAD_FAST", "self"), cellvars=("self",))
    assert (ins.loads, ins.cells) == ((), ("self",))
    assert not ins.pure


def test_what_the_table_does_not_know_does_anything():
    unknown = _classify(_renamed("FROBNICATE", None, opcode=dis.opmap["NOP"]))
    assert unknown.kind is Kind.UNKNOWN and not unknown.pure
    # a variable opcode it cannot split: read and rebound, every variable it names
    odd = _classify(_renamed("SWAP_FAST", ("a", "self")))
    assert (odd.kind, odd.loads, odd.stores) == (Kind.UNKNOWN, ("a", "self"), ("a", "self"))


@pytest.mark.parametrize(
    ("argrepr", "kind"),
    [("+", Kind.COMPUTE), ("+=", Kind.IN_PLACE), ("[]", Kind.COMPUTE), ("", Kind.IN_PLACE)],
)
def test_binary_op_is_read_from_its_operator(argrepr, kind):
    ins = _renamed("BINARY_OP", None, opcode=dis.opmap["NOP"], arg=0, argrepr=argrepr)
    assert _classify(ins).kind is kind


def test_super_attribute_with_arguments_is_not_read():
    """3.12+: ``LOAD_SUPER_ATTR``'s second-lowest bit marks ``super(cls, obj)``."""
    nop = dis.opmap["NOP"]
    zero = _renamed("LOAD_SUPER_ATTR", "forward", opcode=nop, arg=(4 << 2) | 1)
    two = _renamed("LOAD_SUPER_ATTR", "forward", opcode=nop, arg=(4 << 2) | 2 | 1)
    assert _classify(zero).kind is Kind.SUPER_ATTRIBUTE
    assert _classify(two).kind is Kind.UNKNOWN


def test_instructions_of_this_python():
    def forward(self, x):
        return self.a(x) + self.b.weight

    read = instructions(forward.__code__)
    attributes = [(i.argval, i.method_call) for i in read if i.kind is Kind.ATTRIBUTE]
    assert attributes == [("a", True), ("b", False), ("weight", False)]
    assert [i.loads for i in read if i.loads] == [("self",), ("x",), ("self",)]


class _Parent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 1, 1)

    def forward(self, x):
        return self.a(x)


def _scaled(factor, module, args, out):
    return out * factor


def test_an_opcode_the_table_loses_makes_the_readers_refuse(monkeypatch):
    """Conservative: an instruction read as UNKNOWN refuses, it never proves anything safe."""
    assert child_reason(_Parent(), "a") is None
    assert not hook_may_write(functools.partial(_scaled, 2.0))
    assert not hook_reads_module(functools.partial(_scaled, 2.0))
    for opname in ("LOAD_ATTR", "LOAD_METHOD", "LOAD_CONST", "BINARY_OP", "CALL", "PRECALL"):
        monkeypatch.delitem(bytecode._BY_NAME, opname, raising=False)
    monkeypatch.setattr(bytecode, "_by_family", lambda ins: Kind.UNKNOWN)
    assert child_reason(_Parent(), "a") is not None
    assert hook_may_write(functools.partial(_scaled, 2.0))
