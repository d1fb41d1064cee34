"""Diverse Branch Block (Ding et al., CVPR 2021), with the paper's exact-conversion padding.

Block (training form), K odd, padding ``p = K // 2``, groups ``g``, every BN in eval mode::

    y = BN(convKxK(x))                                            dbb_origin
      + BN(conv1x1(x))                                            dbb_1x1 (not for depthwise)
      + BN(avgpoolK(BNAndPad(conv1x1(x))))                        dbb_avg
      + BN(convKxK(BNAndPad(conv1x1(x))))                         dbb_1x1_kxk

The trap: a BN has a bias, so its output for a zero-padded border is not zero. A K x K conv
(or average pool) that zero-pads *after* a BN sees 0 at the border where the merged single conv
(which zero-pads ``x`` itself) would see ``BN(conv1x1(0)) = BN(0)``; the two disagree on every
border pixel. DBB's :class:`BNAndPad` fixes the training form instead of the fold: it applies
the BN and then pads with the BN's own output for zero input, ``beta - mu * gamma / s``, so the
K x K conv / pool that follows uses padding 0. With that, every branch is exactly affine in the
zero-padded ``x`` and the deploy form is one biased K x K conv (padding ``p``)::

    W = fuse(Wkxk, BN) + pad_centre(fuse(W1, BN)) + compose(fuse(W1, BN1), fuse(avg, BN2))
        + compose(fuse(W1', BN1'), fuse(Wkxk', BN2'))
    compose((A, a), (B, b)) = (B ∘ A, b + sum_{j,h,w} B[o, j, h, w] * a[j])   per group

with ``avg`` the uniform ``1/K²`` kernel written as a grouped conv. As in DBB, depthwise blocks
(``groups == in_ch == out_ch``) drop the 1x1 branch, pool ``x`` directly (plain zero padding is
exact there: nothing biased precedes it) and use ``2 * in_ch`` internal channels in the
1x1 -> KxK branch. Fold arithmetic is float64 and independent of :mod:`repfx.algebra`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .reparam import OddKernelBlock, PlainNet, conv_bn, fuse_bn, fuse_conv_bn_branches, sum_branches

__all__ = ["BNAndPad", "DBBlock", "DBNet", "avg_kernel", "compose_1x1_kxk", "dbb_tiny"]


class BNAndPad(nn.Module):
    """BatchNorm, then pad ``pad`` pixels on every side with the BN's output for zero input.

    DBB's ``BNAndPadLayer``: the border value is ``beta - running_mean * gamma / sqrt(var + eps)``
    (from the running statistics, gamma/beta detached, in training mode too), which is what a
    preceding bias-free conv would produce for the zero-padded input. This makes
    ``convKxK(BNAndPad(conv1x1(x)))`` (conv padding 0) equal to one KxK conv on zero-padded
    ``x``, so the training form converts exactly. DBB writes the border by in-place slice
    assignment; here it is ``torch.where`` on a border mask (same values, and torch.fx can trace
    it).
    """

    def __init__(self, num_features: int, pad: int) -> None:
        super().__init__()
        if pad < 0:
            raise ValueError(f"pad must be non-negative, got {pad}")
        self.pad = pad
        self.bn = nn.BatchNorm2d(num_features)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(x)
        if self.pad == 0:
            return out
        bn = self.bn
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None and bn.bias is not None:
            value = bn.bias.detach() - bn.running_mean * bn.weight.detach() * scale
        else:
            value = -bn.running_mean * scale
        p = [self.pad] * 4
        border = F.pad(torch.zeros_like(out[:1, :1]), p, value=1.0) > 0.5
        return torch.where(border, value.reshape(1, -1, 1, 1), F.pad(out, p))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


def avg_kernel(channels: int, groups: int, size: int, like: Tensor) -> Tensor:
    """``avgpool(size)`` on ``channels`` channels as a float64 grouped-conv kernel."""
    per_group = channels // groups
    k = torch.zeros(channels, per_group, size, size, dtype=torch.float64, device=like.device)
    idx = torch.arange(channels, device=like.device)
    k[idx, idx % per_group] = 1.0 / (size * size)
    return k


def compose_1x1_kxk(
    k1: Tensor, b1: Tensor, k2: Tensor, b2: Tensor, groups: int
) -> tuple[Tensor, Tensor]:
    """``conv(conv(x; k1, b1); k2, b2)`` for a 1x1 ``k1`` then a KxK ``k2``, both ``groups``.

    Exact when the KxK conv's input is padded with ``b1`` (see :class:`BNAndPad`).
    """
    mid, in_per_group = k1.shape[:2]
    out = k2.shape[0]
    a = k1.reshape(groups, mid // groups, in_per_group)
    b = k2.reshape(groups, out // groups, mid // groups, *k2.shape[-2:])
    kernel = torch.einsum("gojhw,gjc->gochw", b, a).reshape(out, in_per_group, *k2.shape[-2:])
    bias = torch.einsum("gojhw,gj->go", b, b1.reshape(groups, -1)).reshape(out)
    return kernel, bias + b2


class DBBlock(OddKernelBlock):
    """Diverse Branch Block (training form), reparameterizable to one KxK conv.

    Attributes (training form):

    - ``dbb_origin``: ``.conv`` (KxK), ``.bn``
    - ``dbb_1x1``: ``.conv`` (1x1, block stride), ``.bn`` — ``None`` for depthwise blocks
    - ``dbb_avg``: ``.conv`` (1x1), ``.bn`` (:class:`BNAndPad`), ``.avg`` (``AvgPool2d``, padding
      0), ``.avgbn``; depthwise blocks have no ``.conv``/``.bn`` and ``.avg`` pads ``x`` itself
    - ``dbb_1x1_kxk``: ``.conv1`` (1x1, identity-initialised when it has ``in_ch`` outputs),
      ``.bn1`` (:class:`BNAndPad`), ``.conv2`` (KxK, padding 0), ``.bn2``

    Deploy form: ``dbb_reparam`` (one biased KxK conv); the branches become ``None``. No
    activation inside the block.
    """

    merged_name = "dbb_reparam"
    branch_names = ("dbb_origin", "dbb_1x1", "dbb_avg", "dbb_1x1_kxk")
    like_name = "dbb_origin.conv.weight"

    @classmethod
    def _check_kernel(cls, kernel: int, padding: int) -> None:
        if kernel % 2 == 0 or padding != kernel // 2:
            raise ValueError(
                f"DBBlock needs an odd kernel and padding kernel // 2, got {kernel}, {padding}"
            )

    def _add_branches(self) -> None:
        in_ch, out_ch, kernel = self.in_ch, self.out_ch, self.kernel
        stride, padding, groups = self.stride, self.padding, self.groups
        depthwise = groups == in_ch == out_ch
        self.dbb_origin: nn.Sequential | None = conv_bn(
            in_ch, out_ch, kernel, stride, padding, groups
        )
        self.dbb_1x1: nn.Sequential | None = (
            None if depthwise else conv_bn(in_ch, out_ch, 1, stride, 0, groups)
        )
        avg = nn.Sequential()
        if depthwise:
            avg.add_module("avg", nn.AvgPool2d(kernel, stride, padding))
        else:
            avg.add_module("conv", nn.Conv2d(in_ch, out_ch, 1, groups=groups, bias=False))
            avg.add_module("bn", BNAndPad(out_ch, padding))
            avg.add_module("avg", nn.AvgPool2d(kernel, stride, 0))
        avg.add_module("avgbn", nn.BatchNorm2d(out_ch))
        self.dbb_avg: nn.Sequential | None = avg
        mid = 2 * in_ch if depthwise else in_ch
        seq = nn.Sequential()
        seq.add_module("conv1", nn.Conv2d(in_ch, mid, 1, groups=groups, bias=False))
        seq.add_module("bn1", BNAndPad(mid, padding))
        seq.add_module(
            "conv2", nn.Conv2d(mid, out_ch, kernel, stride, 0, groups=groups, bias=False)
        )
        seq.add_module("bn2", nn.BatchNorm2d(out_ch))
        if mid == in_ch:
            nn.init.dirac_(seq.conv1.weight, groups)
        self.dbb_1x1_kxk: nn.Sequential | None = seq
        self.dbb_reparam: nn.Conv2d | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.dbb_reparam is not None:
            return self.dbb_reparam(x)
        assert self.dbb_origin is not None and self.dbb_avg is not None
        assert self.dbb_1x1_kxk is not None
        out = self.dbb_origin(x)
        if self.dbb_1x1 is not None:
            out = out + self.dbb_1x1(x)
        return out + self.dbb_avg(x) + self.dbb_1x1_kxk(x)

    def equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """The merged KxK kernel and bias, float64."""
        assert self.dbb_origin is not None and self.dbb_avg is not None
        assert self.dbb_1x1_kxk is not None
        conv_bns = [branch for branch in (self.dbb_origin, self.dbb_1x1) if branch is not None]
        convs = fuse_conv_bn_branches(conv_bns, None, self.kernel, self.groups)
        return sum_branches([convs, self._avg_kernel_bias(), self._1x1_kxk_kernel_bias()])

    def _avg_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """``dbb_avg``: the pool as a kernel, after its 1x1 conv where it has one."""
        avg = self.dbb_avg
        like = self.dbb_origin.conv.weight
        ka, ba = fuse_bn(avg_kernel(self.out_ch, self.groups, self.kernel, like), avg.avgbn)
        if hasattr(avg, "conv"):
            kc, bc = fuse_bn(avg.conv.weight, avg.bn.bn)
            ka, ba = compose_1x1_kxk(kc, bc, ka, ba, self.groups)
        return ka, ba

    def _1x1_kxk_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """``dbb_1x1_kxk``: its 1x1 conv then its KxK conv, composed."""
        seq = self.dbb_1x1_kxk
        kf, bf = fuse_bn(seq.conv1.weight, seq.bn1.bn)
        ks, bs = fuse_bn(seq.conv2.weight, seq.bn2)
        return compose_1x1_kxk(kf, bf, ks, bs, self.groups)


# --------------------------------------------------------------------------- network

# (out_ch, kernel, stride, groups); groups == 0 means depthwise; padding is kernel // 2
_TINY = ((8, 3, 2, 1), (16, 3, 2, 2), (16, 3, 1, 0), (16, 5, 1, 1), (32, 3, 2, 1))


class DBNet(PlainNet):
    """A plain conv net of ``DBBlock -> ReLU`` layers, global average pool, linear head.

    ``layers`` lists ``(out_ch, kernel, stride, groups)`` per block (padding ``kernel // 2``);
    ``groups == 0`` means depthwise (``groups = in_ch``).
    """

    block_type = DBBlock

    def __init__(
        self,
        layers: Sequence[tuple[int, int, int, int]] = _TINY,
        num_classes: int = 1000,
        in_chans: int = 3,
    ) -> None:
        blocks, in_ch = [], in_chans
        for out_ch, kernel, stride, groups in layers:
            g = in_ch if groups == 0 else groups
            blocks.append(DBBlock(in_ch, out_ch, kernel, stride, kernel // 2, g))
            in_ch = out_ch
        super().__init__(blocks, in_ch, num_classes)


def dbb_tiny(**kwargs: Any) -> DBNet:
    """Test-size DBB net: strided, grouped, depthwise and 5x5 blocks."""
    return DBNet(**{"layers": _TINY, **kwargs})
