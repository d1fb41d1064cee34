import torch
from grammar import randomise_
from helpers import apply, call_targets, traced
from torch import nn

from repfx.passes import FoldBatchNorm, MergeSequential
from repfx.testing import assert_close


def _random(model: nn.Module) -> nn.Module:
    return randomise_(model, torch.Generator().manual_seed(11)).eval()


def _run(model: nn.Module, x: torch.Tensor):
    gm = traced(model, x)
    apply(FoldBatchNorm(), gm)
    result = apply(MergeSequential(), gm)
    return gm, result


def test_pointwise_bn_then_unpadded_conv_becomes_one_conv():
    model = _random(nn.Sequential(nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6), nn.Conv2d(6, 5, 3, 2)))
    x = torch.randn(2, 4, 9, 9)
    gm, result = _run(model, x)
    assert result.modified
    assert call_targets(gm) == ["2_composed"]
    assert gm.get_submodule("2_composed").kernel_size == (3, 3)
    assert_close(gm(x), model(x))
    assert not apply(MergeSequential(), gm).modified


def test_grouped_bias_free_pointwise_before_padded_conv_is_exact():
    model = _random(
        nn.Sequential(
            nn.Conv2d(4, 4, 1, groups=2, bias=False), nn.Conv2d(4, 6, 3, padding=1, groups=2)
        )
    )
    x = torch.randn(2, 4, 6, 6)
    gm, result = _run(model, x)
    assert result.modified
    assert_close(gm(x), model(x))


def test_shift_before_zero_padded_conv_is_not_composed():
    model = _random(
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1))
    )
    gm, result = _run(model, torch.randn(1, 4, 5, 5))
    assert not result.modified
    assert [s.reason for s in result.skipped] == ["a bias before a zero-padded conv is not exact"]
    assert call_targets(gm) == ["0", "2"]


def test_bottleneck_is_not_composed_because_it_would_be_slower():
    model = _random(nn.Sequential(nn.Conv2d(16, 2, 1, bias=False), nn.Conv2d(2, 16, 3)))
    gm, result = _run(model, torch.randn(1, 16, 5, 5))
    assert not result.modified
    assert [s.reason for s in result.skipped] == [
        "the composed op would cost more multiply-adds than the two ops"
    ]
    assert call_targets(gm) == ["0", "1"]


def test_linear_then_linear_becomes_one_linear():
    model = _random(nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2)))
    x = torch.randn(4, 7, 3)
    gm, result = _run(model, x)
    assert result.modified
    assert call_targets(gm) == ["1_composed"]
    assert_close(gm(x), model(x))


def test_reflect_padded_conv_keeps_its_padding_mode():
    """Reflect padding pads with images of the biased values: composing stays exact."""
    second = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    model = _random(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), second))
    x = torch.randn(2, 3, 6, 6)
    gm, result = _run(model, x)
    assert result.modified
    assert gm.get_submodule("2_composed").padding_mode == "reflect"
    assert_close(gm(x), model(x))


def test_padded_pointwise_then_unpadded_conv_keeps_the_padding():
    """The pointwise conv's own zero padding puts its bias on the border: composable."""
    model = _random(nn.Sequential(nn.Conv2d(3, 3, 1, padding=1), nn.Conv2d(3, 4, 3)))
    x = torch.randn(2, 3, 5, 5)
    gm, result = _run(model, x)
    assert result.modified
    assert gm.get_submodule("1_composed").padding == (1, 1)
    assert_close(gm(x), model(x))


def test_padded_biased_pointwise_then_padded_conv_is_not_composed():
    model = _random(nn.Sequential(nn.Conv2d(3, 3, 1, padding=1), nn.Conv2d(3, 4, 3, padding=1)))
    _, result = _run(model, torch.randn(1, 3, 5, 5))
    assert [s.reason for s in result.skipped] == ["a bias before a zero-padded conv is not exact"]
