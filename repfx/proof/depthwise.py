"""Depthwise convolutions in float64, as the commit point evaluates them.

CPU convolution in float64 has no grouped kernel: a depthwise conv of ``C`` channels runs as
``C`` convolutions of one channel each, about 10 µs apiece whatever their size. The commit
point proves every rewrite in float64 on small probes, so in a depthwise network (EfficientNet,
MobileNet) those per-channel loops were the largest cost of a fold: a 1,536-channel 5×5
depthwise conv on a 2×3×4 probe took 14 ms in float64 against 0.5 ms in float32.

:class:`FastDepthwise` evaluates them instead as one product of the unfolded input with the
weight (:func:`depthwise_conv`): the same products, summed in float64 in another order, so the
result differs from the slow path only by float64 rounding, far below any tolerance. It takes
convolutions whose groups each read one input channel (depthwise, with any channel multiplier),
1-D or 2-D, not transposed, float64 on the CPU; everything else runs as it would.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx
from torch.nn.modules.conv import _ConvNd
from torch.utils._python_dispatch import TorchDispatchMode

from ..ir.graph import arg_of, module_of


def may_run_grouped_conv(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> bool:
    """Can one of ``nodes`` run a grouped convolution? (A dispatch mode costs every op it
    sees; :class:`FastDepthwise` is worth entering only then.)"""
    for node in nodes:
        if node.op == "call_module":
            module = module_of(gm, node)
            if isinstance(module, _ConvNd) and module.groups > 1:
                return True
        elif (
            node.op == "call_function"
            and node.target in _GROUPS_ARGUMENT
            and arg_of(node, _GROUPS_ARGUMENT[node.target], "groups", 1) != 1
        ):
            return True
    return False


_GROUPS_ARGUMENT = {  # where each conv callable takes ``groups``
    F.conv1d: 6,
    F.conv2d: 6,
    torch.conv1d: 6,
    torch.conv2d: 6,
    torch.ops.aten.conv1d.default: 6,
    torch.ops.aten.conv2d.default: 6,
    torch.ops.aten.conv1d.padding: 6,
    torch.ops.aten.conv2d.padding: 6,
    torch.ops.aten.convolution.default: 8,
}


class FastDepthwise(TorchDispatchMode):
    """While active, float64 depthwise convolutions on the CPU run as :func:`depthwise_conv`
    (any it cannot compute run as torch runs them: a shortcut never refuses a region)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default and not kwargs and _applies(*args):
            try:
                return depthwise_conv(*args)
            except RuntimeError:
                pass
        return func(*args, **(kwargs or {}))


def _applies(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int], transposed: bool,
    output_padding: Sequence[int], groups: int,
) -> bool:  # fmt: skip
    return (
        groups > 1
        and not transposed
        and x.dim() in (3, 4)
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float64
        and (bias is None or bias.dtype == torch.float64)
        and x.shape[1] == groups  # each group reads one input channel
    )


def depthwise_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int], transposed: bool = False,
    output_padding: Sequence[int] = (), groups: int = 1,
) -> torch.Tensor:  # fmt: skip
    """``aten.convolution`` of ``x`` ``(N, C, [H,] W)`` with a weight ``(C·m, 1, [kh,] kw)`` in
    ``groups = C`` groups (zero padding): output channel ``c·m + j`` is
    ``Σ_taps x[c] shifted · weight[c·m + j]``, computed as the unfolded input (every tap's
    shifted copy of each channel) times the weight, summed over the taps. ``stride``,
    ``padding`` and ``dilation`` hold one value per spatial dimension, or one for all of them
    (as ``aten.convolution`` takes them)."""
    spatial = x.dim() - 2
    stride, padding, dilation = (_per_dim(v, spatial) for v in (stride, padding, dilation))
    if spatial == 1:  # 1-D as 2-D of height 1
        out = depthwise_conv(
            x.unsqueeze(2), weight.unsqueeze(2), bias, (1, *stride), (0, *padding),
            (1, *dilation), groups=groups,
        )  # fmt: skip
        return out.squeeze(2)
    n, channels, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    taps = kh * kw
    cols = F.unfold(x, (kh, kw), dilation=tuple(dilation), padding=tuple(padding),
                    stride=tuple(stride))  # fmt: skip
    cols = cols.view(n, channels, 1, taps, -1)  # (N, C, 1, taps, L)
    per_channel = weight.reshape(channels, out_channels // channels, taps, 1)
    out = (cols * per_channel).sum(3)  # (N, C, m, L)
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = out.reshape(n, out_channels, out_h, out_w)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def _per_dim(values: Sequence[int], spatial: int) -> tuple[int, ...]:
    """``values`` for each of ``spatial`` dimensions (one value stands for all)."""
    values = tuple(values)
    return values * spatial if len(values) == 1 else values
