"""The commit point's float64 depthwise convolutions (``repfx.proof.depthwise``) compute what
torch's convolution computes, in every form they take over, and leave the others alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from repfx.proof.depthwise import FastDepthwise, depthwise_conv, may_run_grouped_conv


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-12, atol=1e-12))


@given(
    channels=st.integers(1, 6),
    multiplier=st.integers(1, 3),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_a_2d_depthwise_conv_is_torchs(
    channels, multiplier, kernel, stride, dilation, padding, size, with_bias, seed
):
    g = torch.Generator().manual_seed(seed)
    extent = [d * (k - 1) + 1 for d, k in zip(dilation, kernel, strict=True)]
    if any(s + 2 * p < e for s, p, e in zip(size, padding, extent, strict=True)):
        return  # no output position
    x = torch.randn(2, channels, *size, generator=g, dtype=torch.float64)
    w = torch.randn(channels * multiplier, 1, *kernel, generator=g, dtype=torch.float64)
    b = torch.randn(channels * multiplier, generator=g, dtype=torch.float64) if with_bias else None
    want = F.conv2d(x, w, b, stride, padding, dilation, channels)
    assert _close(depthwise_conv(x, w, b, stride, padding, dilation, groups=channels), want)
    with FastDepthwise():
        assert _close(F.conv2d(x, w, b, stride, padding, dilation, channels), want)


@pytest.mark.parametrize("stride, padding, dilation", [(1, 0, 1), (2, 3, 2), (3, 1, 1)])
def test_a_1d_depthwise_conv_through_a_module_is_torchs(stride, padding, dilation):
    conv = torch.nn.Conv1d(6, 12, 5, stride, padding, dilation, groups=6).double()
    x = torch.randn(3, 6, 17, dtype=torch.float64)
    want = conv(x)
    with FastDepthwise():
        got = conv(x)
    assert _close(got, want)


@pytest.mark.parametrize("shape", [(2, 6, 7, 5), (2, 6, 9)])
def test_one_value_stands_for_every_spatial_dimension(shape):
    """``aten.convolution`` takes ``[s]`` for ``[s, s]`` (a conv with ``padding="same"`` or
    ``"valid"`` reaches it so)."""
    x = torch.randn(*shape, dtype=torch.float64)
    w = torch.randn(12, 1, *([3] * (len(shape) - 2)), dtype=torch.float64)
    for stride, padding, dilation in [([1], [0], [1]), ([2], [1], [2]), ([1], [2], [1])]:
        args = (x, w, None, stride, padding, dilation, False, [0], 6)
        want = torch.ops.aten.convolution.default(*args)
        assert _close(depthwise_conv(*args), want)
        with FastDepthwise():
            assert _close(torch.ops.aten.convolution.default(*args), want)


def test_a_same_padded_depthwise_conv_is_torchs():
    conv = torch.nn.Conv2d(8, 8, 5, padding="same", groups=8, bias=False).double()
    x = torch.randn(1, 8, 6, 7, dtype=torch.float64)
    want = conv(x)
    with FastDepthwise():
        assert _close(conv(x), want)


def test_only_float64_depthwise_convs_on_the_cpu_are_taken_over(monkeypatch):
    import repfx.proof.depthwise as module

    taken = []
    real = module.depthwise_conv
    monkeypatch.setattr(module, "depthwise_conv", lambda *a: taken.append(1) or real(*a))
    x64, x32 = torch.randn(1, 4, 6, 6, dtype=torch.float64), torch.randn(1, 4, 6, 6)
    with FastDepthwise():
        F.conv2d(x32, torch.randn(4, 1, 3, 3), groups=4)  # float32
        F.conv2d(x64, torch.randn(8, 2, 3, 3, dtype=torch.float64), groups=2)  # 2 inputs a group
        F.conv2d(x64, torch.randn(4, 4, 3, 3, dtype=torch.float64))  # not grouped
        F.conv_transpose2d(x64, torch.randn(4, 1, 3, 3, dtype=torch.float64), groups=4)
        assert not taken
        F.conv2d(x64, torch.randn(4, 1, 3, 3, dtype=torch.float64), groups=4)
    assert taken == [1]


class _Convs(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, groups=groups)
        self.weight = torch.nn.Parameter(torch.randn(4, 4 // groups, 3, 3))
        self.groups = groups

    def forward(self, x):
        return self.conv(x) + F.conv2d(x, self.weight, groups=self.groups)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_the_mode_is_entered_only_where_a_grouped_conv_may_run(groups):
    gm = torch.fx.symbolic_trace(_Convs(groups))
    by_name = {n.name: n for n in gm.graph.nodes}
    assert may_run_grouped_conv(gm, [by_name["conv"]]) == (groups > 1)
    assert may_run_grouped_conv(gm, [by_name["conv2d"]]) == (groups > 1)
    assert not may_run_grouped_conv(gm, [by_name["x"], by_name["add"]])
