"""timm models whose capture needed more than torch.fx: a top-level forward fx cannot trace
(crossvit), shape arithmetic (botnet, tresnet, volo), submodules fx runs opaque (efficientvit's
attention, ``Conv2dSame``'s input-dependent padding). Each folds exactly on a fresh input —
judged per output, ill-conditioned outputs by the float64 fold — and leaves no BatchNorm that
timm's own reparameterization removes."""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import batch_norms
from timm_weights import redraw_foldable_parameters_

import repfx
from repfx.proof.verify import verify

torch.set_num_threads(1)

# (model, input size, batch norms the fold may leave: those after an attention's softmax or
# before a non-affine op, which no exact fold removes)
MODELS = [
    ("crossvit_tiny_240", 240, None),
    ("botnet26t_256", 256, None),
    ("tresnet_m", 64, 0),
    ("volo_d1_224", 224, 0),
    ("efficientvit_m0", 64, 0),
    ("tf_efficientnet_lite0", 64, 0),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "size", "left"), MODELS, ids=[m for m, _, _ in MODELS])
def test_timm_model_captured_beyond_fx_folds_exactly(name, size, left):
    model = redraw_foldable_parameters_(timm.create_model(name, num_classes=10), seed=0).eval()
    gen = torch.Generator().manual_seed(3)
    example, fresh = (torch.randn(2, 3, size, size, generator=gen) for _ in range(2))
    folded = repfx.fold(model, (example,), verify_redrawn=False)
    assert folded.meta[repfx.REPORT_KEY].verification.passed
    if left is not None:
        assert batch_norms(folded) == left
    refold = lambda m: repfx.fold(m, (example.double(),), verify=False)  # noqa: E731
    fresh_check = verify(model, folded, (fresh,), refold)
    assert fresh_check.passed, "\n".join(fresh_check.lines())
