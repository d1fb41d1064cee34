"""ACNet (Ding et al., ICCV 2019): asymmetric convolution blocks.

Block (training form), every conv without bias, every BN in eval mode, odd ``k``::

    y = BNsq(conv_kxk(x)) + BNh(conv_1xk(x)) + BNv(conv_kx1(x))

The 1xk kernel plays the role of the k x k kernel's centre row, the kx1 kernel its centre
column. With the square conv padded by ``p`` on every side, centre alignment needs the 1xk conv
padded by ``p - k // 2`` rows and ``p`` columns (and the kx1 conv the transpose); when
``p < k // 2`` that row padding is negative and the input is cropped instead (ACNet's
``CropLayer``). Deploy form: one biased k x k conv with padding ``p``::

    W = fuse(Wsq, BNsq) + centre_row(fuse(Wh, BNh)) + centre_col(fuse(Wv, BNv))

Fold arithmetic is float64 and independent of :mod:`repfx.algebra` (helpers in
:mod:`repfx.models.reparam`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from .reparam import OddKernelBlock, PlainNet, centred, fuse_bn, sum_branches

__all__ = ["ACBlock", "ACNet", "Crop", "acnet_tiny"]


class Crop(nn.Module):
    """Drop ``rows`` rows from top and bottom and ``cols`` columns from left and right."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols

    def forward(self, x: Tensor) -> Tensor:
        h, w = self.rows, self.cols
        if h:
            x = x[:, :, h:-h, :]
        if w:
            x = x[:, :, :, w:-w]
        return x

    def extra_repr(self) -> str:
        return f"rows={self.rows}, cols={self.cols}"


class ACBlock(OddKernelBlock):
    """Asymmetric convolution block: square + horizontal + vertical conv-BN branches, summed.

    Attributes (training form): ``square_conv``/``square_bn`` (k x k), ``hor_conv``/``hor_bn``
    (1 x k), ``ver_conv``/``ver_bn`` (k x 1), and ``hor_crop``/``ver_crop`` (:class:`Crop`, or
    ``None`` when ``padding >= kernel // 2``). Deploy form: ``fused_conv`` (one biased k x k
    conv); every branch attribute becomes ``None``. No activation inside the block.
    """

    merged_name = "fused_conv"
    branch_names = (
        "square_conv",
        "hor_conv",
        "ver_conv",
        "square_bn",
        "hor_bn",
        "ver_bn",
        "hor_crop",
        "ver_crop",
    )
    like_name = "square_conv.weight"

    @classmethod
    def _check_kernel(cls, kernel: int, padding: int) -> None:
        if kernel % 2 == 0:
            raise ValueError(f"ACBlock needs an odd kernel, got {kernel}")

    def _add_branches(self) -> None:
        in_ch, out_ch, kernel = self.in_ch, self.out_ch, self.kernel
        stride, padding, groups = self.stride, self.padding, self.groups
        if padding < 0:
            raise ValueError(f"padding must be non-negative, got {padding}")
        offset = padding - kernel // 2  # centre-row padding of the 1xk conv (negative: crop)
        along = max(offset, 0)

        def conv(k: tuple[int, int], pad: tuple[int, int]) -> nn.Conv2d:
            return nn.Conv2d(in_ch, out_ch, k, stride, pad, groups=groups, bias=False)

        self.square_conv: nn.Conv2d | None = conv((kernel, kernel), (padding, padding))
        self.square_bn: nn.BatchNorm2d | None = nn.BatchNorm2d(out_ch)
        self.hor_crop: Crop | None = Crop(-offset, 0) if offset < 0 else None
        self.hor_conv: nn.Conv2d | None = conv((1, kernel), (along, padding))
        self.hor_bn: nn.BatchNorm2d | None = nn.BatchNorm2d(out_ch)
        self.ver_crop: Crop | None = Crop(0, -offset) if offset < 0 else None
        self.ver_conv: nn.Conv2d | None = conv((kernel, 1), (padding, along))
        self.ver_bn: nn.BatchNorm2d | None = nn.BatchNorm2d(out_ch)
        self.fused_conv: nn.Conv2d | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.fused_conv is not None:
            return self.fused_conv(x)
        assert self.square_conv is not None and self.square_bn is not None
        assert self.hor_conv is not None and self.hor_bn is not None
        assert self.ver_conv is not None and self.ver_bn is not None
        xh = x if self.hor_crop is None else self.hor_crop(x)
        xv = x if self.ver_crop is None else self.ver_crop(x)
        square = self.square_bn(self.square_conv(x))
        return square + self.hor_bn(self.hor_conv(xh)) + self.ver_bn(self.ver_conv(xv))

    def equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """The merged k x k kernel and bias, float64."""
        assert self.square_conv is not None and self.square_bn is not None
        assert self.hor_conv is not None and self.hor_bn is not None
        assert self.ver_conv is not None and self.ver_bn is not None
        return sum_branches(
            [
                fuse_bn(self.square_conv.weight, self.square_bn),
                centred(fuse_bn(self.hor_conv.weight, self.hor_bn), self.kernel),
                centred(fuse_bn(self.ver_conv.weight, self.ver_bn), self.kernel),
            ]
        )


# --------------------------------------------------------------------------- network

# (out_ch, kernel, stride, padding, groups); groups == 0 means depthwise
_TINY = ((8, 3, 2, 1, 1), (16, 3, 2, 1, 1), (16, 3, 1, 1, 0), (16, 5, 1, 1, 2), (32, 5, 2, 2, 1))


class ACNet(PlainNet):
    """A plain conv net of ``ACBlock -> ReLU`` layers, global average pool, linear head.

    ``layers`` lists ``(out_ch, kernel, stride, padding, groups)`` per block; ``groups == 0``
    means depthwise (``groups = in_ch``).
    """

    block_type = ACBlock

    def __init__(
        self,
        layers: Sequence[tuple[int, int, int, int, int]] = _TINY,
        num_classes: int = 1000,
        in_chans: int = 3,
    ) -> None:
        blocks, in_ch = [], in_chans
        for out_ch, kernel, stride, padding, groups in layers:
            g = in_ch if groups == 0 else groups
            blocks.append(ACBlock(in_ch, out_ch, kernel, stride, padding, g))
            in_ch = out_ch
        super().__init__(blocks, in_ch, num_classes)


def acnet_tiny(**kwargs: Any) -> ACNet:
    """Test-size ACNet: 3x3 and 5x5 blocks, strided, grouped, depthwise, one cropping block."""
    return ACNet(**{"layers": _TINY, **kwargs})
