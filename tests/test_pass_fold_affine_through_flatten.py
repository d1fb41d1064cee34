"""fold_affine_through_flatten: a per-channel affine before ``flatten(·, 1) → linear`` goes
into the linear; its algebra, its spellings and its refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from grammar import randomise_
from helpers import fold_matches, fresh_input
from torch import nn

import repfx
from repfx.algebra import ChannelAffine
from repfx.ir.op_kinds import op_counts
from repfx.passes.fold_affine_through_flatten import fold_affine_into_flattened_linear

RULE = "fold_affine_through_flatten"


def _report(folded):
    return folded.meta["repfx_report"]


def test_the_folded_linear_computes_the_linear_of_the_flattened_affine():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 2, 5, dtype=torch.float64, generator=gen)
    scale, shift = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    weight = torch.randn(6, 4 * 2 * 5, dtype=torch.float64, generator=gen)
    bias = torch.randn(6, dtype=torch.float64, generator=gen)
    affine = ChannelAffine.of(scale, shift, 4)
    expected = torch.flatten(x * scale.view(4, 1, 1) + shift.view(4, 1, 1), 1) @ weight.T + bias
    for b in (bias, None):
        w2, b2 = fold_affine_into_flattened_linear(weight, b, affine, positions=10)
        got = torch.flatten(x, 1) @ w2.T + b2
        assert torch.allclose(got, expected - (0 if b is not None else bias), atol=1e-12)


def test_a_scale_alone_leaves_a_bias_free_linear_without_bias():
    weight = torch.randn(3, 8, dtype=torch.float64)
    affine = ChannelAffine.of(torch.randn(2), None, 2)
    _, bias = fold_affine_into_flattened_linear(weight, None, affine, positions=4)
    assert bias is None


class Head(nn.Module):
    """``fc(flatten(act(conv(x)) · s + t))``, the flatten spelled as ``flatten``."""

    def __init__(self, flatten, affine="arith", fc_bias=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.s = nn.Parameter(torch.ones(4, 1, 1))
        self.t = nn.Parameter(torch.zeros(4, 1, 1))
        self.fc = nn.Linear(4 * 5 * 6, 7, bias=fc_bias)
        self.flatten, self.affine = flatten, affine

    def forward(self, x):
        y = torch.tanh(self.conv(x))  # tanh: no sign rule lets the scale move back
        y = self.bn(y) if self.affine == "bn" else y * self.s + self.t
        return self.fc(self.flatten(self, y))


FLATTENS = {
    "torch.flatten(y, 1)": lambda m, y: torch.flatten(y, 1),
    "y.flatten(1)": lambda m, y: y.flatten(1),
    "y.flatten(start_dim=1, end_dim=-1)": lambda m, y: y.flatten(start_dim=1, end_dim=-1),
    "nn.Flatten()": lambda m, y: m.flat(y),
}


def _head(flatten: str, **kwargs) -> Head:
    model = Head(FLATTENS[flatten], **kwargs)
    model.flat = nn.Flatten()
    return randomise_(model, torch.Generator().manual_seed(3)).eval()


@pytest.mark.parametrize("flatten", list(FLATTENS))
@pytest.mark.parametrize("affine", ["arith", "bn"])
def test_the_affine_folds_into_the_linear(flatten, affine):
    model = _head(flatten, affine=affine)
    folded = fold_matches(model, fresh_input(2, 3, 5, 6), fresh_input(3, 3, 5, 6, seed=2))
    assert op_counts(folded)["channel_affine"] == 0
    assert op_counts(folded)["batch_norm"] == 0
    assert RULE in {f.rule for f in _report(folded).folded}


def test_a_bias_free_linear_gains_the_shift_as_its_bias():
    model = _head("torch.flatten(y, 1)", fc_bias=False)
    folded = fold_matches(model, fresh_input(2, 3, 5, 6), fresh_input(1, 3, 5, 6, seed=4))
    assert op_counts(folded)["channel_affine"] == 0


def test_the_users_model_is_left_alone():
    model = _head("y.flatten(1)")
    before = copy.deepcopy(model.state_dict())
    repfx.fold(model, (fresh_input(2, 3, 5, 6),))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Refused(nn.Module):
    def __init__(self, spelling):
        super().__init__()
        self.s = nn.Parameter(torch.randn(4, 1, 1))
        self.t = nn.Parameter(torch.randn(4, 1, 1))
        self.fc = nn.Linear(4 * 3 * 3, 5)
        self.spelling = spelling

    def forward(self, x):
        return self.spelling(self, torch.tanh(x) * self.s + self.t, x)


REFUSED = {
    # the flattened affine is also an output
    "affine read twice": lambda m, y, x: (m.fc(y.flatten(1)), y),
    # the flatten keeps the channels on their own axis
    "flatten from axis 2": lambda m, y, x: m.fc(y.flatten(2).transpose(1, 2).flatten(1)),
    # the same linear reads the input too
    "shared linear": lambda m, y, x: m.fc(y.flatten(1)) + m.fc(x.flatten(1)),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_keep_the_affine_and_the_function(case):
    model = Refused(REFUSED[case]).eval()
    x, fresh = fresh_input(2, 4, 3, 3), fresh_input(3, 4, 3, 3, seed=5)
    folded = repfx.fold(model, (x,))
    with torch.no_grad():
        repfx.testing.assert_close(folded(fresh), model(fresh))
    assert RULE not in {f.rule for f in _report(folded).folded}
    if case == "shared linear":
        reasons = [s.reason for s in _report(folded).skipped if s.rule == RULE]
        assert any("shared" in r for r in reasons)


def test_an_unknown_shape_is_a_stated_refusal():
    model = _head("torch.flatten(y, 1)")
    folded = repfx.fold(model)  # no example input: no shapes
    reasons = [s.reason for s in _report(folded).skipped if s.rule == RULE]
    assert reasons == ["the shape before the flatten is unknown"]
