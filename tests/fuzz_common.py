"""Shared vocabulary of the fuzz grammar: shapes, blocks, block kinds and small helpers.

A *block* is a small module mapping an activation ``(N, C, *spatial)`` to another of the same
rank. A *block kind* is a Hypothesis strategy for blocks, given the incoming :class:`Shape`,
with the spatial ranks it supports. Bug classes (``fuzz_models.BUG_CLASSES``) are dicts of
block kinds; the model builder chains blocks and learns each block's output shape by running
it once on a probe, so a block never has to compute its own output shape.

Parameters are re-drawn at O(1) after assembly (``grammar.randomise_``, which keys on names:
``*weight`` / ``*scale`` / ``*gamma`` vectors around 1, everything else around 0), so blocks
name their multiplicative constants ``scale`` and their additive ones ``shift``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn


@dataclass(frozen=True)
class Shape:
    """An activation ``(N, channels, *spatial)`` (batch excluded) computed in ``dtype``."""

    channels: int
    spatial: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    @property
    def rank(self) -> int:
        return len(self.spatial)


@dataclass
class Block:
    module: nn.Module
    label: str


BlockStrategy = Callable[[Shape], st.SearchStrategy[Block]]


@dataclass(frozen=True)
class BlockKind:
    """A block generator, the spatial ranks it supports, and whether its output may feed
    another block (``final``: it changes the dtype, so only the model's output may read it)."""

    strategy: BlockStrategy
    ranks: tuple[int, ...] = (2,)
    final: bool = False


CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T: dict[int, type[nn.Module]] = {
    1: nn.ConvTranspose1d,
    2: nn.ConvTranspose2d,
    3: nn.ConvTranspose3d,
}
BATCH_NORM: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
AVG_POOL: dict[int, type[nn.Module]] = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
MAX_POOL: dict[int, type[nn.Module]] = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


def channel_view(t: torch.Tensor, rank: int) -> torch.Tensor:
    """``(C,)`` → ``(C, 1, …, 1)``: broadcasts along the channels of ``(N, C, *spatial)``."""
    return t.reshape(-1, *([1] * rank))


def spatial_dims(rank: int) -> tuple[int, ...]:
    return tuple(range(2, 2 + rank))


def conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def paddings_for(size: int, target: int, k: int, s: int, d: int, limit: int = 6) -> list[int]:
    """Every padding ``p ≤ limit`` for which a conv maps ``size`` to ``target`` (with stride 2
    there can be two: the windows of the two are shifted against each other)."""
    return [p for p in range(limit + 1) if conv_out(size, k, s, p, d) == target]


def probe(module: nn.Module, shape: Shape) -> Shape | None:
    """The activation ``module`` maps ``shape`` to (run once on zeros), or ``None`` when it
    cannot run on it or changes the rank."""
    try:
        with torch.no_grad():
            y = module(torch.zeros(2, shape.channels, *shape.spatial, dtype=shape.dtype))
    except (RuntimeError, ValueError, IndexError):
        return None
    if not isinstance(y, torch.Tensor) or y.dim() != shape.rank + 2:
        return None
    return Shape(y.shape[1], tuple(y.shape[2:]), shape.dtype)


def probe_spatial(module: nn.Module, shape: Shape) -> tuple[int, ...] | None:
    out = probe(module, shape)
    return None if out is None else out.spatial


def common_groups(a: int, b: int) -> list[int]:
    return [g for g in range(1, min(a, b) + 1) if a % g == 0 and b % g == 0]


# ------------------------------------------------------------------ per-channel affines

SCALE_SPELLINGS: dict[str, Callable[[ChannelScale, torch.Tensor], torch.Tensor]] = {
    "x * s.view": lambda m, x: x * channel_view(m.scale, m.rank),
    "x * s[:, None…]": lambda m, x: x * m.scale[(slice(None), *(None,) * m.rank)],
    "torch.add(torch.mul)": lambda m, x: torch.add(
        torch.mul(x, channel_view(m.scale, m.rank)), channel_view(m.shift, m.rank)
    ),
    "addcmul": lambda m, x: torch.addcmul(
        channel_view(m.shift, m.rank), x, channel_view(m.scale, m.rank)
    ),
    "(x - t) / s": lambda m, x: (x - channel_view(m.shift, m.rank)) / channel_view(m.scale, m.rank),
    "BatchNorm": lambda m, x: m.bn(x),
}


class ChannelScale(nn.Module):
    """A per-channel affine of ``(N, C, *spatial)`` in one of :data:`SCALE_SPELLINGS`."""

    def __init__(self, channels: int, rank: int, spelling: str):
        super().__init__()
        self.rank, self.spelling = rank, spelling
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))
        if spelling == "BatchNorm":
            self.bn = BATCH_NORM[rank](channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SCALE_SPELLINGS[self.spelling](self, x)


class Seq(nn.Sequential):
    """A Sequential of its own type, so that hooks and repr name it."""


@st.composite
def same_size_branch(draw, shape: Shape, out_channels: int) -> nn.Module:
    """A branch that keeps the spatial size: a conv (1×1 or 3×3 with padding 1, maybe + BN),
    or — when it keeps the channels — a per-channel scale, a BN or the identity."""
    kinds = ["conv", "conv_bn"]
    if out_channels == shape.channels:
        kinds += ["scale", "bn", "identity"]
    kind = draw(st.sampled_from(kinds))
    rank = shape.rank
    if kind == "scale":
        return ChannelScale(out_channels, rank, draw(key_of(SCALE_SPELLINGS)))
    if kind == "bn":
        return BATCH_NORM[rank](out_channels)
    if kind == "identity":
        return nn.Identity()
    k = draw(st.sampled_from([1, 3]))
    groups = draw(st.sampled_from(common_groups(shape.channels, out_channels)))
    conv = CONV[rank](
        shape.channels, out_channels, k, padding=k // 2, groups=groups, bias=draw(st.booleans())
    )
    return Seq(conv, BATCH_NORM[rank](out_channels)) if kind == "conv_bn" else conv


def key_of(table: dict) -> st.SearchStrategy[str]:
    """One key of a spelling table (sorted, so that examples shrink predictably)."""
    return st.sampled_from(sorted(table))
