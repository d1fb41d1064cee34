"""MobileOne (Vasu et al., CVPR 2023): over-parameterised conv branches, reparameterized.

Block (training form), every conv without bias, every BN in eval mode, K odd, padding K // 2::

    y = act( sum_i BN_i(convKxK_i(x)) + BNs(conv1x1(x)) + BNid(x) )

``num_conv_branches`` K x K branches; the 1x1 "scale" branch only when ``K > 1``; the identity
BN only when ``in_ch == out_ch`` and ``stride == 1``. Deploy form: one biased K x K conv
``reparam_conv`` (sum of the fused kernels, 1x1 centred, identity as a delta kernel), the
activation kept outside the merged region. Fold arithmetic is float64 and independent of
:mod:`repfx.algebra` (helpers in :mod:`repfx.models.reparam`).

The network follows MobileOne-S0: a stride-2 3x3 stem block, then stages of (depthwise K x K
block, pointwise 1x1 block) pairs, the first pair of each stage with stride 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .reparam import ReparamBlock, ReparamNet, conv_bn, fuse_conv_bn_branches

__all__ = ["MobileOne", "MobileOneBlock", "mobileone_tiny"]


class MobileOneBlock(ReparamBlock):
    """MobileOne block: ``act(sum of k conv-BN branches + 1x1 conv-BN + BN(x))``.

    Attributes (training form): ``rbr_conv`` (``ModuleList`` of ``num_conv_branches`` x
    ``Sequential(conv, bn)``), ``rbr_scale`` (``Sequential(conv 1x1, bn)`` or ``None`` when
    ``kernel == 1``), ``rbr_skip`` (``BatchNorm2d`` or ``None``), ``activation`` (ReLU, or
    Identity with ``act=False``). Deploy form: ``reparam_conv`` (one biased K x K conv); the
    branches become ``None``.
    """

    merged_name = "reparam_conv"
    branch_names = ("rbr_conv", "rbr_scale", "rbr_skip")
    like_name = "rbr_conv.0.conv.weight"

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int = 3,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        num_conv_branches: int = 1,
        act: bool = True,
    ) -> None:
        padding = kernel // 2 if padding is None else padding
        if kernel % 2 == 0 or padding != kernel // 2:
            raise ValueError(
                f"need an odd kernel and padding = kernel // 2, got {kernel}, {padding}"
            )
        super().__init__(in_ch, out_ch, kernel, stride, padding, groups)
        if num_conv_branches < 1:
            raise ValueError(f"need at least one conv branch, got {num_conv_branches}")
        self.num_conv_branches = num_conv_branches
        self.activation = nn.ReLU() if act else nn.Identity()
        self.rbr_skip: nn.BatchNorm2d | None = (
            nn.BatchNorm2d(in_ch) if in_ch == out_ch and stride == 1 else None
        )
        self.rbr_conv: nn.ModuleList | None = nn.ModuleList(
            conv_bn(in_ch, out_ch, kernel, stride, padding, groups)
            for _ in range(num_conv_branches)
        )
        self.rbr_scale: nn.Sequential | None = (
            conv_bn(in_ch, out_ch, 1, stride, 0, groups) if kernel > 1 else None
        )
        self.reparam_conv: nn.Conv2d | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam_conv is not None:
            return self.activation(self.reparam_conv(x))
        assert self.rbr_conv is not None
        out = self.rbr_conv[0](x)
        for branch in self.rbr_conv[1:]:
            out = out + branch(x)
        if self.rbr_scale is not None:
            out = out + self.rbr_scale(x)
        if self.rbr_skip is not None:
            out = out + self.rbr_skip(x)
        return self.activation(out)

    def equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """The merged K x K kernel and bias, float64."""
        assert self.rbr_conv is not None
        branches = list(self.rbr_conv)  # K x K, then the 1x1 scale branch
        if self.rbr_scale is not None:
            branches.append(self.rbr_scale)
        return fuse_conv_bn_branches(branches, self.rbr_skip, self.kernel, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_ch}, {self.out_ch}, kernel={self.kernel}, stride={self.stride}, "
            f"groups={self.groups}, num_conv_branches={self.num_conv_branches}"
        )


class MobileOne(ReparamNet):
    """MobileOne classifier: stem block, four stages of depthwise + pointwise block pairs,
    global average pool, linear head."""

    block_type = MobileOneBlock

    def __init__(
        self, num_blocks: Sequence[int], widths: Sequence[int], stem_width: int,
        num_conv_branches: int = 4, num_classes: int = 1000, in_chans: int = 3,
    ) -> None:  # fmt: skip
        if len(num_blocks) != len(widths) or not num_blocks:
            raise ValueError(f"blocks {num_blocks} and widths {widths} must match in length")
        super().__init__()
        self.num_classes = num_classes
        self.stage0 = MobileOneBlock(in_chans, stem_width, 3, stride=2, padding=1)
        in_ch = stem_width
        stages = []
        for depth, width in zip(num_blocks, widths, strict=True):
            blocks: list[nn.Module] = []
            for i in range(depth):
                stride = 2 if i == 0 else 1
                blocks.append(
                    MobileOneBlock(
                        in_ch,
                        in_ch,
                        3,
                        stride,
                        1,
                        groups=in_ch,
                        num_conv_branches=num_conv_branches,
                    )
                )
                blocks.append(
                    MobileOneBlock(in_ch, width, 1, 1, 0, num_conv_branches=num_conv_branches)
                )
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_ch, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stage0(x))
        return self.linear(torch.flatten(self.gap(x), 1))


def mobileone_tiny(**kwargs: Any) -> MobileOne:
    """Test-size MobileOne (S0 layout, tiny widths, two conv branches per block)."""
    config = {
        "num_blocks": [1, 2, 2, 1],
        "widths": [8, 16, 16, 32],
        "stem_width": 8,
        "num_conv_branches": 2,
    }
    return MobileOne(**{**config, **kwargs})
