import operator

import torch
from grammar import Scale, randomise_
from helpers import apply, call_targets, traced
from torch import nn

from repfx.passes import FoldAffineMixer
from repfx.testing import assert_close


class Mixer(nn.Module):
    """RIFormer's token mixer: ``x + ls·(A(N(x)) − N(x))``."""

    def __init__(self, spelling: str):
        super().__init__()
        self.norm = nn.GroupNorm(1, 4)
        self.affine = Scale(4, spelling)

    def forward(self, x):
        n = self.norm(x)
        return x + (self.affine(n) - n)


def test_affine_minus_identity_becomes_one_affine():
    model = randomise_(Mixer("dwconv"), torch.Generator().manual_seed(2)).eval()
    x = torch.randn(2, 4, 3, 3)
    gm = traced(model, x)
    result = apply(FoldAffineMixer(), gm)
    assert len(result.folded) == 1
    assert call_targets(gm) == ["norm", torch.addcmul, operator.add]
    assert_close(gm(x), model(x))
    assert not apply(FoldAffineMixer(), gm).modified


def test_residual_sum_of_different_tensors_is_left_alone():
    """``x + N(x)``: the two operands are not affine in one common tensor."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.GroupNorm(1, 4)

        def forward(self, x):
            return x + self.norm(x)

    gm = traced(Residual().eval())
    result = apply(FoldAffineMixer(), gm)
    assert not result.modified and not result.skipped


def test_branches_on_different_axes_are_reported():
    class TwoAxes(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.a = nn.Parameter(torch.randn(4, 1, 1))
            self.b = nn.Parameter(torch.randn(4, 1))

        def forward(self, x):
            y = self.conv(x)
            return y * self.a + y * self.b

    x = torch.randn(2, 4, 4, 4)
    model = TwoAxes().eval()
    gm = traced(model, x)
    result = apply(FoldAffineMixer(), gm)
    assert not result.modified
    assert [s.reason for s in result.skipped] == ["branches act on different channel axes"]
    assert_close(gm(x), model(x))
