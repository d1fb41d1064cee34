"""Convs as data (:class:`ConvKernel`), and the kernel arithmetic of merged branches.

Parallel convs of one input with the same stride and aligned centres sum into one conv: each
kernel is zero-padded to the largest size with its centre kept (``centre_pad``), dilations are
spelled out (``undilate``), grouped and depthwise kernels are written in a common grouping
(``regroup``), an identity or a per-channel affine is a delta kernel (``affine_as_kernel``).
Concatenated branches stack their kernels along the output channels (``concat_kernels``); a
pointwise conv followed by any conv is one conv (``compose_pointwise_then_conv``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .affine import ChannelAffine


@dataclass(frozen=True)
class ConvKernel:
    """A conv ``y = W ∗ x + b`` as data: weight ``(out, in/groups, *k)``, zero padding.

    Its *centre offset* per spatial dim, ``padding − dilation·(k − 1)/2``, says where the
    kernel's centre tap sits relative to the output position (times the stride); convs with the
    same stride and centre offsets produce aligned outputs of the same size, whatever their
    kernel sizes.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def centre_offset(self) -> tuple[float, ...]:
        return tuple(
            p - d * (k - 1) / 2
            for p, d, k in zip(self.padding, self.dilation, self.kernel_size, strict=True)
        )

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups


def affine_as_kernel(affine: ChannelAffine, channels: int, spatial_dims: int) -> ConvKernel:
    """``s ⊙ x + t`` as a depthwise 1×…×1 conv (the identity when ``s = 1, t = 0``)."""
    full = ChannelAffine(affine.scale.expand(channels), affine.shift.expand(channels))
    weight = full.scale.reshape((channels, 1) + (1,) * spatial_dims).clone()
    ones = (1,) * spatial_dims
    return ConvKernel(weight, full.shift.clone(), ones, (0,) * spatial_dims, ones, channels)


def regroup(kernel: ConvKernel, groups: int) -> ConvKernel:
    """The same conv with fewer groups (``groups`` divides ``kernel.groups``): the weight becomes
    block-diagonal inside each new group."""
    if kernel.groups == groups:
        return kernel
    out_ch, in_per_old = kernel.weight.shape[:2]
    in_ch = kernel.in_channels
    in_per_new, out_per_old = in_ch // groups, out_ch // kernel.groups
    weight = kernel.weight.new_zeros((out_ch, in_per_new, *kernel.kernel_size))
    for o in range(out_ch):
        old_group = o // out_per_old
        start = old_group * in_per_old - (o // (out_ch // groups)) * in_per_new
        weight[o, start : start + in_per_old] = kernel.weight[o]
    return ConvKernel(weight, kernel.bias, kernel.stride, kernel.padding, kernel.dilation, groups)


def centre_pad(weight: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad a ``(out, in, *k)`` weight to ``(out, in, *size)`` around its centre
    (``size − k`` must be even in every dim)."""
    pads: list[int] = []
    for s, k in reversed(list(zip(size, weight.shape[2:], strict=True))):
        pads += [(s - k) // 2, (s - k) // 2]
    return torch.nn.functional.pad(weight, pads)


def undilate(kernel: ConvKernel) -> ConvKernel:
    """The same conv with dilation 1: the dilated taps spread out, zeros between them."""
    if all(d == 1 for d in kernel.dilation):
        return kernel
    size = tuple(d * (k - 1) + 1 for d, k in zip(kernel.dilation, kernel.kernel_size, strict=True))
    weight = kernel.weight.new_zeros(kernel.weight.shape[:2] + size)
    taps = (slice(None), slice(None), *(slice(None, None, d) for d in kernel.dilation))
    weight[taps] = kernel.weight
    ones = (1,) * len(size)
    return ConvKernel(weight, kernel.bias, kernel.stride, kernel.padding, ones, kernel.groups)


def sum_kernels(terms: list[tuple[float, ConvKernel]]) -> ConvKernel:
    """``Σ cᵢ·convᵢ(x)`` as one conv.

    The caller checks that the convs align: same stride, same centre offsets, and kernel sizes
    (after undilating) that differ by even amounts. Kernels with different dilations are
    undilated; all are regrouped to the gcd of their groups and zero-padded around their
    centres to the largest size; the padding puts the merged kernel's centre at the common
    offset.
    """
    from math import gcd

    coefficients = [c for c, _ in terms]
    kernels, size = _aligned([k for _, k in terms])
    padding, dilation = _common_geometry(kernels, size)
    groups = 0
    for k in kernels:
        groups = gcd(groups, k.groups)
    weight = sum(
        c * centre_pad(regroup(k, groups).weight, size)
        for c, k in zip(coefficients, kernels, strict=True)
    )
    bias = sum(c * k.bias for c, k in zip(coefficients, kernels, strict=True))
    return ConvKernel(weight, bias, kernels[0].stride, padding, dilation, groups)


def compose_pointwise_then_conv(first: ConvKernel, second: ConvKernel) -> ConvKernel:
    """``second(first(x))`` as one conv, for a 1×…×1, stride-1 ``first``.

    Per group — both convs with the same groups, or a depthwise ``second`` (one input channel
    per output channel) after any ``first``: ``W[o, c] = Σ_m W₂[o, m]·W₁[m, c]`` over the kernel
    of ``second``, ``b = b₂ + Σ_{m,k} W₂[o, m, k]·b₁[m]``, padding ``p₁ + p₂``. Exact when
    ``second`` reads no zero padding or ``b₁ = 0``: ``first``'s own zero padding puts ``b₁`` on
    the border, which the composed conv reproduces, but ``second``'s padding would put zeros
    there (the caller checks).
    """
    if second.groups != first.groups:  # depthwise second: each output reads one first output
        second = _depthwise_as_grouped(second, first.groups)
    groups = first.groups
    mid, c_per = first.weight.shape[:2]
    out, m_per = second.weight.shape[:2]
    w1 = first.weight.reshape(groups, mid // groups, c_per)  # [g, m, c]
    w2 = second.weight.reshape(groups, out // groups, m_per, -1)  # [g, o, m, k]
    weight = torch.einsum("gomk,gmc->gock", w2, w1)
    weight = weight.reshape((out, c_per, *second.kernel_size))
    b1 = first.bias.reshape(groups, mid // groups)
    bias = second.bias + torch.einsum("gomk,gm->go", w2, b1).reshape(out)
    padding = tuple(p + q for p, q in zip(first.padding, second.padding, strict=True))
    return ConvKernel(weight, bias, second.stride, padding, second.dilation, groups)


def _depthwise_as_grouped(kernel: ConvKernel, groups: int) -> ConvKernel:
    """A depthwise conv (``groups == channels``) as the same conv with fewer groups."""
    if kernel.groups != kernel.in_channels or kernel.in_channels % groups:
        raise ValueError("only a depthwise second conv can change groups")
    return regroup(kernel, groups)


def _aligned(terms: list[ConvKernel]) -> tuple[list[ConvKernel], tuple[int, ...]]:
    """The kernels on one grid, and the common size. They keep a common dilation only when every
    kernel's taps fall on it: same dilation wherever wider than 1, and sizes that differ by even
    amounts (a 2-tap dilated kernel has no tap at its centre, where a 1×1 kernel's tap is).
    Otherwise all are undilated."""
    size = _largest(terms)
    wide_dilations = {k.dilation for k in terms if max(k.kernel_size, default=1) > 1}
    uneven = any((s - n) % 2 for k in terms for s, n in zip(size, k.kernel_size, strict=True))
    if len(wide_dilations) > 1 or (uneven and wide_dilations != {(1,) * len(size)}):
        terms = [undilate(k) for k in terms]
        size = _largest(terms)
    return terms, size


def _largest(terms: list[ConvKernel]) -> tuple[int, ...]:
    return tuple(max(dims) for dims in zip(*(k.kernel_size for k in terms), strict=True))


def _common_geometry(terms: list[ConvKernel], size: tuple[int, ...]) -> tuple[tuple, tuple]:
    dilation = tuple(
        max(k.dilation[i] if k.kernel_size[i] > 1 else 1 for k in terms) for i in range(len(size))
    )
    offset = terms[0].centre_offset
    padding = tuple(
        int(o + d * (s - 1) / 2) for o, d, s in zip(offset, dilation, size, strict=True)
    )
    return padding, dilation


def concat_kernels(terms: list[ConvKernel]) -> ConvKernel:
    """``cat([conv₁(x), conv₂(x), …], channels)`` as one conv (every conv with ``groups == 1``;
    the same alignment conditions as :func:`sum_kernels`)."""
    terms, size = _aligned(terms)
    padding, dilation = _common_geometry(terms, size)
    weight = torch.cat([centre_pad(regroup(k, 1).weight, size) for k in terms])
    bias = torch.cat([k.bias for k in terms])
    return ConvKernel(weight, bias, terms[0].stride, padding, dilation, 1)
