"""What the reparameterizable reference families (RepVGG, ACNet, DBB, MobileOne) share: the
hand-written fold oracle and the deploy switch of their blocks.

Every block is a sum of branches, each affine in the block's input, that one biased conv
replaces. A conv without bias followed by an eval-mode BN folds into one biased conv::

    fuse(W, BN) = (W * g / s, beta - mu * g / s),   s = sqrt(var + eps)

a smaller odd kernel joins a K x K one zero-padded to its centre (:func:`pad_to_centre`), the
identity joins as a delta kernel (:func:`identity_kernel`: 1 at the centre tap of each
channel's own input slot), and the branches' kernels and biases add up
(:func:`sum_branches`). :class:`ReparamBlock` holds what the blocks do alike: their geometry,
and ``switch_to_deploy``, which builds the merged conv (:func:`make_conv`) from the block's
``equivalent_kernel_bias()``.

The helpers deliberately share no code with :mod:`repfx.algebra`: the blocks are the tests'
oracles for repfx's folds. All fold arithmetic is float64, cast back to the parameters' dtype at
the end.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import ClassVar, TypeVar

import torch
from torch import Tensor, nn

__all__ = [
    "OddKernelBlock",
    "PlainNet",
    "ReparamBlock",
    "ReparamNet",
    "centred",
    "conv_bn",
    "fuse_bn",
    "fuse_conv_bn",
    "fuse_conv_bn_branches",
    "fuse_identity",
    "identity_kernel",
    "make_conv",
    "pad_to_centre",
    "sum_branches",
    "switch_all_to_deploy",
]

KernelBias = tuple[Tensor, Tensor]
B = TypeVar("B", bound="ReparamBlock")


# --------------------------------------------------------------------------- fold oracle


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


def _bn_scale_shift(bn: nn.BatchNorm2d) -> KernelBias:
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


def fuse_bn(kernel: Tensor, bn: nn.BatchNorm2d, bias: Tensor | None = None) -> KernelBias:
    """``(W', b')`` in float64 with ``BN(conv(x; W, bias)) == conv(x; W', b')`` (eval-mode BN)."""
    scale, shift = _bn_scale_shift(bn)
    k = kernel.detach().double() * scale.reshape(-1, 1, 1, 1)
    b = shift if bias is None else shift + bias.detach().double() * scale
    return k, b


def fuse_conv_bn(branch: nn.Module) -> KernelBias:
    """:func:`fuse_bn` of a :func:`conv_bn` branch (its ``.conv`` and ``.bn``)."""
    return fuse_bn(branch.conv.weight, branch.bn)


def pad_to_centre(kernel: Tensor, size: int) -> Tensor:
    """Zero-pad a ``(O, I, kh, kw)`` kernel (odd sides) to ``size x size``, centred."""
    kh, kw = kernel.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0 or size % 2 == 0 or kh > size or kw > size:
        raise ValueError(f"cannot centre a {kh}x{kw} kernel in {size}x{size}")
    ph, pw = (size - kh) // 2, (size - kw) // 2
    return torch.nn.functional.pad(kernel, [pw, pw, ph, ph])


def centred(branch: KernelBias, size: int) -> KernelBias:
    """A branch's kernel padded to ``size x size`` (:func:`pad_to_centre`), its bias as is."""
    kernel, bias = branch
    return pad_to_centre(kernel, size), bias


def identity_kernel(channels: int, groups: int, size: int, like: Tensor) -> Tensor:
    """The identity as a float64 ``(C, C // groups, size, size)`` grouped-conv kernel."""
    if channels % groups:
        raise ValueError(f"{channels} channels do not split into {groups} groups")
    per_group = channels // groups
    k = torch.zeros(channels, per_group, size, size, dtype=torch.float64, device=like.device)
    idx = torch.arange(channels, device=like.device)
    k[idx, idx % per_group, size // 2, size // 2] = 1.0
    return k


def fuse_identity(bn: nn.BatchNorm2d, groups: int, size: int, like: Tensor) -> KernelBias:
    """An identity branch ``BN(x)`` as a ``size x size`` kernel and bias (``like``: device)."""
    return fuse_bn(identity_kernel(bn.num_features, groups, size, like), bn)


def fuse_conv_bn_branches(
    branches: Sequence[nn.Module], identity: nn.BatchNorm2d | None, size: int, groups: int
) -> KernelBias:
    """The ``size x size`` kernel and bias of parallel :func:`conv_bn` branches (odd kernels up
    to ``size``, centred) and, where given, an identity branch ``identity(x)``, added in order."""
    parts = [centred(fuse_conv_bn(branch), size) for branch in branches]
    if identity is not None:
        parts.append(fuse_identity(identity, groups, size, like=branches[0].conv.weight))
    return sum_branches(parts)


def sum_branches(branches: Iterable[KernelBias]) -> KernelBias:
    """The kernel and bias of parallel branches' sum, added in order."""
    parts = iter(branches)
    kernel, bias = next(parts)
    for k, b in parts:
        kernel, bias = kernel + k, bias + b
    return kernel, bias


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


# --------------------------------------------------------------------------- blocks


class ReparamBlock(nn.Module):
    """Parallel branches that one biased conv replaces; the deploy switch the blocks share.

    A subclass names its merged conv (``merged_name``: ``None`` until :meth:`switch_to_deploy`),
    its branch attributes (``branch_names``: the switch sets them to ``None``) and the parameter
    whose dtype and device the merged conv takes (``like_name``, a dotted path); it computes the
    merged kernel and bias in :meth:`equivalent_kernel_bias`. Each block writes its own
    ``forward``, in plain ``self.<branch>(x)`` calls, like the code repfx is written to fold.
    """

    merged_name: ClassVar[str]
    branch_names: ClassVar[tuple[str, ...]]
    like_name: ClassVar[str]

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int, padding: int, groups: int
    ) -> None:
        super().__init__()
        if in_ch % groups or out_ch % groups:
            raise ValueError(f"channels {in_ch} -> {out_ch} do not split into {groups} groups")
        self.in_ch, self.out_ch, self.kernel = in_ch, out_ch, kernel
        self.stride, self.padding, self.groups = stride, padding, groups

    @property
    def is_deployed(self) -> bool:
        return getattr(self, self.merged_name) is not None

    def equivalent_kernel_bias(self) -> KernelBias:
        """The merged kernel and bias, float64."""
        raise NotImplementedError

    def switch_to_deploy(self: B) -> B:
        """Merge every branch into the merged conv, in place; idempotent."""
        if self.is_deployed:
            return self
        like = self.get_parameter(self.like_name)
        k, b = self.equivalent_kernel_bias()
        merged = make_conv(
            k, b, stride=self.stride, padding=self.padding, groups=self.groups, like=like
        )
        setattr(self, self.merged_name, merged)
        for name in self.branch_names:
            setattr(self, name, None)
        return self

    def extra_repr(self) -> str:
        return (
            f"{self.in_ch}, {self.out_ch}, kernel={self.kernel}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}"
        )


class OddKernelBlock(ReparamBlock):
    """A block built as ``(in_ch, out_ch, kernel=3, stride=1, padding=1, groups=1)`` (ACNet's
    and DBB's): :meth:`_check_kernel` first, then the groups, then :meth:`_add_branches`."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, padding: int = 1,
        groups: int = 1,
    ) -> None:  # fmt: skip
        self._check_kernel(kernel, padding)
        super().__init__(in_ch, out_ch, kernel, stride, padding, groups)
        self._add_branches()

    @classmethod
    def _check_kernel(cls, kernel: int, padding: int) -> None:
        """Raise ``ValueError`` for a kernel size and padding the block cannot merge."""
        raise NotImplementedError

    def _add_branches(self) -> None:
        """Build the branches (training form) from the block's geometry, and set the merged
        conv's attribute to ``None``."""
        raise NotImplementedError


# --------------------------------------------------------------------------- networks


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
