import torch
import torch.nn.functional as F
from grammar import randomise_
from helpers import apply, call_targets, traced
from torch import nn

from repfx.models import BNAndPad
from repfx.passes import AbsorbPadding, FoldBatchNorm
from repfx.testing import assert_close


def _run(model: nn.Module, x: torch.Tensor):
    model = randomise_(model, torch.Generator().manual_seed(3)).eval()
    gm = traced(model, x)
    apply(FoldBatchNorm(), gm)
    return model, gm, apply(AbsorbPadding(), gm)


def test_bn_and_pad_after_a_pointwise_conv_becomes_the_conv_padding():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), BNAndPad(4, 2), nn.Conv2d(4, 2, 3))
    x = torch.randn(2, 3, 6, 6)
    model, gm, result = _run(model, x)
    assert result.modified
    padded = gm.get_submodule("0_padded")
    assert padded.padding == (2, 2) and padded.kernel_size == (1, 1)
    assert call_targets(gm) == ["0_padded", "2"]
    assert_close(gm(x), model(x))


class ZeroPad(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=bias)

    def forward(self, x):
        return F.pad(self.conv(x), [1, 1, 1, 1])


def test_zero_padding_of_a_bias_free_pointwise_conv_is_absorbed():
    x = torch.randn(1, 3, 4, 4)
    model, gm, result = _run(ZeroPad(bias=False), x)
    assert result.modified and call_targets(gm) == ["conv_padded"]
    assert_close(gm(x), model(x))


def test_zero_padding_of_a_biased_conv_is_not_absorbed():
    _, gm, result = _run(ZeroPad(bias=True), torch.randn(1, 3, 4, 4))
    assert not result.modified
    assert [s.reason for s in result.skipped] == ["the padding value is not the conv's bias"]
    assert call_targets(gm) == ["conv", F.pad]
