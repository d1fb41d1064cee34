"""Fold arithmetic (``repfx.algebra``) checked against eager torch modules.

Every fold is verified by building the eager chain (conv → BN, BN → conv, norm → affine, ...)
from real ``torch.nn`` modules with O(1) random parameters, loading the folded tensors into a
fresh module and comparing outputs on random inputs: float64 within 1e-10 of the output scale,
float32 within ``repfx.proof.tolerances``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from repfx.algebra import (
    COMPUTE_DTYPE,
    ChannelAffine,
    batch_norm_affine,
    fold_affine_into_conv_input,
    fold_affine_into_conv_output,
    fold_affine_into_conv_transpose_output,
    fold_affine_into_norm,
)
from repfx.proof.tolerances import max_errors
from repfx.testing import assert_close

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
FLOAT_DTYPES = st.sampled_from([torch.float64, torch.float32])
SEEDS = st.integers(0, 2**31 - 1)

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


# --------------------------------------------------------------------------- helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _o1_nonzero(gen: torch.Generator, n: int) -> torch.Tensor:
    """O(1) values in ±[0.3, 2], random sign (never near zero)."""
    mag = 0.3 + 1.7 * torch.rand(n, generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    return mag * sign


def _random_bn(dims: int, channels: int, affine: bool, gen: torch.Generator) -> nn.Module:
    """An eval-mode batch norm with O(1) running stats (never near the identity)."""
    bn = BN[dims](channels, affine=affine, eps=1e-3, dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.copy_(1.0 + _randn(gen, channels))
        bn.running_var.copy_(0.25 + 2.0 * torch.rand(channels, generator=gen, dtype=torch.float64))
        if affine:
            bn.weight.copy_(_o1_nonzero(gen, channels))
            bn.bias.copy_(_randn(gen, channels))
    return bn.eval()


def _bn_affine(bn: nn.Module) -> ChannelAffine:
    return batch_norm_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def _randomize(module: nn.Module, gen: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(_randn(gen, *p.shape))
    return module


def _apply(affine: ChannelAffine, x: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """``scale ⊙ x + shift`` along ``axis`` (the meaning of a ``ChannelAffine``)."""
    shape = [1] * x.dim()
    shape[axis] = -1
    s = affine.scale.reshape(shape).to(x.dtype)
    t = affine.shift.reshape(shape).to(x.dtype)
    return x * s + t


def _load(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is None:
            assert getattr(module, "bias", None) is None
        else:
            module.bias.copy_(bias)
    return module


def _check(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Tolerance of the dtype; in float64 additionally an explicit 1e-10 relative bound."""
    assert actual.dtype == expected.dtype
    assert_close(actual, expected)
    if expected.dtype == torch.float64:
        assert max_errors(actual, expected)[1] <= 1e-10


def _valid_size(kernel: int, dilation: int, extra: int, minimum: int = 1) -> int:
    return max(dilation * (kernel - 1) + 1, minimum) + extra


@st.composite
def conv_configs(draw: st.DrawFn, input_side: bool = False) -> dict:
    dims = draw(st.sampled_from([1, 2, 3]))
    depthwise = draw(st.booleans())
    groups = draw(st.integers(1, 4) if depthwise else st.integers(1, 3))
    in_per = 1 if depthwise else draw(st.integers(1, 3))
    out_per = draw(st.integers(1, 2) if depthwise else st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    if input_side and padding_mode == "zeros":
        padding = 0  # a shift before a zero-padded conv is not exact (see the test below)
    elif padding_mode == "zeros":
        padding = draw(st.integers(0, 2))
    else:
        padding = draw(st.integers(1, 2))
    size_cap = 3 if dims == 3 else 5
    size = tuple(
        _valid_size(k, d, draw(st.integers(0, size_cap)), minimum=3)
        for k, d in zip(kernel, dilation, strict=True)
    )
    return {
        "dims": dims,
        "in_channels": groups * in_per,
        "out_channels": groups * out_per,
        "groups": groups,
        "kernel_size": kernel,
        "stride": stride,
        "dilation": dilation,
        "padding": padding,
        "padding_mode": padding_mode,
        "size": size,
        "bias": draw(st.booleans()),
        "batch": draw(st.integers(1, 2)),
    }


def _make_conv(cfg: dict, gen: torch.Generator, bias: bool | None = None) -> nn.Module:
    conv = CONV[cfg["dims"]](
        cfg["in_channels"],
        cfg["out_channels"],
        cfg["kernel_size"],
        stride=cfg["stride"],
        padding=cfg["padding"],
        dilation=cfg["dilation"],
        groups=cfg["groups"],
        bias=cfg["bias"] if bias is None else bias,
        padding_mode=cfg["padding_mode"],
        dtype=torch.float64,
    )
    return _randomize(conv, gen)


def _conv_input(cfg: dict, gen: torch.Generator) -> torch.Tensor:
    return _randn(gen, cfg["batch"], cfg["in_channels"], *cfg["size"])


# --------------------------------------------------------------------------- ChannelAffine


def test_identity_is_identity() -> None:
    a = ChannelAffine.identity(5)
    assert a.channels == 5
    assert a.scale.dtype == a.shift.dtype == COMPUTE_DTYPE
    assert a.is_identity()
    assert not a.has_shift()
    x = _randn(_gen(0), 2, 5, 3)
    assert torch.equal(_apply(a, x), x)


def test_is_identity_and_has_shift_detect_any_single_change() -> None:
    for i in range(4):
        scaled = ChannelAffine.identity(4)
        scaled.scale[i] = 0.5
        assert not scaled.is_identity()
        assert not scaled.has_shift()
        shifted = ChannelAffine.identity(4)
        shifted.shift[i] = -0.25
        assert not shifted.is_identity()
        assert shifted.has_shift()


def test_of_defaults_broadcasts_and_copies() -> None:
    gen = _gen(1)
    ident = ChannelAffine.of(None, None, 3)
    assert ident.is_identity()
    assert ident.channels == 3

    scale32 = _randn(gen, 3).float()
    a = ChannelAffine.of(scale32, None, 3)
    assert a.scale.dtype == a.shift.dtype == COMPUTE_DTYPE
    assert torch.equal(a.scale, scale32.double())
    assert torch.equal(a.shift, torch.zeros(3, dtype=torch.float64))

    b = ChannelAffine.of(torch.tensor(2.5), torch.tensor([-1.5]), 4)
    assert torch.equal(b.scale, torch.full((4,), 2.5, dtype=torch.float64))
    assert torch.equal(b.shift, torch.full((4,), -1.5, dtype=torch.float64))
    assert b.has_shift()

    # a (C, 1, 1) layer-scale style vector is flattened
    c_scale = _randn(gen, 3, 1, 1)
    c_shift = _randn(gen, 3, 1, 1)
    c = ChannelAffine.of(c_scale, c_shift, 3)
    assert torch.equal(c.scale, c_scale.reshape(3))
    assert torch.equal(c.shift, c_shift.reshape(3))
    # ... and copied: later in-place updates of the source do not leak into the affine
    c_scale.add_(1.0)
    c_shift.mul_(3.0)
    assert not torch.equal(c.scale, c_scale.reshape(3))
    assert not torch.equal(c.shift, c_shift.reshape(3))
    assert c.scale.data_ptr() != c_scale.data_ptr()


@SETTINGS
@given(
    dims=st.sampled_from([0, 1, 2, 3]),
    channels=st.integers(1, 6),
    affine=st.booleans(),
    dtype=FLOAT_DTYPES,
    seed=SEEDS,
)
def test_batch_norm_affine_matches_eval_batch_norm(
    dims: int, channels: int, affine: bool, dtype: torch.dtype, seed: int
) -> None:
    gen = _gen(seed)
    bn = _random_bn(dims, channels, affine, gen).to(dtype)
    a = _bn_affine(bn)
    assert a.scale.dtype == a.shift.dtype == COMPUTE_DTYPE
    assert a.channels == channels
    assert not a.is_identity()
    assert a.has_shift()
    x = _randn(gen, 3, channels, *([4] * dims)).to(dtype)
    _check(_apply(a, x), bn(x))


def test_batch_norm_affine_uses_eps() -> None:
    gen = _gen(2)
    for eps in (1e-5, 0.5):
        bn = _random_bn(2, 3, True, gen)
        bn.eps = eps
        x = _randn(gen, 2, 3, 3, 3)
        _check(_apply(_bn_affine(bn), x), bn(x))


@SETTINGS
@given(dims=st.sampled_from([0, 2]), channels=st.integers(1, 5), seed=SEEDS)
def test_then_is_composition(dims: int, channels: int, seed: int) -> None:
    gen = _gen(seed)
    bn1 = _random_bn(dims, channels, True, gen)
    bn2 = _random_bn(dims, channels, seed % 2 == 0, gen)
    x = _randn(gen, 2, channels, *([3] * dims))
    composed = _bn_affine(bn1).then(_bn_affine(bn2))
    _check(_apply(composed, x), bn2(bn1(x)))
    # order matters: the reverse composition is a different function
    reverse = _bn_affine(bn2).then(_bn_affine(bn1))
    assert max_errors(_apply(reverse, x), bn2(bn1(x)))[1] > 1e-6
    # the identity is neutral on both sides
    ident = ChannelAffine.identity(channels)
    for a in (ident.then(composed), composed.then(ident)):
        assert torch.equal(a.scale, composed.scale)
        assert torch.equal(a.shift, composed.shift)


@SETTINGS
@given(
    channels=st.integers(1, 5),
    sign=st.sampled_from([1.0, -1.0, 0.5, -2.0]),
    seed=SEEDS,
)
def test_plus_is_sum_of_outputs(channels: int, sign: float, seed: int) -> None:
    gen = _gen(seed)
    bn1 = _random_bn(2, channels, True, gen)
    bn2 = _random_bn(2, channels, True, gen)
    x = _randn(gen, 2, channels, 3, 4)
    combined = _bn_affine(bn1).plus(_bn_affine(bn2), sign)
    _check(_apply(combined, x), bn1(x) + sign * bn2(x))
    if sign == 1.0:
        default = _bn_affine(bn1).plus(_bn_affine(bn2))
        assert torch.equal(default.scale, combined.scale)
        assert torch.equal(default.shift, combined.shift)
    # a residual branch: x + bn(x) with the identity as the skip path
    residual = ChannelAffine.identity(channels).plus(_bn_affine(bn2), sign)
    _check(_apply(residual, x), x + sign * bn2(x))


def test_then_and_plus_do_not_modify_operands() -> None:
    gen = _gen(3)
    a1 = ChannelAffine(_randn(gen, 4), _randn(gen, 4))
    a2 = ChannelAffine(_randn(gen, 4), _randn(gen, 4))
    before = [t.clone() for t in (a1.scale, a1.shift, a2.scale, a2.shift)]
    a1.then(a2)
    a1.plus(a2, -1.0)
    for t, b in zip((a1.scale, a1.shift, a2.scale, a2.shift), before, strict=True):
        assert torch.equal(t, b)


# --------------------------------------------------------------------------- output side


@SETTINGS
@given(cfg=conv_configs(), bn_affine=st.booleans(), dtype=FLOAT_DTYPES, seed=SEEDS)
def test_conv_then_batch_norm_folds_into_conv(
    cfg: dict, bn_affine: bool, dtype: torch.dtype, seed: int
) -> None:
    gen = _gen(seed)
    conv = _make_conv(cfg, gen).to(dtype)
    bn = _random_bn(cfg["dims"], cfg["out_channels"], bn_affine, gen).to(dtype)
    x = _conv_input(cfg, gen).to(dtype)
    expected = bn(conv(x))

    w, b = fold_affine_into_conv_output(conv.weight, conv.bias, _bn_affine(bn))
    assert w.shape == conv.weight.shape
    assert b.shape == (cfg["out_channels"],)
    assert w.dtype == b.dtype == dtype
    fused = _load(_make_conv(cfg, gen, bias=True).to(dtype), w, b)
    _check(fused(x), expected)


@SETTINGS
@given(
    in_f=st.integers(1, 6),
    out_f=st.integers(1, 6),
    bias=st.booleans(),
    dtype=FLOAT_DTYPES,
    seed=SEEDS,
)
def test_linear_then_batch_norm_folds_into_linear(
    in_f: int, out_f: int, bias: bool, dtype: torch.dtype, seed: int
) -> None:
    gen = _gen(seed)
    lin = _randomize(nn.Linear(in_f, out_f, bias=bias, dtype=torch.float64), gen).to(dtype)
    bn = _random_bn(0, out_f, True, gen).to(dtype)
    x = _randn(gen, 5, in_f).to(dtype)
    w, b = fold_affine_into_conv_output(lin.weight, lin.bias, _bn_affine(bn))
    assert w.dtype == b.dtype == dtype
    fused = _load(nn.Linear(in_f, out_f, dtype=dtype), w, b)
    _check(fused(x), bn(lin(x)))


@SETTINGS
@given(
    dims=st.sampled_from([1, 2, 3]),
    groups=st.integers(1, 3),
    in_per=st.integers(1, 3),
    out_per=st.integers(1, 3),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 1),
    bias=st.booleans(),
    dtype=FLOAT_DTYPES,
    seed=SEEDS,
)
def test_conv_transpose_then_batch_norm_folds_into_conv_transpose(
    dims: int,
    groups: int,
    in_per: int,
    out_per: int,
    kernel: int,
    stride: int,
    dilation: int,
    padding: int,
    bias: bool,
    dtype: torch.dtype,
    seed: int,
) -> None:
    gen = _gen(seed)
    in_ch, out_ch = groups * in_per, groups * out_per
    output_padding = seed % max(stride, dilation)

    def make(with_bias: bool) -> nn.Module:
        return CONV_T[dims](
            in_ch,
            out_ch,
            kernel,
            stride=stride,
            padding=padding,
            output_padding=output_padding,
            groups=groups,
            bias=with_bias,
            dilation=dilation,
            dtype=torch.float64,
        )

    deconv = _randomize(make(bias), gen).to(dtype)
    assert deconv.weight.shape[:2] == (in_ch, out_per)
    bn = _random_bn(dims, out_ch, True, gen).to(dtype)
    x = _randn(gen, 2, in_ch, *([3] * dims)).to(dtype)
    expected = bn(deconv(x))

    w, b = fold_affine_into_conv_transpose_output(
        deconv.weight, deconv.bias, _bn_affine(bn), groups
    )
    assert w.shape == deconv.weight.shape
    assert w.dtype == b.dtype == dtype
    fused = _load(make(True).to(dtype), w, b)
    _check(fused(x), expected)


def test_conv_transpose_fold_needs_the_group_layout() -> None:
    """With groups > 1, scaling the weight as if it were ``(out, in, k)`` is wrong."""
    gen = _gen(4)
    deconv = _randomize(nn.ConvTranspose2d(4, 6, 3, groups=2, dtype=torch.float64), gen)
    bn = _random_bn(2, 6, True, gen)
    x = _randn(gen, 1, 4, 3, 3)
    w, b = fold_affine_into_conv_transpose_output(deconv.weight, deconv.bias, _bn_affine(bn), 2)
    good = _load(nn.ConvTranspose2d(4, 6, 3, groups=2, dtype=torch.float64), w, b)
    _check(good(x), bn(deconv(x)))
    # groups=1 reading of the same weight would need 6 output channels of weight rows
    with pytest.raises(RuntimeError):
        fold_affine_into_conv_transpose_output(deconv.weight, deconv.bias, _bn_affine(bn), 1)


# --------------------------------------------------------------------------- input side


@SETTINGS
@given(cfg=conv_configs(input_side=True), bn_affine=st.booleans(), dtype=FLOAT_DTYPES, seed=SEEDS)
def test_batch_norm_then_conv_folds_into_conv(
    cfg: dict, bn_affine: bool, dtype: torch.dtype, seed: int
) -> None:
    gen = _gen(seed)
    conv = _make_conv(cfg, gen).to(dtype)
    bn = _random_bn(cfg["dims"], cfg["in_channels"], bn_affine, gen).to(dtype)
    x = _conv_input(cfg, gen).to(dtype)
    expected = conv(bn(x))

    w, b = fold_affine_into_conv_input(conv.weight, conv.bias, _bn_affine(bn), cfg["groups"])
    assert w.shape == conv.weight.shape
    assert b is not None and b.shape == (cfg["out_channels"],)
    assert w.dtype == b.dtype == dtype
    fused = _load(_make_conv(cfg, gen, bias=True).to(dtype), w, b)
    _check(fused(x), expected)


@SETTINGS
@given(cfg=conv_configs(input_side=True), dtype=FLOAT_DTYPES, seed=SEEDS)
def test_scale_only_affine_then_conv_keeps_bias_absent(
    cfg: dict, dtype: torch.dtype, seed: int
) -> None:
    """No shift and no bias: the folded conv has no bias either (and zero padding is fine)."""
    gen = _gen(seed)
    cfg = {**cfg, "bias": False, "padding_mode": "zeros", "padding": seed % 3}
    conv = _make_conv(cfg, gen).to(dtype)
    affine = ChannelAffine.of(_o1_nonzero(gen, cfg["in_channels"]), None, cfg["in_channels"])
    assert not affine.has_shift()
    x = _conv_input(cfg, gen).to(dtype)
    expected = conv(_apply(affine, x))

    w, b = fold_affine_into_conv_input(conv.weight, None, affine, cfg["groups"])
    assert b is None
    assert w.dtype == dtype
    fused = _load(_make_conv(cfg, gen, bias=False).to(dtype), w, None)
    _check(fused(x), expected)


def test_scale_only_affine_keeps_existing_bias() -> None:
    gen = _gen(5)
    conv = _randomize(nn.Conv2d(3, 4, 3, dtype=torch.float64), gen)
    affine = ChannelAffine.of(_o1_nonzero(gen, 3), None, 3)
    w, b = fold_affine_into_conv_input(conv.weight, conv.bias, affine)
    assert b is not None
    assert torch.equal(b, conv.bias.detach())
    x = _randn(gen, 1, 3, 5, 5)
    _check(_load(nn.Conv2d(3, 4, 3, dtype=torch.float64), w, b)(x), conv(_apply(affine, x)))


@SETTINGS
@given(
    in_f=st.integers(1, 6),
    out_f=st.integers(1, 6),
    bias=st.booleans(),
    dtype=FLOAT_DTYPES,
    seed=SEEDS,
)
def test_batch_norm_then_linear_folds_into_linear(
    in_f: int, out_f: int, bias: bool, dtype: torch.dtype, seed: int
) -> None:
    gen = _gen(seed)
    lin = _randomize(nn.Linear(in_f, out_f, bias=bias, dtype=torch.float64), gen).to(dtype)
    bn = _random_bn(0, in_f, True, gen).to(dtype)
    x = _randn(gen, 5, in_f).to(dtype)
    w, b = fold_affine_into_conv_input(lin.weight, lin.bias, _bn_affine(bn))
    assert b is not None
    assert w.dtype == b.dtype == dtype
    fused = _load(nn.Linear(in_f, out_f, dtype=dtype), w, b)
    _check(fused(x), lin(bn(x)))


def test_input_side_shift_with_zero_padding_is_not_exact() -> None:
    """Why the exactness guard exists: zero padding of ``a(x)`` is not ``a`` of zero padding.

    The folded conv is still right away from the border (where no padding is read) but wrong on
    the border, by exactly the weight taps that read padding times the shift.
    """
    gen = _gen(6)
    conv = _randomize(nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64), gen)
    bn = _random_bn(2, 3, True, gen)
    affine = _bn_affine(bn)
    assert affine.has_shift()
    x = _randn(gen, 2, 3, 6, 6)
    expected = conv(bn(x))
    w, b = fold_affine_into_conv_input(conv.weight, conv.bias, affine)
    got = _load(nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64), w, b)(x)

    _check(got[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1])
    border_err = max_errors(got, expected)[1]
    assert border_err > 1e-3

    # the border error is the shift seen through the taps that read padding: a zero-padded
    # constant image of value t, through conv's weight without bias, minus the unpadded value
    t = affine.shift.reshape(1, 3, 1, 1).expand(1, 3, 6, 6)
    w_only = nn.functional.conv2d(t, conv.weight, padding=1)
    interior = nn.functional.conv2d(t, conv.weight, padding=1)[..., 2:3, 2:3]
    assert torch.allclose(expected - got, w_only - interior, rtol=0, atol=1e-10)

    # the same conv with a non-zero padding mode is exact everywhere
    for mode in ("reflect", "replicate", "circular"):
        conv_m = _randomize(
            nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode, dtype=torch.float64), _gen(7)
        )
        w, b = fold_affine_into_conv_input(conv_m.weight, conv_m.bias, affine)
        fused = nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode, dtype=torch.float64)
        _check(_load(fused, w, b)(x), conv_m(bn(x)))


# --------------------------------------------------------------------------- norms


@SETTINGS
@given(
    channels=st.integers(1, 6),
    elementwise_affine=st.booleans(),
    with_bias=st.booleans(),
    dtype=FLOAT_DTYPES,
    seed=SEEDS,
)
def test_affine_after_layer_norm_folds_into_layer_norm(
    channels: int, elementwise_affine: bool, with_bias: bool, dtype: torch.dtype, seed: int
) -> None:
    gen = _gen(seed)
    ln = nn.LayerNorm(
        channels, elementwise_affine=elementwise_affine, bias=with_bias, dtype=torch.float64
    )
    ln = _randomize(ln, gen).to(dtype)
    affine = ChannelAffine(_o1_nonzero(gen, channels), _randn(gen, channels))
    x = (3.0 * _randn(gen, 2, 4, channels) + 1.0).to(dtype)
    expected = _apply(affine, ln(x), axis=-1)

    gamma, beta = fold_affine_into_norm(ln.weight, ln.bias, affine, dtype)
    assert gamma.dtype == beta.dtype == dtype
    assert gamma.shape == beta.shape == (channels,)
    fused = _load(nn.LayerNorm(channels, dtype=dtype), gamma, beta)
    _check(fused(x), expected)


@SETTINGS
@given(
    groups=st.integers(1, 3),
    per_group=st.integers(1, 3),
    affine_params=st.booleans(),
    dtype=FLOAT_DTYPES,
    seed=SEEDS,
)
def test_affine_after_group_norm_folds_into_group_norm(
    groups: int, per_group: int, affine_params: bool, dtype: torch.dtype, seed: int
) -> None:
    gen = _gen(seed)
    c = groups * per_group
    gn = _randomize(nn.GroupNorm(groups, c, affine=affine_params, dtype=torch.float64), gen)
    gn = gn.to(dtype)
    affine = ChannelAffine(_o1_nonzero(gen, c), _randn(gen, c))
    x = (2.0 * _randn(gen, 2, c, 3, 4) - 0.5).to(dtype)
    expected = _apply(affine, gn(x))

    gamma, beta = fold_affine_into_norm(gn.weight, gn.bias, affine, dtype)
    assert gamma.dtype == beta.dtype == dtype
    assert gamma.shape == beta.shape == (c,)
    fused = _load(nn.GroupNorm(groups, c, dtype=dtype), gamma, beta)
    _check(fused(x), expected)


def test_scale_after_rms_norm_folds_into_weight() -> None:
    gen = _gen(8)
    rms = _randomize(nn.RMSNorm(5, eps=1e-6, dtype=torch.float64), gen)
    affine = ChannelAffine.of(_o1_nonzero(gen, 5), None, 5)
    x = _randn(gen, 3, 5)
    gamma, beta = fold_affine_into_norm(rms.weight, None, affine, torch.float64)
    assert torch.equal(beta, torch.zeros(5, dtype=torch.float64))
    _check(
        _load(nn.RMSNorm(5, eps=1e-6, dtype=torch.float64), gamma, None)(x),
        _apply(affine, rms(x), -1),
    )


def test_norm_fold_uses_requested_dtype() -> None:
    gen = _gen(9)
    affine = ChannelAffine(_o1_nonzero(gen, 4), _randn(gen, 4))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        g, b = fold_affine_into_norm(None, None, affine, dtype)
        assert g.dtype == b.dtype == dtype
        assert g.shape == b.shape == (4,)
        torch.testing.assert_close(g, affine.scale.to(dtype), rtol=0, atol=0)
        torch.testing.assert_close(b, affine.shift.to(dtype), rtol=0, atol=0)


# --------------------------------------------------------------------------- dtypes, purity


def _fold_calls(dtype: torch.dtype, with_bias: bool) -> list:
    """(name, inputs, results) of every fold on a grouped 2-D weight of ``dtype``."""
    gen = _gen(10)
    affine_out = ChannelAffine(_o1_nonzero(gen, 6), _randn(gen, 6))
    affine_in = ChannelAffine(_o1_nonzero(gen, 4), _randn(gen, 4))
    w = _randn(gen, 6, 2, 3, 3).to(dtype)  # conv (out=6, in/g=2, 3, 3), groups=2 → in=4
    wt = _randn(gen, 4, 3, 3, 3).to(dtype)  # conv transpose (in=4, out/g=3, 3, 3), groups=2
    b = _randn(gen, 6).to(dtype) if with_bias else None
    gamma = _randn(gen, 6).to(dtype) if with_bias else None
    return [
        ("out", (w, b, affine_out), lambda: fold_affine_into_conv_output(w, b, affine_out)),
        (
            "transpose",
            (wt, b, affine_out),
            lambda: fold_affine_into_conv_transpose_output(wt, b, affine_out, 2),
        ),
        ("in", (w, b, affine_in), lambda: fold_affine_into_conv_input(w, b, affine_in, 2)),
        (
            "norm",
            (gamma, b, affine_out),
            lambda: fold_affine_into_norm(gamma, b, affine_out, dtype),
        ),
    ]


def _tensors(inputs: tuple) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for item in inputs:
        if isinstance(item, ChannelAffine):
            out += [item.scale, item.shift]
        elif item is not None:
            out.append(item)
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_results_keep_the_input_dtype(dtype: torch.dtype, with_bias: bool) -> None:
    for name, _inputs, call in _fold_calls(dtype, with_bias):
        results = [r for r in call() if r is not None]
        assert results, name
        for r in results:
            assert r.dtype == dtype, name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_folds_do_not_modify_or_alias_their_inputs(dtype: torch.dtype, with_bias: bool) -> None:
    aliased = []
    for name, inputs, call in _fold_calls(dtype, with_bias):
        tensors = _tensors(inputs)
        before = [t.clone() for t in tensors]
        results = [r for r in call() if r is not None]
        for t, b in zip(tensors, before, strict=True):
            assert torch.equal(t, b), f"{name} modified an input"
        # results are fresh tensors: writing into a folded parameter cannot reach an input
        input_ptrs = {t.untyped_storage().data_ptr() for t in tensors}
        aliased += [
            f"{name}[{i}]"
            for i, r in enumerate(results)
            if r.untyped_storage().data_ptr() in input_ptrs
        ]
    assert not aliased, f"results sharing memory with an input: {aliased}"


def test_low_precision_fold_rounds_once() -> None:
    """Float16 weights are folded in float64 and rounded once: as exact as float16 allows."""
    gen = _gen(11)
    conv = _randomize(nn.Conv2d(4, 6, 3, groups=2, dtype=torch.float64), gen)
    bn = _random_bn(2, 6, True, gen)
    w16, b16 = conv.weight.detach().half(), conv.bias.detach().half()
    affine = _bn_affine(bn)
    w, b = fold_affine_into_conv_output(w16, b16, affine)
    assert w.dtype == b.dtype == torch.float16
    exact_w = w16.double() * affine.scale.reshape(-1, 1, 1, 1)
    exact_b = affine.scale * b16.double() + affine.shift
    assert torch.equal(w, exact_w.half())
    assert torch.equal(b, exact_b.half())
