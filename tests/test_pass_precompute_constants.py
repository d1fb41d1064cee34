"""precompute_constants: parameter-only computations run once, at fold time — exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from grammar import randomise_
from helpers import fold_matches, fresh_input
from timm.layers import ScaledStdConv2d, StdConv2d
from torch import nn

import repfx
from repfx.ir.op_kinds import op_counts

C = 6


def _random(model: nn.Module) -> nn.Module:
    return randomise_(model, torch.Generator().manual_seed(0)).eval()


def _report(folded):
    return folded.meta["repfx_report"]


class WeightStandardisedConv(nn.Conv2d):
    """A conv whose kernel is standardised per output channel on every call (as NF-nets and
    BiT do), written so that torch.fx traces it."""

    def forward(self, x):
        w = self.weight.reshape(1, self.out_channels, -1)
        w = F.batch_norm(w, None, None, training=True, momentum=0.0, eps=1e-5)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding)


@pytest.mark.parametrize("conv", [WeightStandardisedConv, StdConv2d, ScaledStdConv2d])
def test_weight_standardisation_is_precomputed_and_the_bn_after_it_folds(conv):
    model = _random(nn.Sequential(conv(3, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU()))
    folded = fold_matches(model, fresh_input(2, 3, 7, 7), fresh_input(1, 3, 9, 8))
    counts = _report(folded).counts()
    assert counts["precompute_constants"] == 1 and counts["fold_bn"] == 1
    assert op_counts(folded)["conv"] == 1 and "batch_norm" not in op_counts(folded)
    assert not any("training mode" in s.reason for s in _report(folded).skipped)


class ScaledByView(nn.Module):
    """``x · γ[:, None, None]``: a view of a parameter, nothing computed."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3)
        self.gamma = nn.Parameter(torch.randn(C))

    def forward(self, x):
        return torch.relu(self.conv(x)) * self.gamma[:, None, None]


def test_a_view_of_a_parameter_is_left_to_the_passes_that_read_it():
    model = _random(ScaledByView())
    folded = fold_matches(model, fresh_input(2, 3, 7, 7), fresh_input(1, 3, 6, 9))
    assert "precompute_constants" not in _report(folded).counts()


class ExpandedTable(nn.Module):
    """A small parameter computed into a large table: cheaper to compute than to store."""

    def __init__(self):
        super().__init__()
        self.row = nn.Parameter(torch.randn(1, 1, 1, 16))

    def forward(self, x):
        table = (self.row * 2.0).expand(1, 1, 16, 16).exp()
        return x + table


def test_a_value_larger_than_its_parameters_stays_computed():
    model = _random(ExpandedTable())
    folded = fold_matches(model, fresh_input(2, 1, 16, 16), fresh_input(1, 1, 16, 16))
    assert "precompute_constants" not in _report(folded).counts()
    assert any("larger than the parameters" in s.reason for s in _report(folded).skipped)


class RandomMask(nn.Module):
    """A mask drawn afresh from a parameter on every call: never a constant."""

    def __init__(self):
        super().__init__()
        self.keep = nn.Parameter(torch.full((C,), 0.5))

    def forward(self, x):
        return x * torch.bernoulli(self.keep.sigmoid())[:, None, None]


def test_a_random_computation_on_parameters_is_not_precomputed():
    folded = repfx.fold(RandomMask().eval(), (fresh_input(2, C, 4, 4),))
    # the sigmoid before the draw is deterministic (and may be precomputed); the draw is not
    assert any(n.target is torch.bernoulli for n in folded.graph.nodes)
    x = fresh_input(64, C, 4, 4)
    with torch.no_grad():  # still drawn on every call: one mask of C channels per call, so two
        # calls agree now and then (about 1 in 12); sixteen calls all agreeing means no draw
        outputs = [folded(x) for _ in range(16)]
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])
