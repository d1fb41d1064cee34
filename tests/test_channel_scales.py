"""Per-channel multiplies left in real models after folding, and weight standardisation gone.

Each model is built with random weights, its foldable parameters re-drawn at O(1), folded on a
batch-2 example, and run on a *fresh* batch-2 input: the fold must match the model there, and
the multiplies by a stored per-channel constant that the folded model dispatches
(``helpers.stored_multiplies``) must be exactly those the algebra cannot remove, stated per
model below from the model's source (not from repfx's output):

* PoolFormer (built-in and timm): none. The mixer ``x + ls1·(pool(n) − n)`` gives ``ls1`` to
  the norm through the pool and the difference; ``ls2`` goes into ``fc2``.
* MetaFormer ``res_scale`` (timm poolformerv2_s12: 16, caformer_s18 / convformer_s18: 24):
  ``s·x + f(norm(x))`` needs both ``x`` (for the norm, which is not invariant to a per-channel
  scale) and ``s·x``. Making ``x``'s producer compute ``s·x`` would change what the norm reads;
  computing both takes a multiply or a second copy of that producer.
* timm efficientformer_l1 (14, one per ``MetaBlock2d``): ``x + ls1·(pool(x) − x)`` is
  ``(1 − ls1)·x + ls1·pool(x)``; the shortcut reads ``x`` unscaled and no op next to it can
  take a scale (the pool has no weights, and the stream feeds the next block's shortcut).
* timm resmlp_12_224 (24, two per block): ``x + ls1·T(α·x + β)`` with ``T`` a token-mixing
  linear *with a bias*: ``ls1·(Wx + b)`` would need ``b`` scaled per channel and per position,
  and ``α·x + β`` through ``T`` gives a shift that differs per position — neither fits a linear's
  bias. The final ``Affine`` norm goes through the token mean into the head.
* timm hieradet_small, swiftformer_xs, rdnet_tiny: none. hieradet's LayerScales reach their
  producers through the spatial crop (``x[:, :H, :W, :]``) and window un-partition reshapes;
  swiftformer's through the tokens → channels reshape; rdnet's ``γ ⊙ (a ⊙ gate(a))`` gives
  ``γ`` to the conv computing ``a``, which the excitation gate's conv undoes on its input.
"""

from __future__ import annotations

import re

import pytest
import timm
import torch
from helpers import dispatched_ops, fresh_input, stored_multiplies
from torch import nn

import repfx
from repfx.models import metaformer
from repfx.proof.redraw import redraw_foldable_parameters_
from repfx.testing import assert_close

pytestmark = pytest.mark.slow

# name → (image size, multiplies that must stay: a pattern over the constants' names, count)
CASES = {
    "builtin:poolformer_s12": (64, "", 0),
    "poolformer_s12": (64, "", 0),
    "poolformerv2_s12": (64, r"stages\.[23]\.blocks\.\d+\.res_scale[12]\.scale", 16),
    "caformer_s18": (64, r"stages\.[23]\.blocks\.\d+\.res_scale[12]\.scale", 24),
    "convformer_s18": (64, r"stages\.[23]\.blocks\.\d+\.res_scale[12]\.scale", 24),
    "efficientformer_l1": (224, r"stages\.\d\.blocks\.\d+\.ls1\.gamma", 14),
    "resmlp_12_224": (224, r"blocks\.\d+\.ls1|(blocks\.\d+\.norm1)\.beta,\1\.alpha", 24),
    "hieradet_small": (256, "", 0),
    "swiftformer_xs": (224, "", 0),
    "rdnet_tiny": (224, "", 0),
}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("builtin:"):
        model = getattr(metaformer, name.removeprefix("builtin:"))()
    else:
        model = timm.create_model(name, pretrained=False)
    redraw_foldable_parameters_(model.eval())
    return model


def _fold_and_check(name: str, size: int) -> nn.Module:
    model = _build(name)
    folded = repfx.fold(model, (fresh_input(2, 3, size, size),), verify=False)
    fresh = fresh_input(2, 3, size, size, seed=7)
    with torch.no_grad():
        assert_close(folded(fresh), model(fresh))
    return folded


@pytest.mark.parametrize("name", list(CASES))
def test_only_the_multiplies_the_algebra_needs_are_left(name):
    size, pattern, count = CASES[name]
    folded = _fold_and_check(name, size)
    left = stored_multiplies(folded, fresh_input(2, 3, size, size, seed=8))
    assert len(left) == count, sorted(set(left))
    assert all(re.fullmatch(pattern, n) for n in left), sorted(set(left))


@pytest.mark.parametrize("name", ["dm_nfnet_f0", "resnetv2_50x1_bit"])
def test_weight_standardisation_is_computed_once_at_fold_time(name):
    """``StdConv2d`` / ``ScaledStdConv2d`` standardise their weight with ``F.batch_norm`` on
    every forward; folded, no batch norm runs (nor anything else on parameters only)."""
    folded = _fold_and_check(name, 64)
    ops = dispatched_ops(folded, fresh_input(2, 3, 64, 64, seed=8))
    assert not [op for op in ops if "batch_norm" in op], ops
