"""Bug class ``state``: a forward that writes the model's own tensors.

A block writes one of its tensors — a BatchNorm's running statistics or affine, a conv's
weight, a buffer counter — in one of the spellings real code uses (``+=`` on a slice, item
assignment, ``.data.mul_``, ``.copy_``, ``+= 1`` on a buffer), before or after the ops that
read it, and then computes conv → BN (a module, or ``F.batch_norm`` on the block's own
buffers) → a per-channel scale. A fold that reads such a tensor once and folds its value is
wrong from the next call on, so ``fuzz_oracle.judge_calls`` compares several consecutive
calls of the original and the folded model, each pair starting from the same state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from fuzz_common import BATCH_NORM, CONV, Block, BlockKind, Shape, channel_view, key_of
from hypothesis import strategies as st
from torch import nn


def _slice_add(m: StateWritten) -> None:
    m.bn.running_mean[:1] += m.constant


def _item_assignment(m: StateWritten) -> None:
    m.bn.running_var[0] = m.bn.running_var[0] * 1.25


def _weight_data_mul(m: StateWritten) -> None:
    m.bn.weight.data.mul_(1 + m.constant / 10)


def _bias_copy(m: StateWritten) -> None:
    m.bn.bias.data.copy_(m.bn.bias + m.constant)


def _conv_weight_data_add(m: StateWritten) -> None:
    m.conv.weight.data.add_(m.constant / 10)


def _buffer_counter(m: StateWritten) -> None:
    m.calls += 1


def _own_statistics_mul(m: StateWritten) -> None:
    m.mean.mul_(1 + m.constant / 10)


WRITES: dict[str, Callable[[StateWritten], None]] = {
    "running_mean[:1] += c": _slice_add,
    "running_var[0] = running_var[0] * 1.25": _item_assignment,
    "bn.weight.data.mul_": _weight_data_mul,
    "bn.bias.data.copy_": _bias_copy,
    "conv.weight.data.add_": _conv_weight_data_add,
    "calls += 1 (a buffer, scales the output)": _buffer_counter,
    "own mean.mul_ (F.batch_norm reads it)": _own_statistics_mul,
}


class StateWritten(nn.Module):
    """conv → BN → per-channel scale, with one of :data:`WRITES` before or after them."""

    def __init__(self, shape: Shape, write: str, before: bool, functional: bool, constant: float):
        super().__init__()
        c, rank = shape.channels, shape.rank
        self.write, self.before, self.functional, self.constant = (
            write,
            before,
            functional,
            constant,
        )
        self.rank = rank
        self.conv = CONV[rank](c, c, 3, padding=1)
        self.bn = BATCH_NORM[rank](c)
        self.scale = nn.Parameter(torch.ones(c))
        self.register_buffer("calls", torch.ones(()))
        self.register_buffer("mean", torch.zeros(c))
        self.register_buffer("var", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.before:
            WRITES[self.write](self)
        y = self.conv(x)
        if self.functional:
            y = F.batch_norm(y, self.mean, self.var, self.bn.weight, self.bn.bias, False)
        else:
            y = self.bn(y)
        y = y * channel_view(self.scale, self.rank)
        if self.write.startswith("calls"):
            y = y * self.calls
        if not self.before:
            WRITES[self.write](self)
        return y


@st.composite
def state_written(draw, shape: Shape) -> Block:
    m = StateWritten(
        shape,
        write=draw(key_of(WRITES)),
        before=draw(st.booleans()),
        functional=draw(st.booleans()),
        constant=draw(st.sampled_from([0.25, -0.5, 1.0])),
    )
    spelling = "F.batch_norm" if m.functional else "BatchNorm"
    when = "before" if m.before else "after"
    return Block(m, f"state written in forward: {m.write} {when} conv → {spelling} → scale")


STATE_KINDS = {"state_written": BlockKind(state_written, ranks=(1, 2, 3))}
