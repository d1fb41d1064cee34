"""Bug class ``special``: signed zeros and non-finite values inside the model.

Random inputs are finite and never zero, but models make such values themselves: ``−relu(y)``
is −0.0 wherever ``y < 0``, ``y · 0`` keeps the sign of ``y``, ``log(relu(y))`` is −inf and
``y / relu(y)`` ±inf or NaN there. A block makes one of them, passes it through an op that
looks like a no-op or an affine (``+ 0`` is not one at −0.0; ``+ (−0.0)`` is), and reads it
with an op that tells the special values apart (``1 / y`` turns −0.0 into −inf, ``atan2``,
``copysign``) or one that does not (``exp``). A rule exact only on finite, non-zero values
shows here as ±inf of the wrong sign, or NaN / ±inf in other places.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from fuzz_common import BATCH_NORM, CONV, Block, BlockKind, Shape, channel_view, key_of
from hypothesis import strategies as st
from torch import nn

Op = Callable[["SpecialValues", torch.Tensor], torch.Tensor]

SOURCES: dict[str, Op] = {
    "-relu(y)": lambda m, y: -torch.relu(y),
    "relu(y) * -s": lambda m, y: torch.relu(y) * -channel_view(m.scale.abs(), m.rank),
    "y * 0": lambda m, y: y * 0.0,
    "log(relu(y))": lambda m, y: torch.log(torch.relu(y)),
    "y / relu(y)": lambda m, y: y / torch.relu(y),
}
MIDDLES: dict[str, Op] = {
    "+ 0": lambda m, y: y + 0,
    "+ 0.0": lambda m, y: y + 0.0,
    "+ (-0.0)": lambda m, y: y + (-0.0),
    "- 0": lambda m, y: y - 0,
    "- (-0.0)": lambda m, y: y - (-0.0),
    "* 1": lambda m, y: y * 1,
    "/ 1.0": lambda m, y: y / 1.0,
    "torch.add(y, 0)": lambda m, y: torch.add(y, 0),
    "0 + y": lambda m, y: 0 + y,
    "channel affine": lambda m, y: (
        y * channel_view(m.scale, m.rank) + channel_view(m.shift, m.rank)
    ),
    "BatchNorm": lambda m, y: m.bn(y),
    "nothing": lambda m, y: y,
}
READERS: dict[str, Op] = {
    "reciprocal": lambda m, y: torch.reciprocal(y),
    "1 / y": lambda m, y: 1 / y,
    "atan2(y, -1)": lambda m, y: torch.atan2(y, -torch.ones_like(y)),
    "copysign(1, y)": lambda m, y: torch.copysign(torch.ones_like(y), y),
    "exp": lambda m, y: torch.exp(y),
    "y * s": lambda m, y: y * channel_view(m.scale, m.rank),
}


class SpecialValues(nn.Module):
    """conv (+ BN) → a source of special values → a middle op → a reader."""

    def __init__(self, shape: Shape, bn: bool, source: str, middle: str, reader: str):
        super().__init__()
        c, self.rank = shape.channels, shape.rank
        self.source, self.middle, self.reader = source, middle, reader
        self.conv = CONV[self.rank](c, c, 1)
        self.conv_bn = BATCH_NORM[self.rank](c) if bn else nn.Identity()
        self.bn = BATCH_NORM[self.rank](c)
        self.scale = nn.Parameter(torch.ones(c))
        self.shift = nn.Parameter(torch.zeros(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = SOURCES[self.source](self, self.conv_bn(self.conv(x)))
        return READERS[self.reader](self, MIDDLES[self.middle](self, y))


@st.composite
def special_values(draw, shape: Shape) -> Block:
    m = SpecialValues(
        shape,
        bn=draw(st.booleans()),
        source=draw(key_of(SOURCES)),
        middle=draw(key_of(MIDDLES)),
        reader=draw(key_of(READERS)),
    )
    return Block(m, f"special values: {m.source} → {m.middle} → {m.reader}")


SPECIAL_KINDS = {"special_values": BlockKind(special_values, ranks=(1, 2, 3), final=True)}
