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

The fold helpers here (:func:`fuse_bn`, :func:`pad_to_centre`, :func:`identity_kernel`,
:func:`make_conv`) are the hand-written oracle shared by the RepVGG, ACNet, DBB and MobileOne
reference blocks; they deliberately share no code with :mod:`repfx.algebra`. All fold arithmetic
is float64, cast back to the parameters' dtype at the end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "RepVGG",
    "RepVGGBlock",
    "conv_bn",
    "fuse_bn",
    "identity_kernel",
    "make_conv",
    "pad_to_centre",
    "repvgg_a0",
    "repvgg_tiny",
    "switch_all_to_deploy",
]


# --------------------------------------------------------------------------- oracle helpers


def conv_bn(
    in_ch: int,
    out_ch: int,
    kernel: int | tuple[int, int],
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
) -> nn.Sequential:
    """``Sequential(conv=Conv2d(bias=False), bn=BatchNorm2d)``: RepVGG's ``conv_bn`` layout."""
    seq = nn.Sequential()
    seq.add_module(
        "conv",
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, groups=groups, bias=False),
    )
    seq.add_module("bn", nn.BatchNorm2d(out_ch))
    return seq


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """``(g / s, beta - mu * g / s)`` of an eval-mode BN, in float64."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    mean = bn.running_mean.detach().double()
    std = torch.sqrt(bn.running_var.detach().double() + bn.eps)
    if bn.weight is not None and bn.bias is not None:
        gamma, beta = bn.weight.detach().double(), bn.bias.detach().double()
    else:
        gamma, beta = torch.ones_like(mean), torch.zeros_like(mean)
    scale = gamma / std
    return scale, beta - mean * scale


def fuse_bn(
    kernel: Tensor, bn: nn.BatchNorm2d, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(W', b')`` in float64 with ``BN(conv(x; W, bias)) == conv(x; W', b')`` (eval-mode BN)."""
    scale, shift = _bn_scale_shift(bn)
    k = kernel.detach().double() * scale.reshape(-1, 1, 1, 1)
    b = shift if bias is None else shift + bias.detach().double() * scale
    return k, b


def pad_to_centre(kernel: Tensor, size: int) -> Tensor:
    """Zero-pad a ``(O, I, kh, kw)`` kernel (odd sides) to ``size x size``, centred."""
    kh, kw = kernel.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0 or size % 2 == 0 or kh > size or kw > size:
        raise ValueError(f"cannot centre a {kh}x{kw} kernel in {size}x{size}")
    ph, pw = (size - kh) // 2, (size - kw) // 2
    return torch.nn.functional.pad(kernel, [pw, pw, ph, ph])


def identity_kernel(channels: int, groups: int, size: int, like: Tensor) -> Tensor:
    """The identity as a float64 ``(C, C // groups, size, size)`` grouped-conv kernel."""
    if channels % groups:
        raise ValueError(f"{channels} channels do not split into {groups} groups")
    per_group = channels // groups
    k = torch.zeros(channels, per_group, size, size, dtype=torch.float64, device=like.device)
    idx = torch.arange(channels, device=like.device)
    k[idx, idx % per_group, size // 2, size // 2] = 1.0
    return k


def make_conv(
    weight: Tensor,
    bias: Tensor,
    *,
    stride: int | tuple[int, int],
    padding: int | tuple[int, int],
    groups: int,
    like: Tensor,
) -> nn.Conv2d:
    """A biased ``nn.Conv2d`` holding ``weight`` / ``bias`` cast to ``like``'s dtype and device."""
    out_ch, in_per_group, kh, kw = weight.shape
    conv = nn.Conv2d(
        in_per_group * groups,
        out_ch,
        (kh, kw),
        stride=stride,
        padding=padding,
        groups=groups,
        bias=True,
        device=like.device,
        dtype=like.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(weight.to(like.dtype))
        conv.bias.copy_(bias.to(like.dtype))
    return conv


def switch_all_to_deploy(model: nn.Module) -> None:
    """Call ``switch_to_deploy()`` on every sub-module of ``model`` (not ``model`` itself)."""
    blocks = [m for m in model.modules() if m is not model and hasattr(m, "switch_to_deploy")]
    for block in blocks:
        block.switch_to_deploy()


class ReparamNet(nn.Module):
    """A net of reparameterizable blocks (of type ``block_type``), with the conversions."""

    block_type: type[nn.Module]

    def blocks(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, self.block_type)]

    def switch_to_deploy(self) -> ReparamNet:
        """Convert every block to its deploy form, in place; idempotent."""
        switch_all_to_deploy(self)
        return self


class PlainNet(ReparamNet):
    """``block → ReLU`` layers, global average pool, linear head (``num_classes == 0``: none)."""

    def __init__(self, layers: list[nn.Module], width: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(*[m for block in layers for m in (block, nn.ReLU())])
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.gap(self.features(x)), 1))


# --------------------------------------------------------------------------- block


class RepVGGBlock(nn.Module):
    """RepVGG block: ``relu(BN(conv3x3) + BN(conv1x1) + BN(x))``; reparameterizable.

    Attributes (training form): ``rbr_dense`` (``.conv`` 3x3, ``.bn``), ``rbr_1x1`` (``.conv``
    1x1, ``.bn``), ``rbr_identity`` (``BatchNorm2d`` or ``None``), ``nonlinearity`` (ReLU).
    Deploy form: ``rbr_reparam`` (one biased 3x3 conv); the branches become ``None``.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        if in_ch % groups or out_ch % groups:
            raise ValueError(f"channels {in_ch} -> {out_ch} do not split into {groups} groups")
        self.in_ch, self.out_ch, self.stride, self.groups = in_ch, out_ch, stride, groups
        self.nonlinearity = nn.ReLU()
        self.rbr_identity: nn.BatchNorm2d | None = (
            nn.BatchNorm2d(in_ch) if in_ch == out_ch and stride == 1 else None
        )
        self.rbr_dense: nn.Sequential | None = conv_bn(in_ch, out_ch, 3, stride, 1, groups)
        self.rbr_1x1: nn.Sequential | None = conv_bn(in_ch, out_ch, 1, stride, 0, groups)
        self.rbr_reparam: nn.Conv2d | None = None

    @property
    def is_deployed(self) -> bool:
        return self.rbr_reparam is not None

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
        k, b = fuse_bn(self.rbr_dense.conv.weight, self.rbr_dense.bn)
        k1, b1 = fuse_bn(self.rbr_1x1.conv.weight, self.rbr_1x1.bn)
        k, b = k + pad_to_centre(k1, 3), b + b1
        if self.rbr_identity is not None:
            kid = identity_kernel(self.in_ch, self.groups, 3, k)
            kid, bid = fuse_bn(kid, self.rbr_identity)
            k, b = k + kid, b + bid
        return k, b

    def switch_to_deploy(self) -> RepVGGBlock:
        """Merge the three branches into ``rbr_reparam``, in place; idempotent."""
        if self.rbr_reparam is not None:
            return self
        assert self.rbr_dense is not None
        like = self.rbr_dense.conv.weight
        k, b = self.equivalent_kernel_bias()
        self.rbr_reparam = make_conv(
            k, b, stride=self.stride, padding=1, groups=self.groups, like=like
        )
        self.rbr_dense = self.rbr_1x1 = self.rbr_identity = None
        return self

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
        super().__init__()
        if len(num_blocks) != 4 or len(widths) != 4:
            raise ValueError(f"need four stages, got blocks {num_blocks} and widths {widths}")
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
