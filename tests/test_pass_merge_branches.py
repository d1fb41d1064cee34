import operator

import pytest
import torch
import torch.nn.functional as F
from grammar import ParallelBranches, Seq, randomise_
from helpers import apply, call_targets, traced
from torch import nn

from repfx.passes import FoldBatchNorm, MergeBranches
from repfx.testing import assert_close


def _random(model: nn.Module) -> nn.Module:
    return randomise_(model, torch.Generator().manual_seed(9)).eval()


def _repvgg(c: int, stride: int = 1, groups: int = 1) -> nn.Module:
    branches = [
        Seq(nn.Conv2d(c, c, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(c)),
        Seq(nn.Conv2d(c, c, 1, stride, 0, groups=groups, bias=False), nn.BatchNorm2d(c)),
    ]
    if stride == 1:
        branches.append(nn.BatchNorm2d(c))
    return _random(ParallelBranches(branches, [1.0] * len(branches)))


def _fold_bn_then_merge(model: nn.Module, x: torch.Tensor):
    gm = traced(model, x)
    apply(FoldBatchNorm(), gm)
    results = [apply(MergeBranches(), gm) for _ in range(3)]
    return gm, results


def test_repvgg_block_becomes_one_conv():
    model = _repvgg(4, groups=2)
    x = torch.randn(2, 4, 7, 7)
    gm, results = _fold_bn_then_merge(model, x)
    assert results[0].modified and not results[-1].modified
    assert call_targets(gm) == ["merged_conv"]
    merged = gm.get_submodule("merged_conv")
    assert merged.kernel_size == (3, 3) and merged.padding == (1, 1) and merged.groups == 2
    assert_close(gm(x), model(x))


def test_different_dilations_merge_into_an_undilated_kernel():
    model = _random(
        ParallelBranches(
            [nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=2, dilation=2)], [1.0, -1.0]
        )
    )
    x = torch.randn(2, 3, 8, 8)
    gm, _ = _fold_bn_then_merge(model, x)
    assert gm.get_submodule("merged_conv").kernel_size == (5, 5)
    assert_close(gm(x), model(x))


def test_reflect_padding_is_not_merged():
    convs = [nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), nn.Conv2d(3, 3, 1)]
    model = _random(ParallelBranches(convs, [1.0, 1.0]))
    gm, results = _fold_bn_then_merge(model, torch.randn(1, 3, 5, 5))
    assert not results[0].modified
    assert [s.reason for s in results[0].skipped] == ["a branch conv pads with 'reflect'"]
    assert call_targets(gm).count("branches.0") == 1


def test_hooked_branch_is_not_merged():
    model = _repvgg(3)
    model.branches[2].register_forward_hook(lambda *args: None)
    gm, results = _fold_bn_then_merge(model, torch.randn(1, 3, 5, 5))
    assert "a branch module has hooks" in {s.reason for s in results[0].skipped}
    assert "branches.2" in call_targets(gm)


class SharedIntermediate(nn.Module):
    """The 1×1 branch's output is also returned: merging would lose it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.b(x)
        return self.a(x) + y, y


def test_intermediate_used_outside_is_reported():
    model = SharedIntermediate().eval()
    gm, results = _fold_bn_then_merge(model, torch.randn(1, 3, 5, 5))
    assert not results[0].modified
    assert [s.reason for s in results[0].skipped] == [
        "a branch's intermediate result is also used outside the branches"
    ]
    assert {"a", "b"} <= set(call_targets(gm))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return x + torch.relu(self.conv(x))


def test_region_with_a_non_affine_op_is_explained():
    gm, results = _fold_bn_then_merge(Residual().eval(), torch.randn(1, 3, 5, 5))
    assert not results[0].modified
    assert [s.reason for s in results[0].skipped] == ["a branch contains a non-affine op (relu)"]
    assert call_targets(gm) == ["conv", torch.relu, operator.add]


def test_average_pool_branch_is_a_uniform_kernel():
    model = _random(ParallelBranches([nn.Conv2d(3, 3, 3, 2, 1), nn.AvgPool2d(3, 2, 1)], [1.0, 0.5]))
    x = torch.randn(2, 3, 7, 7)
    gm, results = _fold_bn_then_merge(model, x)
    assert results[0].modified
    assert call_targets(gm) == ["merged_conv"]
    assert_close(gm(x), model(x))


def test_average_pool_that_ignores_padding_is_not_a_conv():
    pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
    model = _random(ParallelBranches([nn.Conv2d(3, 3, 3, 1, 1), pool], [1.0, 1.0]))
    gm, results = _fold_bn_then_merge(model, torch.randn(1, 3, 5, 5))
    assert not results[0].modified
    assert [s.reason for s in results[0].skipped] == [
        "a branch contains a non-affine op (AvgPool2d)"
    ]
    assert "branches.1" in call_targets(gm)


class FunctionalPoolBranch(nn.Module):
    """``conv(x) + F.avg_pool2d(x, …)``: the pool as a function call, as in dynamo graphs."""

    def __init__(self, **pool):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, pool["stride"], 1)
        self.pool = pool

    def forward(self, x):
        return self.conv(x) + F.avg_pool2d(x, 3, **self.pool)


@pytest.mark.parametrize(
    "pool, merged",
    [
        ({"stride": 2, "padding": 1}, True),
        ({"stride": 2, "padding": 1, "count_include_pad": True, "divisor_override": None}, True),
        ({"stride": 2, "padding": 1, "count_include_pad": False}, False),
        ({"stride": 2, "padding": 1, "divisor_override": 4}, False),
        ({"stride": 1, "padding": 1}, True),
    ],
)
def test_functional_average_pool_branch_merges_only_when_it_is_a_uniform_kernel(pool, merged):
    model = _random(FunctionalPoolBranch(**pool))
    x, fresh = torch.randn(2, 3, 7, 7), torch.randn(1, 3, 9, 9)  # sizes both ops agree on
    gm, results = _fold_bn_then_merge(model, x)
    assert results[0].modified == merged
    assert (call_targets(gm) == ["merged_conv"]) == merged
    with torch.no_grad():
        assert_close(gm(fresh), model(fresh))


class Inception(nn.Module):
    """Linear branches of one input concatenated along the channels."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.a = Seq(nn.Conv2d(4, 3, 1, groups=1), nn.BatchNorm2d(3))
        self.b = nn.Conv2d(4, 2, 3, padding=1, groups=groups)
        self.c = nn.Conv2d(4, 5, (1, 5), padding=(0, 2))

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x), x, self.c(x)], dim=1)


def test_concatenated_branches_become_one_conv():
    model = _random(Inception())
    x = torch.randn(2, 4, 6, 7)
    gm, results = _fold_bn_then_merge(model, x)
    assert results[0].modified
    assert call_targets(gm) == ["merged_conv"]
    assert gm.get_submodule("merged_conv").out_channels == 3 + 2 + 4 + 5
    assert_close(gm(x), model(x))


def test_concatenated_grouped_convs_are_not_made_dense():
    model = _random(Inception(groups=2))
    gm, results = _fold_bn_then_merge(model, torch.randn(1, 4, 5, 5))
    assert not results[0].modified
    assert [s.reason for s in results[0].skipped] == [
        "concatenating grouped convs would make them dense"
    ]
    assert torch.cat in call_targets(gm)


class AssertsShapes(nn.Module):
    """timm's BatchNormAct2d asserts ``x.ndim == 4`` on each branch conv's output."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        torch._assert(a.ndim == 4, "4D")
        torch._assert(b.shape[1] == 3, "3 channels")
        return a + b


def test_shape_reads_of_branch_outputs_do_not_keep_the_branches_alive():
    model = _random(AssertsShapes())
    x = torch.randn(2, 3, 5, 5)
    gm, results = _fold_bn_then_merge(model, x)
    assert results[0].modified
    assert [t for t in call_targets(gm) if isinstance(t, str)] == ["merged_conv"]
    assert_close(gm(x), model(x))


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.head, self.head_dist = nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x):
        return (self.head(x) + self.head_dist(x)) / 2


def test_summed_linears_become_one_linear():
    model = _random(TwoHeads())
    x = torch.randn(3, 6)
    gm, results = _fold_bn_then_merge(model, x)
    assert results[0].modified
    assert isinstance(gm.get_submodule("merged_conv"), nn.Linear)
    assert_close(gm(x), model(x))


class RowCrop(nn.Module):
    def __init__(self):
        super().__init__()
        self.square, self.row = nn.Conv2d(3, 3, 3), nn.Conv2d(3, 3, (1, 3))

    def forward(self, x):
        return self.square(x) + self.row(x[:, :, 1:-1, :])


def test_crop_before_a_branch_conv_is_absorbed():
    model = _random(RowCrop())
    x = torch.randn(2, 3, 7, 8)
    gm, results = _fold_bn_then_merge(model, x)
    assert results[0].modified
    assert call_targets(gm) == ["merged_conv"]
    assert gm.get_submodule("merged_conv").padding == (0, 0)
    assert_close(gm(x), model(x))
