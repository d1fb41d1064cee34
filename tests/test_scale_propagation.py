"""Per-channel scales whose neighbour is not a conv, linear or norm: moved back through the ops
that commute with them (sums, pools, token-mixing linears, relu for s ≥ 0), forward through
means and pools into a consumer, or undone by a conv reading the scaled value. Each test checks
the fold is exact on a fresh input and that no per-channel multiply is left — or, where the
algebra forbids it, that it stays with a reason a user can read."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from grammar import randomise_
from helpers import fold_matches, fresh_input, stored_multiplies
from torch import nn

import repfx
from repfx.proof.tolerances import ROUNDING_SLACK


def _random(model: nn.Module, seed: int = 3) -> nn.Module:
    return randomise_(model, torch.Generator().manual_seed(seed)).eval()


def _reasons(folded: torch.fx.GraphModule) -> str:
    return "\n".join(s.reason for s in folded.meta["repfx_report"].skipped)


class PoolMixer(nn.Module):
    """PoolFormer's token mixer: ``x + ls ⊙ (pool(n) − n)``, ``n = GroupNorm(x)``."""

    def __init__(self, channels: int = 4, count_include_pad: bool = False):
        super().__init__()
        self.norm = nn.GroupNorm(1, channels)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=count_include_pad)
        self.ls = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x):
        n = self.norm(x)
        return x + self.ls * (self.pool(n) - n)


@pytest.mark.parametrize("count_include_pad", [False, True])
def test_pool_mixer_scale_goes_into_the_norm(count_include_pad):
    model = _random(PoolMixer(count_include_pad=count_include_pad))
    folded = fold_matches(model, fresh_input(2, 4, 5, 5), fresh_input(3, 4, 7, 6, seed=2))
    assert stored_multiplies(folded, fresh_input(1, 4, 5, 5)) == []
    assert any("into group_norm" in f.detail for f in folded.meta["repfx_report"].folded)


class TokenMixer(nn.Module):
    """ResMLP / MLP-Mixer style: a linear over the positions, channels on another axis."""

    def __init__(self, channels: int = 4, positions: int = 16, bias: bool = False):
        super().__init__()
        self.norm = nn.GroupNorm(1, channels)
        self.tokens = nn.Linear(positions, positions, bias=bias)
        self.ls = nn.Parameter(torch.ones(channels, 1))

    def forward(self, x):
        b, c, h, w = x.shape
        return x + (self.ls * self.tokens(self.norm(x).flatten(2))).reshape(b, c, h, w)


def test_scale_moves_back_through_a_bias_free_token_mixing_linear():
    model = _random(TokenMixer())
    folded = fold_matches(model, fresh_input(2, 4, 4, 4), fresh_input(3, 4, 4, 4, seed=2))
    assert stored_multiplies(folded, fresh_input(1, 4, 4, 4)) == []


def test_a_token_mixing_linear_with_a_bias_keeps_the_scale_and_says_why():
    """``s ⊙ (x Wᵀ + b)``: the bias would need scaling per channel *and* per position."""
    model = _random(TokenMixer(bias=True))
    folded = fold_matches(model, fresh_input(2, 4, 4, 4), fresh_input(3, 4, 4, 4, seed=2))
    assert stored_multiplies(folded, fresh_input(1, 4, 4, 4)) == ["ls"]
    assert "adds a bias" in _reasons(folded)


class ScaledShortcut(nn.Module):
    """``s ⊙ a + tanh(conv(a))`` (``shortcut=True``; the tanh keeps merge_branches from
    merging the two branches into one conv) or ``s ⊙ (a + conv(a))``; ``a = conv(relu(x))``."""

    def __init__(self, channels: int = 4, shortcut: bool = True):
        super().__init__()
        self.first = nn.Conv2d(channels, channels, 3, padding=1)
        self.branch = nn.Conv2d(channels, channels, 3, padding=1)
        self.s = nn.Parameter(torch.ones(channels, 1, 1))
        self.shortcut = shortcut

    def forward(self, x):
        a = self.first(torch.relu(x))
        if self.shortcut:
            out = self.s * a + torch.tanh(self.branch(a))
        else:
            out = self.s * (a + self.branch(a))
        return torch.relu(out)


@pytest.mark.parametrize("shortcut", [True, False], ids=["on_shortcut", "on_sum"])
def test_a_conv_reading_the_scaled_value_undoes_the_scale(shortcut):
    model = _random(ScaledShortcut(shortcut=shortcut))
    folded = fold_matches(model, fresh_input(2, 4, 5, 5), fresh_input(1, 4, 6, 7, seed=2))
    assert stored_multiplies(folded, fresh_input(1, 4, 5, 5)) == []
    details = [f.detail for f in folded.meta["repfx_report"].folded]
    assert any("undone in the input of conv" in d for d in details)


def test_a_scale_with_a_zero_cannot_be_undone():
    model = _random(ScaledShortcut())
    with torch.no_grad():
        model.s[1] = 0.0
    folded = fold_matches(model, fresh_input(2, 4, 5, 5), fresh_input(1, 4, 6, 7, seed=2))
    assert stored_multiplies(folded, fresh_input(1, 4, 5, 5)) == ["s"]


class ResidualScale(nn.Module):
    """timm MetaFormer's ``res_scale``: ``s ⊙ x + f(norm(x))`` — the norm reads ``x`` unscaled."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 1)
        self.norm = nn.GroupNorm(1, channels)
        self.fc = nn.Conv2d(channels, channels, 1)
        self.s = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x):
        x = self.stem(x)
        return self.s * x + self.fc(self.norm(x))


def test_a_residual_scale_beside_a_norm_stays_with_the_reason():
    model = _random(ResidualScale())
    folded = fold_matches(model, fresh_input(2, 3, 4, 4), fresh_input(1, 3, 5, 5, seed=2))
    assert stored_multiplies(folded, fresh_input(1, 3, 4, 4)) == ["s"]
    assert "is also read by GroupNorm, which needs it unscaled" in _reasons(folded)


class ReluMaxPool(nn.Module):
    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.s = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x):
        return torch.sigmoid(self.s * F.max_pool2d(torch.relu(self.conv(x)), 2))


def test_a_non_negative_scale_moves_back_through_relu_and_max_pool():
    model = _random(ReluMaxPool())
    with torch.no_grad():
        model.s.abs_()
    folded = fold_matches(model, fresh_input(2, 4, 6, 6), fresh_input(1, 4, 8, 6, seed=2))
    assert stored_multiplies(folded, fresh_input(1, 4, 6, 6)) == []


def test_a_negative_scale_does_not_cross_relu():
    model = _random(ReluMaxPool())
    with torch.no_grad():
        model.s.abs_()
        model.s[0] = -0.7
    folded = fold_matches(model, fresh_input(2, 4, 6, 6), fresh_input(1, 4, 8, 6, seed=2))
    assert stored_multiplies(folded, fresh_input(1, 4, 6, 6)) == ["s"]
    assert "commutes only with a non-negative scale" in _reasons(folded)


class AffineMeanHead(nn.Module):
    """ResMLP's head: ``Affine`` norm, mean over the tokens, linear."""

    def __init__(self, channels: int = 4, pool: str = "mean"):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.head = nn.Linear(channels, 3)
        self.pool = pool

    def forward(self, x):
        if self.pool == "mean":
            y = torch.addcmul(self.beta, self.alpha, x.flatten(2).transpose(1, 2)).mean(dim=1)
        else:  # a zero-padded average pool does not keep a shift
            y = F.avg_pool2d(self.alpha[:, None, None] * x + self.beta[:, None, None], 3, 1, 1)
            y = y.flatten(2).transpose(1, 2)
        return self.head(y)


def test_an_affine_moves_forward_through_a_mean_into_the_linear_after_it():
    model = _random(AffineMeanHead())
    folded = fold_matches(model, fresh_input(2, 4, 3, 3), fresh_input(1, 4, 5, 2, seed=2))
    assert stored_multiplies(folded, fresh_input(1, 4, 3, 3)) == []
    assert "(through mean)" in folded.meta["repfx_report"].folded[0].detail


def test_a_shift_does_not_cross_a_pool_that_averages_zero_padding_in():
    model = _random(AffineMeanHead(pool="avg_pool"))
    folded = fold_matches(model, fresh_input(2, 4, 3, 3), fresh_input(1, 4, 5, 4, seed=2))
    assert len(stored_multiplies(folded, fresh_input(1, 4, 3, 3))) == 1


class ShiftedActivationLinear(nn.Module):
    """StarReLU (``s·relu(x)² + b``) before a bias-free linear, and a BN1d before another."""

    def __init__(self):
        super().__init__()
        self.scale, self.bias = nn.Parameter(torch.ones(1)), nn.Parameter(torch.zeros(1))
        self.fc = nn.Linear(4, 4, bias=False)
        self.bn = nn.BatchNorm1d(4)
        self.fc2 = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        y = self.fc(self.scale * torch.relu(x) ** 2 + self.bias)
        return self.fc2(self.bn(torch.tanh(y)))


def test_a_bias_free_linear_gains_a_bias_only_to_remove_a_batch_norm():
    model = _random(ShiftedActivationLinear())
    folded = fold_matches(model, fresh_input(5, 4), fresh_input(3, 4, seed=2))
    assert isinstance(folded.fc, nn.Linear) and folded.fc.bias is None
    assert "the shift would add one" in _reasons(folded)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in folded.modules())


def test_folded_weights_keep_the_memory_format_of_the_weights_they_replace():
    model = _random(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)))
    model[0].weight.data = model[0].weight.data.contiguous(memory_format=torch.channels_last)
    x = fresh_input(2, 3, 6, 6)
    folded = repfx.fold(model, (x,))
    for name, tensor in folded.state_dict().items():
        if name.startswith("0.") and tensor.dim() == 4:
            assert tensor.is_contiguous(memory_format=torch.channels_last), name
        else:
            assert tensor.is_contiguous(), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("count_include_pad", [False, True])
def test_in_16_bit_floats_the_scale_moves_and_rounding_explains_the_difference(
    dtype, count_include_pad
):
    """``pool(ls·n) − ls·n`` rounds in other places than ``ls·(pool(n) − n)``, not worse:
    against float64 truth the folded model is within ``ROUNDING_SLACK`` × the original's
    own rounding error (measured: within 2.3×, about as far as merging the branches)."""
    model = _random(PoolMixer(channels=8, count_include_pad=count_include_pad), seed=5)
    low = copy.deepcopy(model).to(dtype)
    folded = repfx.fold(low, (fresh_input(2, 8, 9, 7).to(dtype),))
    fresh = fresh_input(3, 8, 9, 7, seed=4)
    assert stored_multiplies(folded, fresh.to(dtype)) == []
    with torch.no_grad():
        truth = model.double()(fresh.double())
        original_error = (low(fresh.to(dtype)).double() - truth).abs().max()
        folded_error = (folded(fresh.to(dtype)).double() - truth).abs().max()
    assert folded_error <= ROUNDING_SLACK * original_error


class TokensBackToMap(nn.Module):
    """A linear over tokens, then back to a feature map by splitting the token axis
    (``(B, C, H·W)`` → ``(B, C, H, W)``, SwiftFormer's spelling) and a per-channel scale."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.proj = nn.Linear(c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.proj(x.permute(0, 2, 3, 1).reshape(b, h * w, c))
        back = tokens.permute(0, 2, 1).reshape(b, -1, h, w)
        return x + self.gamma.view(1, -1, 1, 1) * back


def test_a_scale_moves_through_a_reshape_that_splits_other_axes():
    model = _random(TokensBackToMap())
    folded = fold_matches(model, fresh_input(2, 6, 4, 5), fresh_input(3, 6, 4, 5, seed=2))
    assert stored_multiplies(folded, fresh_input(3, 6, 4, 5, seed=3)) == []


class CropThenScale(nn.Module):
    """A linear over channels-last tokens, a crop of the padded spatial axes, then a
    per-channel scale (hieradet's spelling); and, beside it, a crop that takes only some
    channels, which a per-channel scale must not cross."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.proj = nn.Linear(c, c)
        self.other = nn.Linear(c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.part = nn.Parameter(torch.rand(c // 2) + 0.5)

    def forward(self, x):  # x: (B, H, W, C), cropped to (B, H - 1, W - 2, C)
        cropped = self.proj(x)[:, :-1, 1:-1, :]
        some_channels = self.other(x)[..., : self.part.shape[0]]
        return cropped * self.gamma, some_channels * self.part


def test_a_scale_moves_through_a_crop_that_keeps_every_channel():
    model = _random(CropThenScale())
    folded = fold_matches(model, fresh_input(2, 5, 6, 6), fresh_input(3, 5, 6, 6, seed=2))
    left = stored_multiplies(folded, fresh_input(3, 5, 6, 6, seed=3))
    assert left == ["part"]  # the crop of channels keeps its scale


class DeepThenCrop(nn.Module):
    """hieradet's window un-partition: a crop whose bounds are the block input's spatial size
    (``x.shape[1:3]``), read after a deep stack of ops; the linear the scale moves into reads
    a norm of that input, not the input itself."""

    def __init__(self, c: int = 6, depth: int = 220):
        super().__init__()
        self.depth = depth
        self.norm = nn.LayerNorm(c)
        self.proj = nn.Linear(c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):  # x: (B, H, W, C)
        for _ in range(self.depth):  # 2 · depth ops before the block: more than a proof takes
            x = x + torch.tanh(x)
        h, w = x.shape[1:3]
        padded = F.pad(self.norm(x), (0, 0, 0, 1, 0, 2))
        return x + self.gamma * self.proj(padded)[:, :h, :w, :]


def test_a_crop_bounded_by_a_shape_read_far_upstream_lets_the_scale_through():
    model = _random(DeepThenCrop())
    folded = fold_matches(model, fresh_input(2, 5, 6, 6), fresh_input(3, 4, 7, 6, seed=2))
    assert stored_multiplies(folded, fresh_input(3, 5, 6, 6, seed=3)) == []


def _effective_se(x, fc):  # timm's EffectiveSEModule
    return x * F.hardsigmoid(fc(x.mean((2, 3), keepdim=True)))


def _squeeze_excite(x, fc, reduce):  # the classic SE: pool, reduce, relu, expand, sigmoid
    return torch.mul(torch.sigmoid(fc(torch.relu(reduce(F.adaptive_avg_pool2d(x, 1))))), x)


class GatedThenScaled(nn.Module):
    """``γ ⊙ (a ⊙ gate(a))`` with ``a = conv(x)`` (rdnet's dense block: a conv, an excitation
    gate, a layer scale, then a concat): ``γ`` moves into the conv, and the gate's first
    conv undoes it on its input side, so the gate computes what it did."""

    def __init__(self, spelling: str, c: int = 6):
        super().__init__()
        self.spelling = spelling
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.reduce = nn.Conv2d(c, 3, 1)
        self.fc = nn.Conv2d(c if spelling == "effective_se" else 3, c, 1)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        a = self.conv(x)
        if self.spelling == "effective_se":
            gated = _effective_se(a, self.fc)
        elif self.spelling == "squeeze_excite":
            gated = _squeeze_excite(a, self.fc, self.reduce)
        else:  # "square": a ⊙ a, where both factors would take the scale
            gated = a * a
        return torch.cat([x, gated * self.gamma.view(1, -1, 1, 1)], 1)


@pytest.mark.parametrize("spelling", ["effective_se", "squeeze_excite"])
def test_a_scale_after_a_gate_moves_into_the_conv_and_the_gate_undoes_it(spelling):
    model = _random(GatedThenScaled(spelling))
    folded = fold_matches(model, fresh_input(2, 6, 5, 5), fresh_input(3, 6, 6, 7, seed=2))
    assert stored_multiplies(folded, fresh_input(1, 6, 5, 5)) == []
    details = " ".join(f.detail for f in folded.meta["repfx_report"].folded)
    assert "undone in the input of conv" in details


def test_a_scale_does_not_move_into_both_factors_of_a_product():
    model = _random(GatedThenScaled("square"))
    folded = fold_matches(model, fresh_input(2, 6, 5, 5), fresh_input(3, 6, 6, 7, seed=2))
    assert stored_multiplies(folded, fresh_input(1, 6, 5, 5)) == ["gamma"]
    assert "multiplies two values that take the scale" in _reasons(folded)


def test_a_scale_does_not_cross_a_gate_that_reads_the_value_through_a_nonlinearity():
    """``γ ⊙ (a ⊙ σ(a))`` (SiLU spelled out): σ reads ``a`` unscaled, and nothing undoes it."""

    class SiluThenScale(nn.Module):
        def __init__(self, c: int = 6):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 1)
            self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

        def forward(self, x):
            a = self.conv(x)
            return self.gamma * (a * torch.sigmoid(a))

    model = _random(SiluThenScale())
    folded = fold_matches(model, fresh_input(2, 6, 5, 5), fresh_input(3, 6, 6, 7, seed=2))
    assert stored_multiplies(folded, fresh_input(1, 6, 5, 5)) == ["gamma"]
    assert "needs it unscaled" in _reasons(folded)
