"""Fold arithmetic: pure tensor functions, no graph.

Every function here computes in float64 and casts its results back to the dtype of the
tensor it replaces, so that a chain of folds accumulates no more rounding than one.

Notation: a *per-channel affine* is ``a(x) = s ⊙ x + t`` with ``s, t`` vectors over one
channel axis. The identities used:

* composition:        ``a2(a1(x)) = (s2·s1) ⊙ x + (s2·t1 + t2)``
* sum / difference:   ``a1(x) ± a2(x) = (s1 ± s2) ⊙ x + (t1 ± t2)``
* batch norm (eval):  ``s = γ / sqrt(var + eps)``, ``t = β − mean·s``
* into a producer:    ``a(W∗x + b) = (s ⊙_out W)∗x + (s·b + t)``   (conv, linear, norm affine)
* into a consumer:    ``W∗a(x) + b = (W ⊙_in s)∗x + (b + W∗t)``     (exact only when ``W∗``
  sees no zero padding of ``a(x)``, or ``t = 0``)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

COMPUTE_DTYPE = torch.float64


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(COMPUTE_DTYPE)


@dataclass(frozen=True)
class ChannelAffine:
    """``x ↦ scale ⊙ x + shift`` along one channel axis; both vectors are float64, length C."""

    scale: torch.Tensor
    shift: torch.Tensor

    @staticmethod
    def identity(channels: int) -> ChannelAffine:
        return ChannelAffine(
            torch.ones(channels, dtype=COMPUTE_DTYPE), torch.zeros(channels, dtype=COMPUTE_DTYPE)
        )

    @staticmethod
    def of(scale: torch.Tensor | None, shift: torch.Tensor | None, channels: int) -> ChannelAffine:
        """Build from optional vectors (``None`` = 1 / 0); scalars broadcast to ``channels``."""
        ident = ChannelAffine.identity(channels)
        s = ident.scale if scale is None else _f64(scale).reshape(-1).expand(channels).clone()
        t = ident.shift if shift is None else _f64(shift).reshape(-1).expand(channels).clone()
        return ChannelAffine(s, t)

    @property
    def channels(self) -> int:
        return self.scale.numel()

    def then(self, outer: ChannelAffine) -> ChannelAffine:
        """The affine ``outer(self(x))``."""
        return ChannelAffine(outer.scale * self.scale, outer.scale * self.shift + outer.shift)

    def plus(self, other: ChannelAffine, sign: float = 1.0) -> ChannelAffine:
        """The affine ``self(x) + sign·other(x)``."""
        return ChannelAffine(self.scale + sign * other.scale, self.shift + sign * other.shift)

    def is_identity(self) -> bool:
        return bool(torch.all(self.scale == 1) and torch.all(self.shift == 0))

    def has_shift(self) -> bool:
        return bool(torch.any(self.shift != 0))


def batch_norm_affine(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> ChannelAffine:
    """Eval-mode batch norm as a per-channel affine."""
    c = running_mean.numel()
    inv_std = torch.rsqrt(_f64(running_var) + eps)
    gamma = torch.ones(c, dtype=COMPUTE_DTYPE) if weight is None else _f64(weight)
    beta = torch.zeros(c, dtype=COMPUTE_DTYPE) if bias is None else _f64(bias)
    scale = gamma * inv_std
    return ChannelAffine(scale, beta - _f64(running_mean) * scale)


def _out_channel_view(vec: torch.Tensor, weight_ndim: int) -> torch.Tensor:
    return vec.reshape((-1,) + (1,) * (weight_ndim - 1))


def fold_affine_into_conv_output(
    weight: torch.Tensor, bias: torch.Tensor | None, affine: ChannelAffine
) -> tuple[torch.Tensor, torch.Tensor]:
    """``a(conv(x))`` as one conv / linear: weight ``(out, in/g, *k)`` or ``(out, in)``.

    Returns the new weight and a bias (always present: ``s·b + t``), in ``weight``'s dtype.
    """
    w = _f64(weight) * _out_channel_view(affine.scale, weight.dim())
    b = affine.shift.clone() if bias is None else affine.scale * _f64(bias) + affine.shift
    return w.to(weight.dtype), b.to(weight.dtype)


def fold_affine_into_conv_transpose_output(
    weight: torch.Tensor, bias: torch.Tensor | None, affine: ChannelAffine, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``a(conv_transpose(x))``: weight is ``(in, out/g, *k)``; output channel ``g·(out/g) + j``."""
    in_ch, out_per_group = weight.shape[:2]
    scale = affine.scale.reshape(groups, 1, out_per_group)  # [group, 1, j]
    w = _f64(weight).reshape(groups, in_ch // groups, out_per_group, -1)
    w = (w * scale.unsqueeze(-1)).reshape(weight.shape)
    b = affine.shift.clone() if bias is None else affine.scale * _f64(bias) + affine.shift
    return w.to(weight.dtype), b.to(weight.dtype)


def fold_affine_into_conv_input(
    weight: torch.Tensor, bias: torch.Tensor | None, affine: ChannelAffine, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``conv(a(x))`` as one conv / linear (no zero padding may meet a non-zero shift).

    Weight ``(out, in/g, *k)``: output channel ``o`` of group ``o // (out/g)`` reads input
    channel ``group·(in/g) + j`` through ``weight[o, j]``. The shift enters the bias as
    ``Σ_{j,k} W[o, j, k]·t[group·(in/g) + j]``. The bias stays ``None`` when it was ``None``
    and the affine has no shift.
    """
    out_ch, in_per_group = weight.shape[:2]
    w64 = _f64(weight)
    per_out = w64.reshape(groups, out_ch // groups, in_per_group, -1)
    scale = affine.scale.reshape(groups, 1, in_per_group, 1)
    shift = affine.shift.reshape(groups, 1, in_per_group, 1)
    new_w = (per_out * scale).reshape(weight.shape)
    if bias is None and not affine.has_shift():
        return new_w.to(weight.dtype), None
    extra = (per_out * shift).sum(dim=(2, 3)).reshape(out_ch)
    new_b = extra if bias is None else _f64(bias) + extra
    return new_w.to(weight.dtype), new_b.to(weight.dtype)


def fold_affine_into_norm(
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    affine: ChannelAffine,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``a(norm(x))`` for a norm whose per-channel affine is ``γ ⊙ n + β``: ``γ' = s·γ``,
    ``β' = s·β + t`` (``γ, β`` default to 1, 0 for a norm without affine parameters).

    Exact for any norm whose statistics do not depend on ``γ, β`` (LayerNorm, GroupNorm, ...).
    """
    c = affine.channels
    gamma = torch.ones(c, dtype=COMPUTE_DTYPE) if weight is None else _f64(weight).reshape(c)
    beta = torch.zeros(c, dtype=COMPUTE_DTYPE) if bias is None else _f64(bias).reshape(c)
    new_gamma = affine.scale * gamma
    new_beta = affine.scale * beta + affine.shift
    shape = (c,) if weight is None else weight.shape
    return new_gamma.reshape(shape).to(dtype), new_beta.reshape(shape).to(dtype)


# ----------------------------------------------------------------------------- parallel convs


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
