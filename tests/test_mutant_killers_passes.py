"""Fold guards and fold arithmetic that the rest of the suite did not pin down, each with a
model whose fold would be wrong without it (found by ``tools/mutants.py``).

Every test folds a model with O(1) parameters on an example input and compares the fold with
the original on a fresh input of another size (``_fold_matches``); where a rewrite must be
refused, it also checks that the op is still there and why it stayed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from grammar import randomise_
from helpers import fold_matches, fresh_input
from torch import fx, nn

import repfx
from repfx.ir.op_kinds import op_counts
from repfx.testing import assert_close

C = 4


def _random(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomise_(model, torch.Generator().manual_seed(seed)).eval()


def _reasons(folded: fx.GraphModule) -> str:
    return "\n".join(s.reason for s in folded.meta[repfx.REPORT_KEY].skipped)


def _rules(folded: fx.GraphModule) -> list[str]:
    return [f.rule for f in folded.meta[repfx.REPORT_KEY].folded]


# ----------------------------------- merge_branches: alignment, geometry, what counts as a branch


class BroadcastBranch(nn.Module):
    """A full-resolution 1×1 conv plus a stride-4 1×1 conv whose single output position
    broadcasts over it: both kernels are centred alike, but they read different positions."""

    def __init__(self):
        super().__init__()
        self.full = nn.Conv2d(C, C, 1)
        self.coarse = nn.Conv2d(C, C, 1, stride=4)

    def forward(self, x):
        return self.full(x) + self.coarse(x)


def test_branches_with_different_strides_are_not_merged():
    model = _random(BroadcastBranch())
    folded = fold_matches(model, fresh_input(2, C, 4, 4), fresh_input(3, C, 3, 2, seed=2))
    assert op_counts(folded)["conv"] == 2
    assert "branches have different strides" in _reasons(folded)


class MisalignedStride3(nn.Module):
    """Two 3×3, stride-3 convs, padded 1 and 0: on sizes divisible by 3 their outputs have the
    same shape, but their windows start one row / column apart."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(C, C, 3, stride=3, padding=1)
        self.b = nn.Conv2d(C, C, 3, stride=3, padding=0)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_branches_centred_on_different_positions_are_not_merged():
    model = _random(MisalignedStride3())
    folded = fold_matches(model, fresh_input(2, C, 6, 6), fresh_input(3, C, 9, 12, seed=2))
    assert op_counts(folded)["conv"] == 2
    assert "not centred on the same input position" in _reasons(folded)


class DilatedPointwiseBranch(nn.Module):
    """A 3×3 conv plus a 1×1 conv declared with dilation 2: a single tap has no spacing, so
    the merged 3×3 kernel keeps dilation 1."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Conv2d(C, C, 3, padding=1)
        self.point = nn.Conv2d(C, C, 1, dilation=2)

    def forward(self, x):
        return self.wide(x) + self.point(x)


def test_a_pointwise_branch_with_dilation_merges_exactly():
    folded = fold_matches(
        _random(DilatedPointwiseBranch()), fresh_input(2, C, 6, 6), fresh_input(1, C, 5, 7)
    )
    assert op_counts(folded)["conv"] == 1


class GroupedPlusDense(nn.Module):
    """A grouped 3×3 conv (2 output channels per group) plus a dense 1×1 conv: the merged
    kernel is dense, each grouped output keeping its block of input channels."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(C, C, 3, padding=1, groups=2)
        self.dense = nn.Conv2d(C, C, 1)

    def forward(self, x):
        return self.grouped(x) + self.dense(x)


def test_grouped_and_dense_branches_merge_exactly():
    folded = fold_matches(
        _random(GroupedPlusDense()), fresh_input(2, C, 6, 6), fresh_input(1, C, 5, 7)
    )
    assert op_counts(folded)["conv"] == 1


class PromotingScaleBranches(nn.Module):
    """Two float16 conv branches, one scaled by a float32 per-channel constant: the sum is
    float32, which a merged float16 conv would not be."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(C, C, 3, padding=1).half()
        self.b = nn.Conv2d(C, C, 1).half()
        self.scale = nn.Parameter(torch.rand(C, 1, 1) + 0.5)

    def forward(self, x):
        return self.a(x) + self.b(x) * self.scale


def test_a_dtype_promoting_scale_keeps_its_branch_out_of_a_merge():
    model = _random(PromotingScaleBranches())
    x, fresh = fresh_input(2, C, 5, 5).half(), fresh_input(1, C, 4, 6).half()
    folded = repfx.fold(model, (x,))
    with torch.no_grad():
        actual, expected = folded(fresh), model(fresh)
    assert actual.dtype == expected.dtype == torch.float32
    assert_close(actual, expected)
    assert op_counts(folded)["conv"] == 2


class RowScaledBranch(nn.Module):
    """RepVGG-like branches, one scaled per row (its height equals the channel count)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 1)
        self.rows = nn.Parameter(torch.rand(C, 1) + 0.5)

    def forward(self, x):
        return self.a(x) * self.rows + self.b(x)


def test_a_branch_scaled_along_the_height_is_not_merged():
    model = _random(RowScaledBranch())
    folded = fold_matches(model, fresh_input(2, C, C, 5), fresh_input(1, C, C, 7))
    assert op_counts(folded)["conv"] == 2


class ChannelCrops(nn.Module):
    """Two convs of the same channel crop ``x[:, 1:-1]``: a crop of the channels, not of the
    image."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(C - 2, C, 3, padding=1), nn.Conv2d(C - 2, C, 1)

    def forward(self, x):
        return self.a(x[:, 1:-1]) + self.b(x[:, 1:-1])


def test_branches_reading_a_channel_crop_merge_exactly_or_not_at_all():
    fold_matches(_random(ChannelCrops()), fresh_input(2, C, 5, 5), fresh_input(1, C, 4, 6))


class ConcatTwoInputs(nn.Module):
    """``cat([conv_a(x), conv_b(relu(x))])``: the convs read different tensors."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(torch.relu(x))], dim=1)


def test_concatenated_convs_of_different_tensors_are_not_merged():
    folded = fold_matches(
        _random(ConcatTwoInputs()), fresh_input(2, C, 5, 5), fresh_input(1, C, 4, 6)
    )
    assert op_counts(folded)["conv"] == 2


class SpatialConcat(nn.Module):
    """``cat([conv_a(x), conv_b(x)], dim=2)``: stacked along the height, not the channels."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=2)


def test_convs_concatenated_along_the_height_are_not_merged():
    folded = fold_matches(
        _random(SpatialConcat()), fresh_input(2, C, 5, 5), fresh_input(1, C, 4, 6)
    )
    assert op_counts(folded)["conv"] == 2
    assert "not along the channels" in _reasons(folded)


class PrefixBiasBeforePadding(nn.Module):
    """DBB's trap one conv deeper, as two branches: a 3×3 conv, and a biased 1×1, a bias-free
    1×1 and a zero-padded 3×3. The first 1×1's bias reaches the 3×3's padded border in the
    original; a conv composed of all three would read zeros there."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(C, C, 3, padding=1)
        self.p1, self.p2 = nn.Conv2d(C, C, 1), nn.Conv2d(C, C, 1, bias=False)
        self.b = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x):
        return self.a(x) + self.b(self.p2(self.p1(x)))


def test_a_biased_pointwise_conv_is_not_composed_into_a_padded_branch():
    model = _random(PrefixBiasBeforePadding())
    folded = fold_matches(model, fresh_input(2, C, 5, 5), fresh_input(1, C, 4, 6))
    assert op_counts(folded)["conv"] == 3  # a, p2∘p1, b


# ------------------------------------------------------------------------------- merge_sequential


def test_strided_pointwise_conv_is_not_composed_with_the_next_conv():
    """A stride-2 1×1 conv keeps every other position: composed into the 3×3 after it, the
    result would read every position."""
    model = _random(nn.Sequential(nn.Conv2d(C, 2 * C, 1, stride=2), nn.Conv2d(2 * C, C, 3)))
    folded = fold_matches(model, fresh_input(2, C, 9, 9), fresh_input(1, C, 8, 11))
    assert op_counts(folded)["conv"] == 2
    assert "first conv is not 1×1 with stride 1" in _reasons(folded)


@pytest.mark.parametrize("bias", [False, True])
def test_pointwise_conv_composes_into_the_next_conv(bias):
    """The positive case of the test above: stride 1, no padding after a bias."""
    model = _random(nn.Sequential(nn.Conv2d(C, 2 * C, 1, bias=bias), nn.Conv2d(2 * C, C, 3)))
    folded = fold_matches(model, fresh_input(2, C, 9, 9), fresh_input(1, C, 8, 11))
    assert op_counts(folded)["conv"] == 1


def test_grouped_pointwise_conv_is_not_composed_with_a_dense_conv():
    """Only a depthwise second conv can take a grouped first one: a dense 3×3 after a grouped
    1×1 is two ops."""
    model = _random(nn.Sequential(nn.Conv2d(C, C, 1, groups=2), nn.Conv2d(C, C, 3)))
    folded = fold_matches(model, fresh_input(2, C, 5, 5), fresh_input(1, C, 4, 6))
    assert op_counts(folded)["conv"] == 2
    assert "different groups" in _reasons(folded)


def test_a_pointwise_conv_before_a_strided_conv_is_composed_when_cheaper():
    """1×1 (8 → 4) then 3×3 stride 2 (4 → 2): per output position the two ops cost
    4·8·(2·2) + 2·4·9 = 200 multiply-adds (the 1×1 runs at full resolution), the composed
    3×3 (8 → 2) 2·8·9 = 144."""
    model = _random(nn.Sequential(nn.Conv2d(8, 4, 1), nn.Conv2d(4, 2, 3, stride=2)))
    folded = fold_matches(model, fresh_input(2, 8, 7, 7), fresh_input(1, 8, 8, 9))
    assert op_counts(folded)["conv"] == 1


# --------------------------------------------------------------------------------- absorb_padding


class PointwiseThenPad(nn.Module):
    """A bias-free 1×1 conv (``stride``), then ``F.pad`` of its output with ``value``."""

    def __init__(self, value: float = 0.0, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1, stride=stride, bias=False)
        self.value = value

    def forward(self, x):
        return F.pad(self.conv(x), [1, 1, 1, 1], value=self.value)


def test_zero_padding_of_a_bias_free_pointwise_conv_becomes_its_padding():
    folded = fold_matches(
        _random(PointwiseThenPad()), fresh_input(2, C, 5, 5), fresh_input(1, C, 4, 7)
    )
    assert _rules(folded) == ["absorb_padding"] and op_counts(folded)["conv"] == 1


def test_padding_with_a_non_zero_value_is_not_the_conv_padding():
    """The border of a padded conv is its bias (zero here), not 0.5."""
    folded = fold_matches(
        _random(PointwiseThenPad(value=0.5)), fresh_input(2, C, 5, 5), fresh_input(1, C, 4, 7)
    )
    assert _rules(folded) == []


def test_padding_of_a_strided_pointwise_conv_is_not_its_padding():
    """Padding the input of a stride-2 conv by 1 adds one output row, not two."""
    folded = fold_matches(
        _random(PointwiseThenPad(stride=2)), fresh_input(2, C, 5, 5), fresh_input(1, C, 6, 7)
    )
    assert _rules(folded) == []


class PaddedPointwise(nn.Module):
    """A bias-free 1×1 conv with its own ``padding``, then ``F.pad(y, pads)``."""

    def __init__(self, pads: list[int], padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1, padding=padding, bias=False)
        self.pads = pads

    def forward(self, x):
        return F.pad(self.conv(x), self.pads)


@pytest.mark.parametrize(
    ("pads", "padding", "absorbed"),
    [
        ([1, 1, 2, 2], 0, True),  # width 1, height 2: F.pad lists the last dim first
        ([2, 2, 0, 0], 1, True),  # on top of the conv's own padding
        ([1, 2, 0, 0], 0, False),  # asymmetric: no conv padding is
    ],
    ids=["width-1-height-2", "on-own-padding", "asymmetric"],
)
def test_zero_padding_after_a_pointwise_conv(pads, padding, absorbed):
    model = _random(PaddedPointwise(pads, padding))
    folded = fold_matches(model, fresh_input(2, C, 5, 6), fresh_input(1, C, 4, 7))
    assert (_rules(folded) == ["absorb_padding"]) is absorbed


# ------------------------------------------ fold_bn / fold_channel_affine: where an affine may go


def test_batch_norm_before_a_conv_padded_along_one_axis_only_is_kept():
    """``padding=(1, 0)`` pads the height: the BN's shift would meet zeros on the border."""
    model = _random(nn.Sequential(nn.BatchNorm2d(C), nn.Conv2d(C, C, 3, padding=(1, 0))))
    folded = fold_matches(model, fresh_input(2, C, 5, 5), fresh_input(1, C, 4, 6))
    assert op_counts(folded)["batch_norm"] == 1
    assert "zero-pads its input" in _reasons(folded)


def test_batch_norm_before_an_unpadded_conv_folds_into_it():
    model = _random(nn.Sequential(nn.BatchNorm2d(C), nn.Conv2d(C, C, 3)))
    folded = fold_matches(model, fresh_input(2, C, 5, 5), fresh_input(1, C, 4, 6))
    assert op_counts(folded)["batch_norm"] == 0


def test_batch_norm_before_a_transposed_conv_is_kept():
    """The input side of a transposed conv is its weight's first axis: the input-side fold of
    a conv does not apply."""
    model = _random(nn.Sequential(nn.BatchNorm2d(C), nn.ConvTranspose2d(C, 3, 3, stride=2)))
    folded = fold_matches(model, fresh_input(2, C, 4, 4), fresh_input(1, C, 5, 3))
    assert op_counts(folded)["batch_norm"] == 1
    assert "transposed conv" in _reasons(folded)


def test_strided_depthwise_pointwise_conv_is_not_a_channel_affine():
    """A depthwise 1×1 conv with stride 2 keeps every other position: it is not ``s ⊙ x + t``
    and cannot be folded into the conv before it."""
    model = _random(nn.Sequential(nn.Conv2d(3, C, 3), nn.Conv2d(C, C, 1, stride=2, groups=C)))
    folded = fold_matches(model, fresh_input(2, 3, 7, 7), fresh_input(1, 3, 6, 9))
    assert op_counts(folded)["conv"] == 2


def test_depthwise_pointwise_conv_folds_into_the_conv_before_it():
    model = _random(nn.Sequential(nn.Conv2d(3, C, 3), nn.Conv2d(C, C, 1, groups=C)))
    folded = fold_matches(model, fresh_input(2, 3, 7, 7), fresh_input(1, 3, 6, 9))
    assert op_counts(folded)["conv"] == 1


class HeightScale(nn.Module):
    """A conv whose output height equals its channel count, scaled per row (axis -2)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3)
        self.rows = nn.Parameter(torch.rand(C, 1) + 0.5)

    def forward(self, x):
        return self.conv(x) * self.rows


def test_a_scale_along_the_height_is_not_folded_into_the_channels():
    model = _random(HeightScale())
    folded = fold_matches(model, fresh_input(2, 3, C + 2, 7), fresh_input(1, 3, C + 2, 5))
    assert op_counts(folded)["channel_affine"] == 1
    assert "acts on axis -2" in _reasons(folded)


class SharedFlatten(nn.Module):
    """``conv(x).flatten(2)`` is scaled per channel and also summed: the scale cannot move
    into the conv, the sum would see it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3)
        self.g = nn.Parameter(torch.rand(C, 1) + 0.5)

    def forward(self, x):
        z = self.conv(x).flatten(2)
        return z * self.g, z.sum(-1)


def test_a_scale_is_not_moved_back_through_a_layout_op_read_elsewhere():
    model = _random(SharedFlatten())
    folded = repfx.fold(model, (fresh_input(2, 3, 5, 5),))
    fresh = fresh_input(1, 3, 6, 4)
    with torch.no_grad():
        assert_close(folded(fresh), model(fresh))
    assert op_counts(folded)["channel_affine"] == 1


class Float64LayerNormScale(nn.Module):
    """A float64 model: a weight-free ``F.layer_norm`` (whose view knows no parameter dtype)
    then a float64 per-channel scale."""

    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.rand(C, dtype=torch.float64) + 0.5)

    def forward(self, x):
        return F.layer_norm(x, (C,)) * self.g


class Float64LayerNormModuleScale(Float64LayerNormScale):
    """The same with an ``nn.LayerNorm`` module without an affine (no parameter either)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(C, elementwise_affine=False)

    def forward(self, x):
        return self.norm(x) * self.g


@pytest.mark.parametrize(
    "model_class", [Float64LayerNormScale, Float64LayerNormModuleScale], ids=["F", "module"]
)
def test_a_float64_scale_is_not_rounded_into_a_float32_norm_affine(model_class):
    """Folding the scale as float32 γ would round it: off by ~1e-8, far beyond float64."""
    model = model_class().eval()
    x, fresh = fresh_input(2, 3, C).double(), fresh_input(1, 5, C).double()
    folded = fold_matches(model, x, fresh)
    assert folded(fresh).dtype == torch.float64
    # the norm computes in its input's dtype: the scale folds into it as a float64 γ
    assert op_counts(folded).get("channel_affine", 0) == 0


# --------------------------------------------------------------------------------- hooks and mode


def _hook_sees_the_same(
    model: nn.Module, hooked: nn.Module, example: torch.Tensor, fresh: torch.Tensor
) -> fx.GraphModule:
    """Fold ``model`` with a forward hook on ``hooked`` that only records what it sees (so the
    proof on probes cannot object to removing or changing ``hooked``): running the fold, the
    hook must run and see what it sees running the original."""
    seen: list[torch.Tensor] = []
    hooked.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    folded = fold_matches(model, example, fresh)
    seen.clear()
    with torch.no_grad():
        model(fresh)
        folded(fresh)
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    return folded


def test_batch_norm_with_an_observing_hook_is_not_folded_away():
    model = _random(nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C)))
    folded = _hook_sees_the_same(model, model[1], fresh_input(2, 3, 5, 5), fresh_input(1, 3, 6, 7))
    assert "BatchNorm2d has hooks" in _reasons(folded)


def test_a_conv_with_an_observing_hook_does_not_absorb_the_batch_norm_after_it():
    """The hook sees the conv's own output, not the conv with the BN folded in."""
    model = _random(nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C)))
    folded = _hook_sees_the_same(model, model[0], fresh_input(2, 3, 5, 5), fresh_input(1, 3, 6, 7))
    assert "conv module has hooks" in _reasons(folded)


def test_identity_with_a_hook_is_not_removed():
    model = _random(nn.Sequential(nn.Conv2d(3, C, 3), nn.Identity(), nn.ReLU()))
    folded = _hook_sees_the_same(model, model[1], fresh_input(2, 3, 5, 5), fresh_input(1, 3, 6, 7))
    assert "Identity has hooks" in _reasons(folded)


class HookedMixer(nn.Module):
    """RIFormer's mixer ``bn(x) − x`` (a hook goes on the BN)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        return self.bn(x) - x


def test_a_mixer_branch_with_a_hook_is_not_collapsed():
    model = _random(HookedMixer())
    folded = _hook_sees_the_same(model, model.bn, fresh_input(2, C, 5, 5), fresh_input(1, C, 4, 6))
    assert "a branch module has hooks" in _reasons(folded)


def test_a_hooked_conv_is_not_composed_with_the_pointwise_conv_before_it():
    model = _random(nn.Sequential(nn.Conv2d(C, 2 * C, 1), nn.Conv2d(2 * C, C, 3)))
    folded = _hook_sees_the_same(model, model[1], fresh_input(2, C, 5, 5), fresh_input(1, C, 4, 6))
    assert op_counts(folded)["conv"] == 2
    assert "module has hooks" in _reasons(folded)


@pytest.mark.parametrize("training", [False, True])
def test_the_fold_is_in_the_mode_of_the_original(training):
    model = _random(nn.Sequential(nn.Conv2d(3, C, 3), nn.ReLU())).train(training)
    assert repfx.fold(model, (fresh_input(2, 3, 5, 5),)).training is training
