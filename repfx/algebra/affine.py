"""Per-channel affines, and absorbing one into a conv, a linear or a norm.

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
