"""PoolFormer and RIFormer: the MetaFormer reference family (mmpretrain layout).

Macro design (PoolFormer / mmpretrain)::

    x -> patch_embed (conv k7 s4 p2)
      -> network = [stage0, down0, stage1, down1, stage2, down2, stage3]
         (stage = Sequential of blocks, down = conv k3 s2 p1, no norm around either)
      -> norm (GroupNorm(1, C)) -> global average pool -> head (Linear)

Block (training form), with ``N1, N2 = GroupNorm(1, C)`` and LayerScale vectors ``ls1, ls2``::

    y = x + drop_path(ls1 * M(N1(x)))
    z = y + drop_path(ls2 * MLP(N2(y)))        MLP = conv1x1 (C->rC) -> GELU -> conv1x1 (rC->C)

PoolFormer's token mixer is ``M(u) = avgpool3x3(u) - u``; RIFormer's is the per-channel affine
``M(u) = A(u) - u`` with ``A(u) = s * u + t`` (a depthwise 1x1 conv with bias).

RIFormer deploy form (the paper's reparameterization). GroupNorm's statistics do not depend on
its affine parameters, so with ``N1(x) = gamma * n(x) + beta``::

    A(N1(x)) - N1(x) = (s - 1) * (gamma * n(x) + beta) + t
                     = gamma' * n(x) + beta',   gamma' = gamma * (s - 1),
                                                beta'  = beta * (s - 1) + t

and the block becomes ``y = x + drop_path(ls1 * N1'(x))``: the token mixer is gone, the
LayerScale multiply is kept.

Hand-folded ideal (used as a benchmark reference), exact as well: ``gamma'' = ls1 * gamma'``,
``beta'' = ls1 * beta'`` so ``y = x + drop_path(N1''(x))``, and ``ls2`` scales the output
channels of the MLP's last conv (``W2[o] *= ls2[o]``, ``b2[o] *= ls2[o]``) so
``z = y + drop_path(MLP'(N2(y)))``.

All folds are computed in float64 and cast back to the parameters' dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = [
    "Affine",
    "DropPath",
    "MetaFormer",
    "MetaFormerBlock",
    "Mlp",
    "PatchEmbed",
    "PoolFormer",
    "PoolFormerBlock",
    "Pooling",
    "RIFormer",
    "RIFormerBlock",
    "deploy_mixer_into_norm",
    "group_norm",
    "poolformer_m36",
    "poolformer_m48",
    "poolformer_s12",
    "poolformer_s24",
    "poolformer_s36",
    "poolformer_tiny",
    "riformer_m36",
    "riformer_m48",
    "riformer_s12",
    "riformer_s24",
    "riformer_s36",
    "riformer_tiny",
    "scale_conv_output_",
    "scale_norm",
]

GN_EPS = 1e-5


# --------------------------------------------------------------------------- building blocks


class DropPath(nn.Module):
    """Stochastic depth: zero a whole sample's residual branch with probability ``p``.

    Kept samples are scaled by ``1 / (1 - p)`` so the expectation is unchanged. Identity in
    eval mode or when ``p == 0``.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def group_norm(dim: int) -> nn.GroupNorm:
    """The MetaFormer norm: GroupNorm with one group (LayerNorm over C, H, W)."""
    return nn.GroupNorm(1, dim, eps=GN_EPS)


class PatchEmbed(nn.Module):
    """Patch embedding / downsampling: a single strided conv, no norm (mmpretrain ``proj``)."""

    def __init__(self, in_chans: int, embed_dim: int, kernel: int, stride: int, pad: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel, stride=stride, padding=pad)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Mlp(nn.Module):
    """Channel MLP with 1x1 convs: ``fc1 -> act -> drop -> fc2 -> drop``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class Pooling(nn.Module):
    """PoolFormer token mixer: ``avgpool3x3(x) - x`` (padding not counted in the average)."""

    def __init__(self, pool_size: int = 3) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, 1, pool_size // 2, count_include_pad=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(x) - x


class Affine(nn.Module):
    """RIFormer token mixer (training form): ``s * x + t - x`` as a depthwise 1x1 conv."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.affine = nn.Conv2d(dim, dim, 1, groups=dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.affine(x) - x


def _layer_scale(value: float, dim: int) -> nn.Parameter:
    return nn.Parameter(value * torch.ones(dim))


def _apply_scale(scale: Tensor | None, y: Tensor) -> Tensor:
    """mmpretrain's LayerScale spelling; ``None`` means the scale was folded away."""
    if scale is None:
        return y
    return scale.unsqueeze(-1).unsqueeze(-1) * y


class MetaFormerBlock(nn.Module):
    """``x + dp(ls1 * mixer(norm1(x)))`` then ``x + dp(ls2 * mlp(norm2(x)))``.

    ``token_mixer`` may be ``None`` (RIFormer deploy form: the mixer was folded into ``norm1``);
    ``layer_scale_1`` / ``layer_scale_2`` may be ``None`` (folded into ``norm1`` / ``mlp.fc2``).
    """

    def __init__(
        self,
        dim: int,
        token_mixer: nn.Module,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale_init_value: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = group_norm(dim)
        self.token_mixer: nn.Module | None = token_mixer
        self.norm2 = group_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.layer_scale_1: nn.Parameter | None = _layer_scale(layer_scale_init_value, dim)
        self.layer_scale_2: nn.Parameter | None = _layer_scale(layer_scale_init_value, dim)

    def _mix(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        return y if self.token_mixer is None else self.token_mixer(y)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(_apply_scale(self.layer_scale_1, self._mix(x)))
        return x + self.drop_path(_apply_scale(self.layer_scale_2, self.mlp(self.norm2(x))))


class PoolFormerBlock(MetaFormerBlock):
    """MetaFormer block with the pooling token mixer."""

    def __init__(self, dim: int, **kwargs: Any) -> None:
        super().__init__(dim, Pooling(), **kwargs)


# --------------------------------------------------------------------------- RIFormer folds


def _norm_affine64(norm: nn.GroupNorm, like: Tensor) -> tuple[Tensor, Tensor]:
    """``(gamma, beta)`` of ``norm`` in float64; ``(1, 0)`` when it has no affine."""
    if norm.weight is None or norm.bias is None:
        ones = torch.ones(norm.num_channels, dtype=torch.float64, device=like.device)
        return ones, torch.zeros_like(ones)
    return norm.weight.detach().double(), norm.bias.detach().double()


def _result_dtype(norm: nn.GroupNorm, like: Tensor) -> torch.dtype:
    return norm.weight.dtype if norm.weight is not None else like.dtype


def deploy_mixer_into_norm(norm: nn.GroupNorm, mixer: Affine) -> nn.GroupNorm:
    """New GroupNorm ``N'`` with ``N'(x) == mixer(norm(x))``: the paper's RIFormer fold.

    ``gamma' = gamma * (s - 1)``, ``beta' = beta * (s - 1) + t``.
    """
    s = mixer.affine.weight.detach().double().reshape(-1)
    t = mixer.affine.bias.detach().double()
    gamma, beta = _norm_affine64(norm, mixer.affine.weight)
    dtype = _result_dtype(norm, mixer.affine.weight)
    return _group_norm_like(norm, gamma * (s - 1.0), beta * (s - 1.0) + t, dtype)


def scale_norm(norm: nn.GroupNorm, scale: Tensor) -> nn.GroupNorm:
    """New GroupNorm ``N''`` with ``N''(x) == scale[:, None, None] * norm(x)``."""
    s = scale.detach().double()
    gamma, beta = _norm_affine64(norm, scale)
    return _group_norm_like(norm, s * gamma, s * beta, _result_dtype(norm, scale))


def _group_norm_like(
    norm: nn.GroupNorm, gamma: Tensor, beta: Tensor, dtype: torch.dtype
) -> nn.GroupNorm:
    """A GroupNorm with ``norm``'s grouping and eps and the given affine (cast to ``dtype``)."""
    new = nn.GroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps, affine=True)
    new = new.to(device=gamma.device, dtype=dtype)
    with torch.no_grad():
        new.weight.copy_(gamma.to(dtype))
        new.bias.copy_(beta.to(dtype))
    new.train(norm.training)
    return new


def scale_conv_output_(conv: nn.Conv2d, scale: Tensor) -> None:
    """In place: ``conv'(x) == scale[:, None, None] * conv(x)`` (per output channel)."""
    s = scale.detach().double()
    with torch.no_grad():
        w = conv.weight.double() * s.reshape(-1, *([1] * (conv.weight.ndim - 1)))
        conv.weight.copy_(w.to(conv.weight.dtype))
        if conv.bias is not None:
            conv.bias.copy_((conv.bias.double() * s).to(conv.bias.dtype))


class RIFormerBlock(MetaFormerBlock):
    """MetaFormer block with the per-channel :class:`Affine` token mixer, reparameterizable."""

    def __init__(self, dim: int, **kwargs: Any) -> None:
        super().__init__(dim, Affine(dim), **kwargs)

    @property
    def is_deployed(self) -> bool:
        """True once the token mixer has been folded into ``norm1``."""
        return self.token_mixer is None

    @property
    def is_ideal(self) -> bool:
        """True once both LayerScales have been folded too."""
        return self.layer_scale_1 is None and self.layer_scale_2 is None

    def switch_to_deploy(self, fold_layerscale: bool = False) -> RIFormerBlock:
        """Fold the token mixer into ``norm1`` (paper form), in place; idempotent.

        With ``fold_layerscale=True`` also fold ``ls1`` into ``norm1`` and ``ls2`` into
        ``mlp.fc2`` (the hand-folded ideal).
        """
        if self.token_mixer is not None:
            self._fold_token_mixer()
        if fold_layerscale:
            self._fold_layer_scales()
        return self

    def _fold_token_mixer(self) -> None:
        if not isinstance(self.token_mixer, Affine):
            raise TypeError(f"cannot fold a {type(self.token_mixer).__name__} token mixer")
        self.norm1 = deploy_mixer_into_norm(self.norm1, self.token_mixer)
        self.token_mixer = None

    def _fold_layer_scales(self) -> None:
        if self.layer_scale_1 is not None:
            self.norm1 = scale_norm(self.norm1, self.layer_scale_1)
            self.layer_scale_1 = None
        if self.layer_scale_2 is not None:
            scale_conv_output_(self.mlp.fc2, self.layer_scale_2)
            self.layer_scale_2 = None


# --------------------------------------------------------------------------- models


def _drop_path_rates(layers: Sequence[int], rate: float) -> list[float]:
    """PoolFormer's linear schedule: block ``i`` of ``n`` gets ``rate * i / (n - 1)``."""
    total = sum(layers)
    return [rate * i / max(total - 1, 1) for i in range(total)]


class MetaFormer(nn.Module):
    """MetaFormer backbone + classifier head; subclasses set ``block_cls`` (the token mixer)."""

    block_cls: ClassVar[type[MetaFormerBlock]]

    def __init__(
        self,
        layers: Sequence[int],
        dims: Sequence[int],
        mlp_ratio: float = 4.0,
        layer_scale_init_value: float = 1e-5,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(layers) != len(dims) or not layers:
            raise ValueError(f"layers {list(layers)} and dims {list(dims)} must match in length")
        self.num_classes = num_classes
        self.patch_embed = PatchEmbed(in_chans, dims[0], kernel=7, stride=4, pad=2)
        rates = iter(_drop_path_rates(layers, drop_path_rate))
        network: list[nn.Module] = []
        for i, (depth, dim) in enumerate(zip(layers, dims, strict=True)):
            if i > 0:
                network.append(PatchEmbed(dims[i - 1], dim, kernel=3, stride=2, pad=1))
            blocks = [
                self.block_cls(
                    dim,
                    mlp_ratio=mlp_ratio,
                    drop=drop_rate,
                    drop_path=next(rates),
                    layer_scale_init_value=layer_scale_init_value,
                )
                for _ in range(depth)
            ]
            network.append(nn.Sequential(*blocks))
        self.network = nn.ModuleList(network)
        self.norm = group_norm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        for stage in self.network:
            x = stage(x)
        return x

    def forward_head(self, x: Tensor) -> Tensor:
        return self.head(self.norm(x).mean(dim=(-2, -1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    """PoolFormer init: truncated normal (std 0.02) for Linear and the MLP's 1x1 convs."""
    if isinstance(m, Mlp):
        for conv in (m.fc1, m.fc2):
            nn.init.trunc_normal_(conv.weight, std=0.02)
            nn.init.zeros_(conv.bias)
    elif isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class PoolFormer(MetaFormer):
    """PoolFormer (Yu et al., CVPR 2022): MetaFormer with the pooling token mixer."""

    block_cls = PoolFormerBlock


class RIFormer(MetaFormer):
    """RIFormer (Wang et al., CVPR 2023): MetaFormer with an affine token mixer."""

    block_cls = RIFormerBlock

    def riformer_blocks(self) -> list[RIFormerBlock]:
        return [m for m in self.modules() if isinstance(m, RIFormerBlock)]

    def switch_to_deploy(self, fold_layerscale: bool = False) -> RIFormer:
        """Paper reparameterization of every block, in place; returns ``self``.

        ``fold_layerscale=True`` produces the hand-folded ideal (see :meth:`deploy_ideal`).
        """
        for block in self.riformer_blocks():
            block.switch_to_deploy(fold_layerscale=fold_layerscale)
        return self

    def deploy_ideal(self) -> RIFormer:
        """Fold token mixers and both LayerScales of every block, in place; returns ``self``."""
        return self.switch_to_deploy(fold_layerscale=True)


# --------------------------------------------------------------------------- factories

_S_DIMS = (64, 128, 320, 512)
_M_DIMS = (96, 192, 384, 768)
_CONFIGS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "s12": {"layers": (2, 2, 6, 2), "dims": _S_DIMS, "layer_scale_init_value": 1e-5},
        "s24": {"layers": (4, 4, 12, 4), "dims": _S_DIMS, "layer_scale_init_value": 1e-5},
        "s36": {"layers": (6, 6, 18, 6), "dims": _S_DIMS, "layer_scale_init_value": 1e-6},
        "m36": {"layers": (6, 6, 18, 6), "dims": _M_DIMS, "layer_scale_init_value": 1e-6},
        "m48": {"layers": (8, 8, 24, 8), "dims": _M_DIMS, "layer_scale_init_value": 1e-6},
        "tiny": {"layers": (1, 1, 1, 1), "dims": (8, 16, 24, 32), "layer_scale_init_value": 1e-5},
    }
)


def _build(cls: type[MetaFormer], size: str, kwargs: dict[str, Any]) -> Any:
    """Published configuration ``size`` with ``kwargs`` overriding any field."""
    return cls(**{**_CONFIGS[size], **kwargs})


def poolformer_s12(**kwargs: Any) -> PoolFormer:
    return _build(PoolFormer, "s12", kwargs)


def poolformer_s24(**kwargs: Any) -> PoolFormer:
    return _build(PoolFormer, "s24", kwargs)


def poolformer_s36(**kwargs: Any) -> PoolFormer:
    return _build(PoolFormer, "s36", kwargs)


def poolformer_m36(**kwargs: Any) -> PoolFormer:
    return _build(PoolFormer, "m36", kwargs)


def poolformer_m48(**kwargs: Any) -> PoolFormer:
    return _build(PoolFormer, "m48", kwargs)


def poolformer_tiny(**kwargs: Any) -> PoolFormer:
    """Test-size PoolFormer: layers (1, 1, 1, 1), dims (8, 16, 24, 32)."""
    return _build(PoolFormer, "tiny", kwargs)


def riformer_s12(**kwargs: Any) -> RIFormer:
    return _build(RIFormer, "s12", kwargs)


def riformer_s24(**kwargs: Any) -> RIFormer:
    return _build(RIFormer, "s24", kwargs)


def riformer_s36(**kwargs: Any) -> RIFormer:
    return _build(RIFormer, "s36", kwargs)


def riformer_m36(**kwargs: Any) -> RIFormer:
    return _build(RIFormer, "m36", kwargs)


def riformer_m48(**kwargs: Any) -> RIFormer:
    return _build(RIFormer, "m48", kwargs)


def riformer_tiny(**kwargs: Any) -> RIFormer:
    """Test-size RIFormer: layers (1, 1, 1, 1), dims (8, 16, 24, 32)."""
    return _build(RIFormer, "tiny", kwargs)
