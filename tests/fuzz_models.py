"""Fuzz models: the bug classes, and small models assembled from their blocks.

:data:`BUG_CLASSES` maps a class name to its block kinds (``fuzz_blocks``,
``fuzz_geometry``, and the well-behaved ``grammar``); adding a class is adding an entry.
:func:`fuzz_models` draws a :class:`FuzzModel` from some classes: an optional stem conv (without
one, a block's in-place op reaches the model's input), one to three blocks with optional smooth
activations between them (no barrier lets folds run across blocks), an optional head, and the
model-level traps of :class:`Modifiers` — dtype, channels-last input, a second output ``1e6·a``
next to ``b``, a hook on the model itself. Models are tiny (1–4 channels, 5–9 pixels, batch
2–3) so that thousands run in minutes; every parameter is re-drawn at O(1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grammar
import torch
from fuzz_blocks import (
    CONV_SUBCLASS_KINDS,
    FUNCTIONAL_KINDS,
    GRAMMAR_KINDS,
    HOOK_KINDS,
    HOOKS,
    INPLACE_KINDS,
    PARAMETRIZE_KINDS,
    attach_hook,
)
from fuzz_common import CONV, BlockKind, Shape, key_of, probe
from fuzz_geometry import (
    ARITHMETIC_KINDS,
    DTYPE_KINDS,
    LAYOUT_KINDS,
    PADDING_KINDS,
)
from fuzz_opaque import OPAQUE_KINDS
from fuzz_special import SPECIAL_KINDS
from fuzz_state import STATE_KINDS
from hypothesis import assume
from hypothesis import strategies as st
from torch import nn

BUG_CLASSES: dict[str, dict[str, BlockKind]] = {
    "inplace": INPLACE_KINDS,
    "hooks": HOOK_KINDS,
    "functional": FUNCTIONAL_KINDS,
    "conv_subclass": CONV_SUBCLASS_KINDS,
    "parametrize": PARAMETRIZE_KINDS,
    "padding": PADDING_KINDS,
    "arithmetic": ARITHMETIC_KINDS,
    "dtype": DTYPE_KINDS,
    "layout": LAYOUT_KINDS,
    "grammar": GRAMMAR_KINDS,
    "opaque": OPAQUE_KINDS,
    "state": STATE_KINDS,
    "special": SPECIAL_KINDS,
}
# Classes a model's calls change: judged over several calls (``fuzz_oracle.judge_calls``) and
# drawn only with well-behaved blocks, since the other judges run the original more than once.
STATEFUL_CLASSES = ("state",)
# blocks that hooks are attached to (``fuzz_blocks.hooked``)
HOOK_TARGET_KINDS: dict[str, BlockKind] = {
    **GRAMMAR_KINDS,
    **PADDING_KINDS,
    **CONV_SUBCLASS_KINDS,
    **ARITHMETIC_KINDS,
    **PARAMETRIZE_KINDS,
}

LOW_PRECISION = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float32, torch.float64, *LOW_PRECISION)
ACTIVATIONS = [nn.GELU, nn.Tanh, nn.SiLU, nn.Identity]
RARELY = st.sampled_from([False, False, False, True])  # (integers(0, 3) == 0 is drawn far more)


@dataclass(frozen=True)
class Modifiers:
    """Model-level traps a strategy may draw (each one is drawn, not forced)."""

    dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    channels_last: bool = False
    multi_output: bool = False
    top_level_hook: bool = False
    max_blocks: int = 3


@dataclass
class FuzzModel:
    module: nn.Module
    in_channels: int
    spatial: tuple[int, ...]
    dtype: torch.dtype
    channels_last: bool
    batch: int
    labels: list[str] = field(default_factory=list)

    def inputs(
        self, generator: torch.Generator, batch: int | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor]:
        """One input of the model's shape (another batch size if given), drawn in float64 so
        that the float64 copy of the model sees the same values."""
        shape = (batch or self.batch, self.in_channels, *self.spatial)
        x = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype or self.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return (x,)

    def describe(self) -> str:
        layout = ", channels-last" if self.channels_last else ""
        head = f"input {(self.batch, self.in_channels, *self.spatial)} {self.dtype}{layout}"
        return "\n".join([head, *self.labels])


class GlobalHead(nn.Module):
    """Global average pool → Linear → BatchNorm1d."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, classes)
        self.bn = nn.BatchNorm1d(classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x.mean((2, 3))))


class FuzzNet(nn.Module):
    """``head(act(block(… act(block(stem(x))))))``, and with a tap also ``1e6 · (the
    activation after block ``tap``)`` as a second output (first or second in the tuple)."""

    def __init__(self, stem, blocks, activations, head, tap: int | None, tap_first: bool):
        super().__init__()
        self.stem, self.head = stem, head
        self.blocks, self.activations = nn.ModuleList(blocks), nn.ModuleList(activations)
        self.tap, self.tap_first = tap, tap_first

    def forward(self, x: torch.Tensor):
        x = self.stem(x)
        tapped = x
        for i, (block, act) in enumerate(zip(self.blocks, self.activations, strict=True)):
            x = act(block(x))
            tapped = x if self.tap == i + 1 else tapped
        out = self.head(x)
        if self.tap is None:
            return out
        big = 1e6 * tapped
        return (big, out) if self.tap_first else (out, big)


def convert(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module.to(dtype)``, except the parameters a :class:`~fuzz_geometry.KeepsDtype` module
    keeps in its own dtype."""
    module.to(dtype)
    for m in module.modules():
        for name, kept in getattr(m, "kept_dtypes", {}).items():
            param = getattr(m, name)
            param.data = param.data.to(kept)
    return module


RANK_WEIGHTS = (2, 2, 2, 1, 3)
SIZES = {1: (5, 9), 2: (5, 9), 3: (4, 5)}


@st.composite
def _frame(draw, kinds: dict[str, BlockKind], modifiers: Modifiers) -> tuple[Shape, int, bool]:
    """Rank, dtype, channels and sizes; whether there is a stem, and the input channels."""
    ranks = {r for kind in kinds.values() for r in kind.ranks}
    rank = draw(st.sampled_from([r for r in RANK_WEIGHTS if r in ranks]))
    lo, hi = SIZES[rank]
    spatial = tuple(draw(st.integers(lo, hi)) for _ in range(rank))
    dtype = draw(st.sampled_from(modifiers.dtypes))
    shape = Shape(draw(st.integers(1, 4)), spatial, dtype)
    with_stem = draw(st.booleans())
    in_channels = draw(st.integers(1, 3)) if with_stem else shape.channels
    return shape, in_channels, with_stem


@st.composite
def _blocks(draw, kinds: dict[str, BlockKind], shape: Shape, max_blocks: int):
    """Blocks and activations; each block is probed (in the model's dtype) for its output."""
    blocks, activations, labels = [], [], []
    count = draw(st.integers(1, max_blocks))
    for i in range(count):
        allowed = [
            n for n, k in kinds.items() if shape.rank in k.ranks and (not k.final or i == count - 1)
        ]
        name = draw(st.sampled_from(sorted(allowed)))
        block = draw(kinds[name].strategy(shape))
        convert(block.module, shape.dtype)
        out = probe(block.module, shape)
        assume(out is not None)
        activation = draw(st.sampled_from(ACTIVATIONS))()
        blocks.append(block.module)
        activations.append(activation)
        labels.append(f"[{name}] {block.label} → {type(activation).__name__}")
        shape = out
    return blocks, activations, labels, shape


@st.composite
def _head(draw, shape: Shape):
    if shape.rank == 2 and draw(RARELY):
        return GlobalHead(shape.channels, draw(st.integers(1, 4))), "head: mean → Linear → BN1d"
    return nn.Identity(), None


@st.composite
def _tap(draw, modifiers: Modifiers, blocks: int) -> tuple[int | None, bool]:
    if not modifiers.multi_output or not draw(st.booleans()):
        return None, False
    return draw(st.integers(0, blocks - 1)), draw(st.booleans())


@st.composite
def fuzz_models(draw, classes: tuple[str, ...], modifiers: Modifiers = Modifiers()) -> FuzzModel:
    kinds = {name: kind for c in classes for name, kind in BUG_CLASSES[c].items()}
    shape, in_channels, with_stem = draw(_frame(kinds, modifiers))
    stem = (
        CONV[shape.rank](in_channels, shape.channels, 3, padding=1) if with_stem else nn.Identity()
    )
    blocks, activations, labels, out = draw(_blocks(kinds, shape, modifiers.max_blocks))
    head, head_label = draw(_head(out))
    tap, tap_first = draw(_tap(modifiers, len(blocks)))
    module = FuzzNet(stem, blocks, activations, head, tap, tap_first)
    grammar.randomise_(module, torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1))))
    convert(module.eval(), shape.dtype)
    labels = [f"stem: {stem}", *labels] + ([head_label] if head_label else [])
    if tap is not None:
        labels.append(
            f"outputs: 1e6 · (activation after block {tap}) {'first' if tap_first else 'second'}"
        )
    if modifiers.top_level_hook and draw(RARELY):  # such a model may be refused
        hook = draw(key_of(HOOKS))
        attach_hook(module, hook)
        labels.append(f"top-level {hook}")
    channels_last = modifiers.channels_last and shape.rank == 2 and draw(st.booleans())
    if channels_last and draw(st.booleans()):
        module.to(memory_format=torch.channels_last)
        labels.append("model converted to channels_last")
    model = FuzzModel(
        module,
        in_channels,
        shape.spatial,
        shape.dtype,
        channels_last,
        draw(st.integers(2, 3)),
        labels,
    )
    assume(_runs(model))
    return model


def _runs(model: FuzzModel) -> bool:
    """The assembled model runs on an input of its shape (a block's probe may have passed
    on zeros in isolation and still clash with the head)."""
    try:
        with torch.no_grad():
            model.module(*model.inputs(torch.Generator().manual_seed(0)))
    except (RuntimeError, ValueError, IndexError):
        return False
    return True


__all__ = ["ALL_DTYPES", "BUG_CLASSES", "LOW_PRECISION", "FuzzModel", "Modifiers", "fuzz_models"]
