import torch
import torch.nn.functional as F
from grammar import randomise_
from helpers import apply, call_targets, traced
from torch import nn

from repfx.passes import FoldBatchNorm
from repfx.testing import assert_close


def _random(model: nn.Module) -> nn.Module:
    return randomise_(model, torch.Generator().manual_seed(7)).eval()


def test_fold_bn_into_conv_before_and_after():
    model = _random(
        nn.Sequential(
            nn.Conv2d(3, 6, 3, groups=3),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.BatchNorm2d(6),
            nn.Conv2d(6, 4, 1),
        )
    )
    x = torch.randn(2, 3, 7, 7)
    gm = traced(model, x)
    result = apply(FoldBatchNorm(), gm)
    assert [f.where for f in result.folded] == ["1", "3"]
    assert call_targets(gm) == ["0", "2", "4"]
    assert_close(gm(x), model(x))
    assert not apply(FoldBatchNorm(), gm).modified


def test_fold_bn_into_linear_and_conv_transpose():
    model = _random(
        nn.Sequential(nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), nn.BatchNorm2d(6))
    )
    x = torch.randn(2, 4, 3, 3)
    gm = traced(model, x)
    assert apply(FoldBatchNorm(), gm).modified
    assert call_targets(gm) == ["0"]
    assert_close(gm(x), model(x))

    linear = _random(nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)))
    x = torch.randn(4, 5)
    gm = traced(linear, x)
    assert apply(FoldBatchNorm(), gm).modified
    assert_close(gm(x), linear(x))


class FunctionalConvBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)

    def forward(self, x):
        y = F.conv2d(x, self.w, None, 1, 1)
        return F.batch_norm(y, self.mean, self.var, None, None, False, 0.1, 1e-3)


def test_fold_functional_bn_into_functional_conv_keeps_attribute_names():
    model = FunctionalConvBn().eval()
    x = torch.randn(2, 3, 5, 5)
    gm = traced(model, x)
    assert apply(FoldBatchNorm(), gm).modified
    assert call_targets(gm) == [F.conv2d]
    assert_close(gm(x), model(x))
    assert hasattr(gm, "w")  # the weight keeps its name


def test_fold_bn_into_conv1d_and_conv3d_without_example_inputs():
    for conv, bn, shape in [
        (nn.Conv1d(3, 4, 3, padding=1), nn.BatchNorm1d(4), (2, 3, 9)),
        (nn.Conv3d(3, 4, 2, groups=1), nn.BatchNorm3d(4), (2, 3, 4, 5, 6)),
    ]:
        model = _random(nn.Sequential(conv, bn))
        gm = traced(model)
        assert apply(FoldBatchNorm(), gm).modified
        assert call_targets(gm) == ["0"]
        x = torch.randn(shape)
        assert_close(gm(x), model(x))
