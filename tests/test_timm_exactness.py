"""Real timm models nobody on the team wrote fold exactly, with every rewrite proven.

Parameters are re-drawn at O(1) (identity BN statistics and zero γ hide wrong folds). Each model
is folded with an example input (batch 2, so verification runs, as given and on re-drawn
parameters) and must then match the original on a *fresh* input, per output. The suite runs
with the commit point in strict mode: a rewrite whose replacement differs would raise.
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm_weights import redraw_foldable_parameters_

import repfx
from repfx.proof.verify import verify

torch.set_num_threads(1)

# (model, input size): the smallest size each model accepts, to keep the suite fast
MODELS = [
    ("efficientnetv2_rw_t", 64),
    ("mixnet_s", 64),
    ("regnetz_b16", 64),
    ("mobilenetv4_hybrid_medium", 64),
    ("halonet_h1", 256),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "size"), MODELS, ids=[m for m, _ in MODELS])
def test_timm_model_folds_exactly_on_a_fresh_input(name, size):
    model = redraw_foldable_parameters_(timm.create_model(name, num_classes=10), seed=0).eval()
    gen = torch.Generator().manual_seed(3)
    example, fresh = (torch.randn(2, 3, size, size, generator=gen) for _ in range(2))
    folded = repfx.fold(model, (example,))
    report = folded.meta[repfx.REPORT_KEY]
    assert report.folded, "nothing folded"
    assert report.verification.passed and report.redrawn_verification.passed
    assert not [s for s in report.skipped if "rejected" in s.reason]
    # on a fresh input, per output; where float32 misses its tolerance only because the model
    # is ill-conditioned, the float64 fold of the float64 model decides (repfx.proof.verify)
    refold = lambda m: repfx.fold(m, (example.double(),), verify=False)  # noqa: E731
    fresh_check = verify(model, folded, (fresh,), refold)
    assert fresh_check.passed, "\n".join(fresh_check.lines())
