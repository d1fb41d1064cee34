"""Classes of models that used to fold to a different function inside the passes: each is now
folded exactly or refused (the op stays), never a wrong model and never a raw exception.

Every check compares the folded model with the original on a fresh input (other values, other
batch size) and, where the class is about exactness, in float64 too.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repfx
from repfx.ir.op_kinds import op_counts
from repfx.models import create
from repfx.testing import assert_close


def _randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean = 1.0 if p.dim() == 1 and name.endswith("weight") else 0.0
            p.copy_((torch.randn(p.shape, generator=gen) * 0.5 + mean).to(p.dtype))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def _fresh(*shape: int, dtype=torch.float32, seed: int = 7) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _assert_exact(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """Fold without and with example inputs; both match on a fresh input of another batch.
    Returns the fold with example inputs."""
    other = _fresh(example.shape[0] + 1, *example.shape[1:], dtype=example.dtype)
    folds = [repfx.fold(model, inputs) for inputs in (None, (example,))]
    for folded in folds:
        with torch.no_grad():
            got, want = folded(other), model(other)
        assert got.dtype == want.dtype
        assert_close(got, want)
    return folds[-1]


def test_dbb_tiny_folds_with_its_freshly_constructed_weights():
    """Fresh BNs have zero bias: a zero-padded plain pad inside DBB's BNAndPad used to be
    taken for the whole pattern, leaving the conv alive (PassError)."""
    model = create("dbb_tiny").eval()
    folded = _assert_exact(model, torch.randn(1, 3, 32, 32))
    randomised = repfx.fold(_randomised(create("dbb_tiny")), (torch.randn(1, 3, 32, 32),))
    assert op_counts(folded)["conv"] == op_counts(randomised)["conv"]


class CropBranches(nn.Module):
    """``conv3(x) + conv(x[..., 1:-1, 1:-1])`` where the cropped branch pads by 2: the
    cropped ring becomes zeros, so it is *not* the same conv with padding 1."""

    def __init__(self, padding: int):
        super().__init__()
        self.square = nn.Conv2d(3, 4, 3, padding=1)
        self.cropped = nn.Conv2d(3, 4, 3, padding=padding)

    def forward(self, x):
        return self.square(x) + self.cropped(x[:, :, 1:-1, 1:-1])


@pytest.mark.parametrize("padding", [2, 3])
def test_conv_reading_a_crop_through_padding_is_not_merged_wrongly(padding):
    model = _randomised(CropBranches(padding))
    x = torch.randn(2, 3, 9, 8)
    if padding == 3:  # output sizes differ from the square branch: the model itself fails
        x = torch.randn(2, 3, 9, 8)
        with pytest.raises(RuntimeError):
            model(x)
        return
    _assert_exact(model, x)


class PaddedPointwiseThenReflect(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.pointwise = nn.Conv2d(3, 4, 1, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, padding_mode=mode)

    def forward(self, x):
        return self.conv(self.pointwise(x))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_zero_padded_pointwise_conv_before_a_reflecting_conv(mode):
    _assert_exact(_randomised(PaddedPointwiseThenReflect(mode)), torch.randn(1, 3, 7, 6))


class EvenDilatedBranches(nn.Module):
    def __init__(self, k: int, d: int):
        super().__init__()
        self.wide = nn.Conv2d(3, 3, k, dilation=d, padding=d * (k - 1) // 2)
        self.point = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.wide(x) + self.point(x)


@pytest.mark.parametrize(("k", "d"), [(2, 2), (4, 2), (2, 4), (3, 2), (4, 1)])
def test_even_kernel_with_dilation_summed_with_a_pointwise_branch(k, d):
    model = _randomised(EvenDilatedBranches(k, d))
    x = torch.randn(1, 3, 11, 10)
    with torch.no_grad():
        shapes_agree = model.wide(x).shape == model.point(x).shape
    if not shapes_agree:
        return  # not a valid model for these sizes
    _assert_exact(model, x)


class HookedPad(nn.Module):
    """A bias-free pointwise conv whose output is zero-padded: absorb_padding's pattern."""

    def __init__(self):
        super().__init__()
        self.pointwise = nn.Conv2d(3, 4, 1, bias=False)
        self.conv = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.conv(F.pad(self.pointwise(x), [1, 1, 1, 1]))


def test_absorb_padding_never_rewrites_a_hooked_conv():
    model = _randomised(HookedPad())
    seen: list[tuple[int, ...]] = []
    model.pointwise.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    x = torch.randn(2, 3, 6, 5)
    folded = repfx.fold(model, (x,))
    seen.clear()
    with torch.no_grad():
        got = folded(x)
    assert seen == [(2, 4, 6, 5)], "the hook must see the unpadded output, once"
    with torch.no_grad():
        assert_close(got, model(x))


class ScalarAffines(nn.Module):
    """Python-scalar affines only: their dtype is the tensor's, whatever it is."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return (y * 0.5 + 0.25) * 3.0 - 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_scalar_affines_keep_the_models_dtype(dtype):
    model = _randomised(ScalarAffines()).to(dtype)
    x = _fresh(2, 3, 6, 7, dtype=dtype)
    for inputs in ((x,), None):
        folded = repfx.fold(model, inputs, verify=False)
        with torch.no_grad():
            got, want = folded(x), model(x)
        assert got.dtype == dtype
        if dtype == torch.float64:
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
        else:
            assert_close(got, want)


class MixedDtypeScale(nn.Module):
    """A float32 per-channel scale after a float16 conv promotes the result to float32: it
    must not be folded into the float16 weights."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1).half()
        self.scale = nn.Parameter(torch.tensor([3.0, -2.0]).view(1, 2, 1, 1))

    def forward(self, x):
        return self.conv(x) * self.scale


def test_float32_scale_is_not_folded_into_a_float16_conv():
    model = MixedDtypeScale().eval()
    x = _fresh(1, 2, 3, 3, dtype=torch.float16)
    folded = repfx.fold(model, (x,))
    with torch.no_grad():
        got, want = folded(x), model(x)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)


def test_without_example_inputs_the_dtype_mismatch_is_the_reason_given():
    """Without example inputs nothing can probe the region, but the constants' dtypes are known:
    the report must name the mismatch, not a missing probe shape."""
    folded = repfx.fold(MixedDtypeScale().eval(), None)
    report = folded.meta["repfx_report"]
    assert report.counts() == {}
    reasons = " ".join(s.reason for s in report.skipped if s.rule == "fold_channel_affine")
    assert "torch.float32" in reasons and "torch.float16" in reasons


class PaddedPointwiseThenUnpaddedReplicate(nn.Module):
    """The 1×1 conv pads with zeros (its border is its bias); the 3×3 conv pads nothing, so its
    ``padding_mode`` must not become the composed conv's."""

    def __init__(self, mode: str):
        super().__init__()
        self.pointwise = nn.Conv2d(3, 4, 1, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=0, padding_mode=mode)

    def forward(self, x):
        return self.conv(self.pointwise(x))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_zero_padded_pointwise_conv_before_an_unpadded_reflecting_conv(mode):
    _assert_exact(_randomised(PaddedPointwiseThenUnpaddedReplicate(mode)), torch.randn(1, 3, 7, 6))


class AsymmetricSameBranches(nn.Module):
    """``padding='same'`` with an even kernel pads asymmetrically: no symmetric geometry."""

    def __init__(self):
        super().__init__()
        self.even = nn.Conv2d(3, 3, 2, padding="same")
        self.point = nn.Conv2d(3, 3, 1, padding="same")

    def forward(self, x):
        return self.even(x) + self.point(x)


def test_asymmetric_same_padding_branch_is_refused_not_a_crash():
    _assert_exact(_randomised(AsymmetricSameBranches()), torch.randn(1, 3, 6, 7))


class MixedAxisChains(nn.Module):
    """One branch scales the channels, the other the rows: the chains do not compose."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("by_channel", torch.tensor([1.5, -0.5, 2.0, 0.7]).view(1, 4, 1, 1))
        self.register_buffer("by_row", torch.linspace(-1, 1, 5).view(1, 1, 5, 1))

    def forward(self, x):
        y = self.conv(x)
        return (y * self.by_channel) * self.by_row - y


def test_affine_chains_on_different_axes_are_not_composed():
    _assert_exact(_randomised(MixedAxisChains()), torch.randn(1, 3, 5, 6))


class PreHookedBatchNormThenNegation(nn.Module):
    """A BN whose pre-hook scales its input, then ``0 − x``: composing the two affines would
    drop the BN module, and its hook with it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 3, padding=1)
        self.bn = nn.BatchNorm1d(2)
        self.bn.register_forward_pre_hook(lambda m, args: (args[0] * 1.5,))

    def forward(self, x):
        return 0 - self.bn(torch.tanh(self.conv(x)))


def test_an_affine_is_not_composed_with_a_hooked_batch_norm():
    _assert_exact(_randomised(PreHookedBatchNormThenNegation()), torch.randn(2, 2, 7))


class TinyScaleAfterConv(nn.Module):
    """A LayerScale as initialised for training (1e-5) after a float16 conv of weights near
    1e-2: folded, the weights would hold entries near 1e-7, subnormal in float16."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.scale = nn.Parameter(torch.full((8, 1, 1), 1e-5))
        generator = torch.Generator().manual_seed(0)  # (not the global one: tests share it)
        with torch.no_grad():
            self.conv.weight.uniform_(-0.02, 0.02, generator=generator)
            self.conv.bias.uniform_(-0.5, 0.5, generator=generator)

    def forward(self, x):
        return x + self.scale * self.conv(x)


def test_a_fold_that_would_lose_float16_precision_is_refused_as_such_not_as_a_bug():
    model = TinyScaleAfterConv().half().eval()
    x = _fresh(2, 8, 5, 5, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", repfx.RewriteRejectedWarning)  # (a "bug" warns)
        folded = repfx.fold(model, (x,))
    reasons = [s.reason for s in folded.meta[repfx.REPORT_KEY].skipped]
    assert any("below the smallest normal number of torch.float16" in r for r in reasons)
    assert not any("repfx bug" in r for r in reasons)
    with torch.no_grad():  # (the conv may still merge with the identity branch, proven)
        assert_close(folded(x), model(x))
