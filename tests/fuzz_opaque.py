"""Fuzz blocks: a module no front end captures, whose code reads a container of blocks as a
value (iterates it, indexes it, reads an attribute of each element), and sometimes reads
*inside* an element — the case where replacing what is inside changes what it computes.

The parent's ``forward`` branches on a tensor's value, which stops ``torch.fx`` and
``torch.export`` alike, so repfx keeps it as it is and folds inside it. Its elements are
``Unit`` s (a block of the well-behaved grammar as ``body``, only called by the unit); repfx
must keep the container as it is, and may replace a unit, or a body inside a kept unit, only
where a run of the parent shows nothing changes. The traps (``PEEKS``) read a body's
parameters, test its type, or read an attribute only the original body has.
"""

from __future__ import annotations

import grammar
import torch
from fuzz_common import Block, BlockKind, Shape, key_of
from hypothesis import strategies as st
from torch import nn


class Unit(nn.Module):
    """An element: it only calls its body; ``f`` is read by the parent, as ultralytics' model
    loop reads ``m.f``."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.f = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _gate(x: torch.Tensor) -> torch.Tensor:
    """A branch on a tensor's value (both sides exact: the parent is kept as it is)."""
    return x if bool(torch.isfinite(x).all()) else torch.nan_to_num(x)


class OpaqueContainer(nn.Module):
    """``self.m`` (a ``ModuleList`` / ``ModuleDict`` / ``Sequential``) of units, chained in the
    order stored, reached by the spelling ``reach``; ``peek`` reads inside the first unit."""

    def __init__(self, units: list[Unit], container: str, reach: str, peek: str):
        super().__init__()
        if container == "dict":
            self.m = nn.ModuleDict({f"u{i}": u for i, u in enumerate(units)})
        elif container == "sequential":
            self.m = nn.Sequential(*units)
        else:
            self.m = nn.ModuleList(units)
        self.reach, self.peek = reach, peek
        self.body_type = type(units[0].body).__name__
        units[0].body.tag = 0.5  # an attribute only the original body has

    def units(self) -> list[Unit]:
        if isinstance(self.m, nn.ModuleDict):
            return [u for _, u in self.m.items()]
        if self.reach == "index":
            return [self.m[i] for i in range(len(self.m))]
        return list(self.m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _gate(x)
        if self.reach == "generator":
            y = [x]
            y.extend(u(y[-1]) for u in self.units())
            x = y[-1]
        else:
            for u in self.units():
                x = u(x) if u.f == -1 else x
        return x * self._peeked(self.units()[0]).to(x.dtype)

    def _peeked(self, first: Unit) -> torch.Tensor:
        if self.peek == "weight":
            return 1 + 0.1 * sum(p.float().mean() for p in first.body.parameters())
        if self.peek == "type":
            return torch.tensor(1.0 if type(first.body).__name__ == self.body_type else 2.0)
        if self.peek == "attribute":
            return torch.tensor(first.body.tag)
        return torch.tensor(1.0)


CONTAINERS = ("list", "dict", "sequential")
REACHES = ("loop", "generator", "index")
PEEKS = ("none", "none", "weight", "type", "attribute")  # the honest parent twice as often


@st.composite
def opaque_container(draw, shape: Shape) -> Block:
    state = grammar.State(shape.channels, *shape.spatial)
    units = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(key_of(grammar.BLOCKS))
        body, state, _ = draw(grammar.BLOCKS[name](state))
        units.append(Unit(body))
    container, reach = draw(st.sampled_from(CONTAINERS)), draw(st.sampled_from(REACHES))
    peek = draw(st.sampled_from(PEEKS))
    module = OpaqueContainer(units, container, reach, peek)
    label = f"opaque {container} of {len(units)} reached by {reach}, peek {peek}"
    return Block(module, label)


OPAQUE_KINDS = {"opaque_container": BlockKind(opaque_container)}
