"""Random O(1) weights for timm models: identity BN statistics or a 1e-5 LayerScale would make
a wrong fold invisible. Shared by the timm tests and benchmarks/bench_timm_reparam.py."""

from __future__ import annotations

import torch
from timm.layers import LayerScale, LayerScale2d
from timm.models import metaformer
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

SCALE_TYPES = (LayerScale, LayerScale2d, metaformer.Scale)


def redraw_foldable_parameters_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw, in place and at O(1), everything a fold moves around.

    BatchNorm (any subclass, e.g. BatchNormAct2d): ``running_mean ~ 0.3 N``,
    ``running_var ~ U[0.5, 1.5)``, ``weight ~ 1 + 0.5 N``, ``bias ~ 0.3 N``.
    LayerScale / LayerScale2d ``gamma``, metaformer ``Scale.scale`` (``layer_scale*`` /
    ``res_scale*``), any other ``gamma`` (fastvit's are ``(C, 1, 1)``): ``1 + 0.5 N``.
    StarReLU ``scale ~ 1 + 0.5 N``, ``bias ~ 0.3 N`` (a scalar affine).
    LayerNorm / GroupNorm affine: ``1 + 0.5 N``, ``0.3 N``.
    Conv / Linear biases (timm inits them to 0, which would hide a wrong bias fold): ``0.2 N``.
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(t: torch.Tensor | None, mean: float, std: float) -> None:
        if t is not None:
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            t.copy_((mean + std * noise).to(t.dtype))

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                draw(m.running_mean, 0.0, 0.3)
                m.running_var.copy_(
                    0.5 + torch.rand(m.running_var.shape, generator=gen, dtype=torch.float64)
                )
                draw(m.weight, 1.0, 0.5)
                draw(m.bias, 0.0, 0.3)
            elif isinstance(m, (LayerScale, LayerScale2d)):
                draw(m.gamma, 1.0, 0.5)
            elif isinstance(m, metaformer.Scale):
                draw(m.scale, 1.0, 0.5)
            elif isinstance(m, metaformer.StarReLU):
                draw(m.scale, 1.0, 0.5)
                draw(m.bias, 0.0, 0.3)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                draw(m.weight, 1.0, 0.5)
                draw(m.bias, 0.0, 0.3)
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                draw(m.bias, 0.0, 0.2)
            gamma = m._parameters.get("gamma")
            if gamma is not None and not isinstance(m, SCALE_TYPES):
                draw(gamma, 1.0, 0.5)  # e.g. fastvit's own LayerScale2d, gamma (C, 1, 1)
    return model
