"""Re-draw, in place and at O(1), every parameter a fold moves.

Random initialisations hide wrong folds: a BatchNorm starts with identity statistics
(mean 0, var 1) and γ = 1, β = 0, a LayerScale at 1e-5, biases at 0. A fold that drops such a
BatchNorm, or loses a bias, is exact on those values and wrong on any trained model. So
``repfx.fold(..., verify=True)`` also folds and verifies a copy whose foldable parameters are
re-drawn here (``verify_redrawn``).

What is re-drawn, generically over the module tree (N: standard normal, U: uniform; drawn in
float64 from one seeded generator, in module order, and cast to each tensor's dtype):

* running statistics (the ``running_mean`` / ``running_var`` buffers of any module: every
  ``_BatchNorm`` subclass, InstanceNorm with tracked statistics, a hand-written BN):
  ``mean ~ 0.3 N``, ``var ~ U[0.5, 1.5)``; in such a module ``weight`` / ``bias`` are re-drawn
  too, whether parameters or buffers (a frozen BN);
* the bias of a weight layer (a module whose ``weight`` has two or more dimensions: conv,
  transposed conv, linear): ``0.2 N``; its weight keeps its values;
* every other per-channel parameter: one that is 0-D or 1-D or has at most one dimension above
  1 (``(C,)``, ``(C, 1, 1)``, ``(1, C, 1, 1)``, ``(1, 1, C)``) — norm affines (LayerNorm,
  GroupNorm, RMSNorm, BatchNorm), LayerScale ``gamma``, a ``Scale``, a scalar activation
  affine: ``0.3 N`` for a shift (named ``bias`` / ``beta`` / ``shift``, or ending so), else
  ``1 + 0.5 N``.

Parameters with two or more dimensions above 1 (embeddings, position tables, weights) are left
alone, as are integer tensors.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

DEFAULT_SEED = 0
# The seed of fold's re-drawn verification: not DEFAULT_SEED, so that a model whose parameters a
# test already re-drew with the default seed is checked again on different values.
VERIFICATION_SEED = 1
RUNNING_STATS = ("running_mean", "running_var")
SHIFT_NAMES = ("bias", "beta", "shift")


def redraw_foldable_parameters_(model: nn.Module, seed: int = DEFAULT_SEED) -> nn.Module:
    """Re-draw ``model``'s foldable parameters in place (see the module docstring); return it.

    Deterministic: the same model and ``seed`` give the same values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module, name, tensor in _each_foldable(model):
            tensor.copy_(_draw(name, tensor, module, generator))
    return model


def foldable_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The tensors :func:`redraw_foldable_parameters_` writes."""
    return [tensor for _, _, tensor in _each_foldable(model)]


def _each_foldable(model: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
    """(module, name, tensor) of each floating foldable tensor of ``model``, in module order,
    each tensor once (a tied one where it is first met)."""
    seen: set[int] = set()
    for module in model.modules():
        for name, tensor in _foldable_tensors(module):
            if id(tensor) not in seen and tensor.is_floating_point():
                seen.add(id(tensor))
                yield module, name, tensor


def _foldable_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors of ``module`` itself (not its children) that a fold may move."""
    if _has_running_stats(module):
        tensors = {**module._parameters, **module._buffers}
        names = (*RUNNING_STATS, "weight", "bias")
        return [(n, tensors[n]) for n in names if tensors.get(n) is not None]
    if _is_weight_layer(module):
        bias = module._parameters.get("bias")
        return [("bias", bias)] if bias is not None else []
    return [(n, p) for n, p in module._parameters.items() if p is not None and _per_channel(p)]


def _has_running_stats(module: nn.Module) -> bool:
    return all(module._buffers.get(name) is not None for name in RUNNING_STATS)


def _is_weight_layer(module: nn.Module) -> bool:
    weight = module._parameters.get("weight")
    return weight is not None and weight.dim() >= 2


def _per_channel(tensor: torch.Tensor) -> bool:
    """0-D, 1-D, or broadcastable along one channel dimension (at most one size above 1)."""
    return sum(size > 1 for size in tensor.shape) <= 1


def _draw(
    name: str, tensor: torch.Tensor, module: nn.Module, generator: torch.Generator
) -> torch.Tensor:
    shape = tensor.shape
    if name == "running_var":
        values = 0.5 + torch.rand(shape, generator=generator, dtype=torch.float64)
    else:
        noise = torch.randn(shape, generator=generator, dtype=torch.float64)
        if name == "running_mean":
            values = 0.3 * noise
        elif name == "bias" and _is_weight_layer(module):
            values = 0.2 * noise
        elif name.lower().endswith(SHIFT_NAMES):
            values = 0.3 * noise
        else:
            values = 1.0 + 0.5 * noise
    return values.to(tensor.dtype)
