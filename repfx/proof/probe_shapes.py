"""The shapes of the commit point's probes: which sizes exercise a region, and which shapes
each of its inputs may take (see ``repfx.proof.validate``, step 2)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..ir.graph import RANK_KEY, assumed_input_rank, static_shape
from ..ir.norms import NORM_MODULES
from ..ir.ops import avg_pool_settings
from .region import Region

_CONV_FUNCTIONS = {
    torch.conv1d, torch.conv2d, torch.conv3d,
    torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d,
    torch.nn.functional.avg_pool1d, torch.nn.functional.avg_pool2d,
    torch.nn.functional.avg_pool3d, torch.nn.functional.max_pool2d,
}  # fmt: skip
MIN_PROBE_EXTENT = 3  # the smallest spatial probe size: a first, a middle and a last position


@dataclass(frozen=True)
class InputSpec:
    """What is known about one region input: a recorded shape / dtype, or only a rank."""

    shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    device: torch.device
    rank: int | None
    is_float: bool


def recorded_shape_and_dtype(node: fx.Node) -> tuple[tuple[int, ...] | None, torch.dtype | None]:
    for key in ("tensor_meta", "val", "example_value"):
        meta = node.meta.get(key)
        shape = getattr(meta, "shape", None)
        if shape is not None:
            dims = [_concrete(d) for d in shape]
            if None not in dims:
                return tuple(dims), getattr(meta, "dtype", None)
    return None, None


def _concrete(dim: Any) -> int | None:
    if isinstance(dim, int):
        return dim
    hint = getattr(getattr(dim, "node", None), "hint", None)
    return int(hint) if isinstance(hint, int) else None


def input_spec(
    node: fx.Node,
    device: torch.device,
    gm: fx.GraphModule | None = None,
    region: Region | None = None,
) -> InputSpec:
    """What is known about ``node``, an input of ``region``; without a recorded shape or an
    inferred rank, the rank an op of the region assumes for it (a ConvNd reads a batch of
    rank N + 2: what the folded module's rank guard then requires)."""
    shape, dtype = recorded_shape_and_dtype(node)
    is_float = dtype.is_floating_point if dtype is not None else True  # unknown: try floats
    rank = len(shape) if shape is not None else node.meta.get(RANK_KEY)
    if rank is None and gm is not None and region is not None:
        readers = [u for u in node.users if u in region.ops and u.args and u.args[0] is node]
        rank = next((r for u in readers if (r := assumed_input_rank(gm, u)) is not None), None)
    return InputSpec(shape, dtype, device, rank, bool(is_float))


def channel_counts(gm: fx.GraphModule, region: Region) -> list[int]:
    """Channel counts the region's ops mention, most frequent first."""
    counts: dict[int, int] = {}

    def add(n: Any) -> None:
        if isinstance(n, int) and n > 0:
            counts[n] = counts.get(n, 0) + 1

    for node in region.ops:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            for attr in ("in_channels", "in_features", "num_features", "num_channels"):
                add(getattr(m, attr, None))
            shape = getattr(m, "normalized_shape", None)
            if shape:
                add(shape[-1])
    for value in region.constants.values():
        for size in value.shape:
            if size > 1:  # (a size of 1 broadcasts: a (1, C, 1, 1) scale names C only)
                add(int(size))
    for node in region.ops:  # a pool names no channel count, but its replacement may (a conv)
        add(_pooled_channels(gm, node))
    return sorted(counts, key=lambda c: -counts[c])


def _pooled_channels(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """The channel count of an average pool's recorded output (``None``: not a pool, or no
    recorded shape)."""
    found = avg_pool_settings(gm, node)
    shape = static_shape(node)
    if found is None or shape is None or len(shape) < found[1].dims + 1:
        return None
    return int(shape[-(found[1].dims + 1)])


def probe_sizes(gm: fx.GraphModule, region: Region) -> tuple[tuple[int, ...], ...]:
    """Spatial sizes of the probes (one per spatial dim, cycled): every dim gets an odd and an
    even size, both large enough that every kernel tap of every window in the region meets
    data (:func:`_tap_coverage`) and at least 3 (every dim has a first, a middle and a last
    position, so a replacement that flips or shifts a dim shows), and the odd one divisible by
    no stride in the region. A region of pointwise ops only (no window, no reshaping) behaves
    the same at every size: one probe suffices."""
    extent, strides = MIN_PROBE_EXTENT, {1}
    for node in region.ops:
        window = _window(gm, node, region)
        if window is not None:
            extent = max(extent, window[0])
            strides.add(window[1])
    odd = extent + (extent % 2 == 0)
    while any(s > 1 and odd % s == 0 for s in strides):
        odd += 2
    even = extent + (extent % 2)
    if all(_is_pointwise(gm, n) for n in region.ops):
        return ((odd, even, odd),)
    return (odd, even, odd), (even, odd, even)


# Modules whose output at a position depends on the input there (norms: on statistics over
# positions, whatever their number).
_POINTWISE_MODULES = (
    nn.Linear, nn.modules.batchnorm._BatchNorm, *NORM_MODULES, nn.Identity,
    nn.modules.dropout._DropoutNd, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.Mish, nn.ELU,
)  # fmt: skip
_POINTWISE_FUNCTIONS = {
    "add", "sub", "mul", "div", "addcmul", "neg", "truediv",
    "relu", "gelu", "sigmoid", "tanh", "silu", "hardswish", "hardsigmoid",
}  # fmt: skip


def _is_pointwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An op whose every output position depends only on the same input position."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.modules.conv._ConvNd):
            sizes = [_ints(getattr(m, a)) for a in ("kernel_size", "stride", "padding")]
            return all(v == 1 for v in sizes[0] + sizes[1]) and not any(sizes[2])
        return isinstance(m, _POINTWISE_MODULES)
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return name.strip("_") in _POINTWISE_FUNCTIONS


def _window(gm: fx.GraphModule, node: fx.Node, region: Region) -> tuple[int, int] | None:
    """(the smallest size at which every kernel tap of a windowed op meets data, the largest
    stride): see :func:`_tap_coverage`."""
    settings = _window_settings(gm, node, region)
    if settings is None:
        return None
    kernel, dilation, stride, padding = settings
    ks, ds, ss = (_ints(v) for v in (kernel, dilation, stride))
    if not ks:
        return None
    ds = ds * len(ks) if len(ds) == 1 else ds
    ss = ss * len(ks) if len(ss) == 1 else ss or [1] * len(ks)
    extents = [d * (k - 1) + 1 for k, d in zip(ks, ds, strict=False)]
    pads = _paddings(padding, extents)
    return max(map(_tap_coverage, ks, ds, pads, ss)), max(ss)


def _window_settings(gm: fx.GraphModule, node: fx.Node, region: Region) -> tuple | None:
    """(kernel size, dilation, stride, padding) of a windowed op, as its module or call gives
    them; padding 0 where it is not known to apply before the window (transposed convs,
    pools)."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        kernel = getattr(m, "kernel_size", None)
        is_conv = isinstance(m, nn.modules.conv._ConvNd) and not m.transposed
        padding = m.padding if is_conv else 0
        return kernel, getattr(m, "dilation", 1), getattr(m, "stride", 1), padding
    if node.op != "call_function" or node.target not in _CONV_FUNCTIONS:
        return None
    weight = region.constants.get(node.args[1]) if len(node.args) > 1 else None
    kernel = None if weight is None else tuple(weight.shape[2:])

    def arg(i: int, name: str, default: Any) -> Any:
        return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)

    return kernel, arg(5, "dilation", 1), arg(3, "stride", 1), arg(4, "padding", 0)


def _paddings(padding: Any, extents: list[int]) -> list[int]:
    """A conv's padding per spatial dim: ``"same"`` pads ``(extent − 1) // 2`` before; an
    unknown padding counts as none (which asks for the larger probe)."""
    if padding == "same":
        return [(e - 1) // 2 for e in extents]
    pads = _ints(padding)
    if len(pads) == 1:
        pads = pads * len(extents)
    return pads if len(pads) == len(extents) else [0] * len(extents)


def _tap_coverage(kernel: int, dilation: int, padding: int, stride: int) -> int:
    """The smallest input size at which every tap of a window (``padding`` before it) reads an
    input position for some output position. Tap ``t`` of output ``o`` reads position
    ``o·stride − padding + t·dilation``; a window with "same" padding needs about half its
    extent ``dilation·(kernel − 1) + 1``, a window without padding all of it.

    Every tap meeting data is what the proof needs: the region is linear in its input, so a
    replacement that changes a tap's weight changes an output that reads that tap in range,
    on random data. A dilated conv with "same" padding (an ASPP branch, dilation 36: extent 73)
    is proven at 37 positions instead of 73, a quarter of the cost."""
    extent = dilation * (kernel - 1) + 1
    padding = max(padding, 0)
    for size in range(1, extent + stride + 1):
        outputs = (size + 2 * padding - extent) // stride + 1
        if outputs >= 1 and all(
            _reads_data(t * dilation - padding, size, outputs, stride) for t in range(kernel)
        ):
            return size
    return extent + stride  # (not reached: at this size the first output reads every tap)


def _reads_data(offset: int, size: int, outputs: int, stride: int) -> bool:
    """Does some output ``o < outputs`` read position ``o·stride + offset`` within ``size``?"""
    first = max(0, -(offset // stride))  # the first o whose position is ≥ 0: ⌈−offset / stride⌉
    return first < outputs and first * stride + offset < size


def _ints(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return list(value)
    return []


def candidate_shapes(
    spec: InputSpec, channels: list[int], sizes: tuple[int, ...], batch: int
) -> list:
    """Shapes to try for an input, best first."""
    found: list[tuple[int, ...]] = []
    if spec.shape is not None:
        for kept in _channel_positions(spec.shape, channels):
            found.append(_shrunk(spec.shape, kept, sizes, batch))
        found.append(spec.shape)
        return list(dict.fromkeys(found))
    ranks = [spec.rank] if spec.rank is not None else [4, 3, 2, 5]
    for rank, c in itertools.product(ranks, channels[:4] or [4]):
        spatial = tuple(sizes[i % len(sizes)] for i in range(max(rank - 2, 0)))
        if rank == 1:
            found.append((c,))
            continue
        found.append((batch, c, *spatial))
        if rank >= 3:
            found.append((batch, *spatial, c))
    return list(dict.fromkeys(found))


def _channel_positions(shape: tuple[int, ...], channels: list[int]) -> list[frozenset[int]]:
    """Which dims of a recorded ``shape`` to keep as channel dims, best first: those whose size
    is a channel count the region names. When several are (efficientnet's (1, 144, 144, 144):
    144 channels at 144×144), each on its own first — dim 1 (NCHW), then the last (NHWC), then
    the others — and all of them last: a probe that keeps the wrong one does not run, and
    keeping a spatial dim at full size costs its square in every evaluation."""
    named = [i for i, d in enumerate(shape) if (i or len(shape) == 1) and d > 1 and d in channels]
    if len(named) <= 1:
        return [frozenset(named)]
    order = sorted(named, key=lambda i: (i != 1, i != len(shape) - 1, i))
    return [frozenset([i]) for i in order] + [frozenset(named)]


def _shrunk(
    shape: tuple[int, ...], kept: frozenset[int], sizes: tuple[int, ...], batch: int
) -> tuple:
    """``shape`` with its batch set and its other dims shrunk to ``sizes``, except the ``kept``
    channel dims and dims of size 1 (an average pool names its own channel count:
    :func:`_pooled_channels`)."""
    out, k = [], 0
    for i, d in enumerate(shape):
        if i == 0 and len(shape) > 1:
            out.append(batch)
        elif d > 1 and i not in kept:
            out.append(sizes[k % len(sizes)])
            k += 1
        else:
            out.append(d)
    return tuple(out)
