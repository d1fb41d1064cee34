"""RepVGG (Ding et al., CVPR 2021): the reference structural-reparameterization block.

Block (training form), every conv without bias and every BN in eval mode::

    y = relu( BN3(conv3x3(x)) + BN1(conv1x1(x)) + BNid(x) )

``conv1x1`` has padding 0 and the block's stride, so its output lines up with the centre tap of
``conv3x3`` (padding 1); ``BNid`` exists only when ``in_ch == out_ch`` and ``stride == 1``.
Everything inside the ``relu`` is affine in ``x``, so the deploy form is one biased 3x3 conv::

    W = fuse(W3, BN3) + pad_centre(fuse(W1, BN1)) + fuse(delta, BNid)
    fuse(W, BN) = (W * g / s, beta - mu * g / s),   s = sqrt(var + eps)

where ``delta`` is the identity written as a (grouped) 3x3 kernel: 1 at the centre tap of each
channel's own input slot. The ReLU stays outside the merged region.

The fold helpers (:func:`~repfx.models.reparam.fuse_bn`, ``pad_to_centre``,
``identity_kernel``, ``make_conv``) and the deploy switch live in :mod:`repfx.models.reparam`,
the hand-written oracle shared by the RepVGG, ACNet, DBB and MobileOne reference blocks; they
deliberately share no code with :mod:`repfx.algebra`. All fold arithmetic is float64, cast back
to the parameters' dtype at the end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .reparam import ReparamBlock, ReparamNet, conv_bn, fuse_conv_bn_branches

__all__ = ["RepVGG", "RepVGGBlock", "repvgg_a0", "repvgg_tiny"]


# --------------------------------------------------------------------------- block


class RepVGGBlock(ReparamBlock):
    """RepVGG block: ``relu(BN(conv3x3) + BN(conv1x1) + BN(x))``; reparameterizable.

    Attributes (training form): ``rbr_dense`` (``.conv`` 3x3, ``.bn``), ``rbr_1x1`` (``.conv``
    1x1, ``.bn``), ``rbr_identity`` (``BatchNorm2d`` or ``None``), ``nonlinearity`` (ReLU).
    Deploy form: ``rbr_reparam`` (one biased 3x3 conv); the branches become ``None``.
    """

    merged_name = "rbr_reparam"
    branch_names = ("rbr_dense", "rbr_1x1", "rbr_identity")
    like_name = "rbr_dense.conv.weight"

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(in_ch, out_ch, 3, stride, 1, groups)
        self.nonlinearity = nn.ReLU()
        self.rbr_identity: nn.BatchNorm2d | None = (
            nn.BatchNorm2d(in_ch) if in_ch == out_ch and stride == 1 else None
        )
        self.rbr_dense: nn.Sequential | None = conv_bn(in_ch, out_ch, 3, stride, 1, groups)
        self.rbr_1x1: nn.Sequential | None = conv_bn(in_ch, out_ch, 1, stride, 0, groups)
        self.rbr_reparam: nn.Conv2d | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.rbr_reparam is not None:
            return self.nonlinearity(self.rbr_reparam(x))
        assert self.rbr_dense is not None and self.rbr_1x1 is not None
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.nonlinearity(out)

    def equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """The merged 3x3 kernel and bias, float64."""
        assert self.rbr_dense is not None and self.rbr_1x1 is not None
        branches = [self.rbr_dense, self.rbr_1x1]
        return fuse_conv_bn_branches(branches, self.rbr_identity, 3, self.groups)

    def extra_repr(self) -> str:
        return f"{self.in_ch}, {self.out_ch}, stride={self.stride}, groups={self.groups}"


# --------------------------------------------------------------------------- network


class RepVGG(ReparamNet):
    """RepVGG classifier: a stride-2 stem block, four stages (first block of each stride 2),
    global average pool, linear head.

    ``widths`` are the four stage widths, ``stem_width`` the stem's; ``groups_map`` maps a
    block's global index (stem = 0) to its conv groups (RepVGG's ``override_groups_map``).
    """

    block_type = RepVGGBlock

    def __init__(
        self,
        num_blocks: Sequence[int],
        widths: Sequence[int],
        stem_width: int,
        num_classes: int = 1000,
        in_chans: int = 3,
        groups_map: Mapping[int, int] | None = None,
    ) -> None:
        if len(num_blocks) != 4 or len(widths) != 4:
            raise ValueError(f"need four stages, got blocks {num_blocks} and widths {widths}")
        super().__init__()
        groups_map = dict(groups_map or {})
        self.num_classes = num_classes
        self.stage0 = RepVGGBlock(in_chans, stem_width, stride=2)
        index, in_ch = 1, stem_width
        stages = []
        for depth, width in zip(num_blocks, widths, strict=True):
            blocks = []
            for i in range(depth):
                g = groups_map.get(index, 1)
                blocks.append(RepVGGBlock(in_ch, width, stride=2 if i == 0 else 1, groups=g))
                index, in_ch = index + 1, width
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[-1], num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stage0(x)
        return self.stage4(self.stage3(self.stage2(self.stage1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(torch.flatten(self.gap(self.forward_features(x)), 1))


def repvgg_a0(**kwargs: Any) -> RepVGG:
    """RepVGG-A0: blocks [2, 4, 14, 1], width multipliers [0.75, 0.75, 0.75, 2.5], stem 48.

    8.31M parameters in deploy form, 9.12M in training form (published: 8.30M / 9.11M).
    """
    a, b = 0.75, 2.5
    config = {
        "num_blocks": [2, 4, 14, 1],
        "widths": [int(64 * a), int(128 * a), int(256 * a), int(512 * b)],
        "stem_width": min(64, int(64 * a)),
    }
    return RepVGG(**{**config, **kwargs})


def repvgg_tiny(**kwargs: Any) -> RepVGG:
    """A few-thousand-parameter RepVGG for tests (stride-1 blocks carry identity branches)."""
    config = {"num_blocks": [1, 2, 2, 1], "widths": [8, 16, 16, 32], "stem_width": 8}
    return RepVGG(**{**config, **kwargs})
