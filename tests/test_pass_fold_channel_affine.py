import torch
from grammar import Scale, randomise_
from helpers import apply, call_targets, stored_multiplies, traced
from torch import nn

import repfx
from repfx.passes import FoldChannelAffine
from repfx.testing import assert_close


def _random(model: nn.Module) -> nn.Module:
    return randomise_(model, torch.Generator().manual_seed(5)).eval()


def test_layer_scale_folds_into_the_conv_before_it():
    model = _random(nn.Sequential(nn.Conv2d(3, 4, 3), Scale(4, "unsqueeze")))
    gm = traced(model)  # no shapes needed: conv output is channels-at-dim -3
    result = apply(FoldChannelAffine(), gm)
    assert [f.detail for f in result.folded] == ["into conv 0"]
    assert call_targets(gm) == ["0"]
    x = torch.randn(2, 3, 6, 6)
    assert_close(gm(x), model(x))
    assert not apply(FoldChannelAffine(), gm).modified


def test_affines_compose_then_fold_into_a_norm():
    model = _random(nn.Sequential(nn.GroupNorm(2, 4), Scale(4, "mul_add"), Scale(4, "sub_div")))
    x = torch.randn(2, 4, 3, 3)
    gm = traced(model, x)
    apply(FoldChannelAffine(), gm)
    apply(FoldChannelAffine(), gm)
    assert call_targets(gm) == ["0"]
    assert_close(gm(x), model(x))


def test_affine_folds_into_the_linear_after_it():
    """No producer to take it (a ReLU), so the shift and scale go into the linear's input."""

    class ReluAffineLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma, self.beta = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(torch.addcmul(self.beta, torch.relu(x), self.gamma))

    model = ReluAffineLinear().eval()
    x = torch.randn(4, 5, 3)
    gm = traced(model, x)
    result = apply(FoldChannelAffine(), gm)
    assert [f.detail for f in result.folded] == ["into the input of linear fc"]
    assert call_targets(gm) == [torch.relu, "fc"]
    assert_close(gm(x), model(x))


def test_scale_after_permute_folds_into_linear_before_the_permute():
    class LinearThenScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.gamma = nn.Parameter(torch.randn(3))

        def forward(self, x):
            return self.fc(x).permute(0, 3, 1, 2) * self.gamma[:, None, None]

    model = LinearThenScale().eval()
    x = torch.randn(2, 5, 5, 4)
    gm = traced(model, x)
    result = apply(FoldChannelAffine(), gm)
    assert result.folded[0].detail == "into linear fc (through permute)"
    assert_close(gm(x), model(x))


class ScaledScoresPlusBias(nn.Module):
    """Attention scores times a Python scale plus a stored per-head bias (LeViT's spelling)."""

    def __init__(self, heads: int = 3):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, heads, 1, 1))

    def forward(self, q, k):
        scores = q @ k.transpose(-2, -1)
        return (scores * 0.25 + self.bias).softmax(-1)


def test_composing_a_scalar_scale_with_a_stored_shift_stores_no_per_channel_scale():
    model = _random(ScaledScoresPlusBias()).eval()
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    folded = repfx.fold(model, (q, k))
    fresh = (torch.randn(4, 3, 5, 4), torch.randn(4, 3, 5, 4))
    assert stored_multiplies(folded, *fresh) == stored_multiplies(model, *fresh) == []
    report = folded.meta[repfx.REPORT_KEY]
    assert sum(report.after.ops.values()) <= sum(report.before.ops.values())
    with torch.no_grad():
        assert_close(folded(*fresh), model(*fresh))


class ScalarThenIntegerScale(nn.Module):
    """``−conv(x) · 2.5 · k`` with ``k = arange(1, C + 1)`` an integer buffer: the product is a
    float tensor, and a composed scale held in ``k``'s dtype would truncate ``2.5 · k``."""

    def __init__(self, c: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(c, c, 1)
        self.register_buffer("k", torch.arange(1, c + 1))

    def forward(self, x):
        return torch.nn.functional.gelu(-self.conv(x) * 2.5 * self.k.reshape(-1, 1))


def test_an_integer_scale_is_not_the_dtype_of_a_composed_float_scale():
    model = randomise_(ScalarThenIntegerScale(), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(2, 3, 4)
    for examples in (None, (x,)):  # (a rejected rewrite fails the test)
        folded = repfx.fold(model, examples)
        with torch.no_grad():
            assert_close(folded(x), model(x))
