"""Reference structural-reparameterization blocks (RepVGG, ACNet, DBB, MobileOne): each block's
hand-written ``switch_to_deploy()`` is checked against its own training form, so the blocks can
serve as oracles for repfx's folds."""

from __future__ import annotations

import copy

import pytest
import torch
from grammar import randomise_
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, fx, nn

from repfx import models
from repfx.models import (
    ACBlock,
    ACNet,
    BNAndPad,
    DBBlock,
    DBNet,
    MobileOne,
    MobileOneBlock,
    RepVGG,
    RepVGGBlock,
)
from repfx.proof.tolerances import max_errors
from repfx.testing import assert_close

REP_SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)
TINY = {"repvgg_tiny": RepVGG, "acnet_tiny": ACNet, "dbb_tiny": DBNet, "mobileone_tiny": MobileOne}
BLOCK_TYPES = (RepVGGBlock, ACBlock, DBBlock, MobileOneBlock)


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convs gain nothing from threads, and lose a lot to a busy machine's contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    """Float64, every parameter and BN statistic re-drawn at O(1), eval mode."""
    model = randomise_(model.double(), torch.Generator().manual_seed(seed)).eval()
    for bn in _batch_norms(model):  # never identity statistics
        assert not torch.all(bn.running_var == 1) and not torch.all(bn.running_mean == 0)
    return model


def _input(seed: int, channels: int, h: int, w: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(2, channels, h, w, generator=gen, dtype=torch.float64)


def check_deploy(model: nn.Module, x: Tensor, n_convs: int, *, relu_out: bool = False) -> None:
    """``deepcopy(model).switch_to_deploy()`` matches ``model`` (a float64 eval model) in float64
    within 1e-10 and in float32 within ``assert_close``; it has ``n_convs`` convs and no BN.

    ``relu_out``: the output ends in a ReLU, which may zero all of a thin output; callers then
    check the pre-activation output too."""
    deploy = copy.deepcopy(model)
    assert deploy.switch_to_deploy() is deploy
    assert len(_convs(deploy)) == n_convs
    assert not _batch_norms(deploy)
    expected = model(x)
    assert relu_out or expected.abs().max() > 0.1  # not vacuous
    _, rel = max_errors(deploy(x), expected)
    assert rel <= 1e-10, f"float64 deploy off by {rel:.3g} relative"

    state = {k: v.clone() for k, v in deploy.state_dict().items()}
    assert deploy.switch_to_deploy() is deploy  # idempotent
    assert deploy.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in deploy.state_dict().items())

    model32 = copy.deepcopy(model).float()
    deploy32 = copy.deepcopy(model32).switch_to_deploy()
    assert all(p.dtype == torch.float32 for p in deploy32.parameters())
    x32 = x.float()
    assert_close(deploy32(x32), model32(x32))


# --------------------------------------------------------------------------- block strategies


@st.composite
def channels(draw: st.DrawFn) -> tuple[int, int, int]:
    """``(in_ch, out_ch, groups)``: dense, grouped, same-width (identity branch) or depthwise."""
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if kind == "depthwise":
        c = draw(st.integers(1, 8))
        return c, c, c
    groups = 1 if kind == "dense" else draw(st.integers(2, 3))
    a = draw(st.integers(1, 4))
    b = a if draw(st.booleans()) else draw(st.integers(1, 4))
    return groups * a, groups * b, groups


sizes = st.integers(5, 9)
seeds = st.integers(0, 2**16)


@REP_SETTINGS
@given(channels(), st.sampled_from([1, 2]), sizes, sizes, seeds)
def test_repvgg_block_deploys_exactly(chans, stride, h, w, seed) -> None:
    in_ch, out_ch, groups = chans
    block = _randomised(RepVGGBlock(in_ch, out_ch, stride, groups), seed)
    assert (block.rbr_identity is not None) == (in_ch == out_ch and stride == 1)
    x = _input(seed, in_ch, h, w)
    check_deploy(block, x, n_convs=1, relu_out=True)
    block.nonlinearity = nn.Identity()  # the merged region alone, every value seen
    check_deploy(block, x, n_convs=1)
    assert block.switch_to_deploy().rbr_reparam.kernel_size == (3, 3)


@REP_SETTINGS
@given(channels(), st.sampled_from([1, 3, 5]), st.data(), st.sampled_from([1, 2]), seeds)
def test_ac_block_deploys_exactly(chans, kernel, data, stride, seed) -> None:
    in_ch, out_ch, groups = chans
    padding = data.draw(st.integers(0, kernel // 2 + 1), label="padding")
    h, w = data.draw(st.integers(kernel, kernel + 4)), data.draw(st.integers(kernel, kernel + 4))
    block = _randomised(ACBlock(in_ch, out_ch, kernel, stride, padding, groups), seed)
    assert (block.hor_crop is not None) == (padding < kernel // 2)
    check_deploy(block, _input(seed, in_ch, h, w), n_convs=1)


@REP_SETTINGS
@given(channels(), st.sampled_from([1, 3, 5]), st.sampled_from([1, 2]), sizes, sizes, seeds)
def test_dbb_block_deploys_exactly(chans, kernel, stride, h, w, seed) -> None:
    in_ch, out_ch, groups = chans
    block = _randomised(DBBlock(in_ch, out_ch, kernel, stride, kernel // 2, groups), seed)
    assert (block.dbb_1x1 is None) == (groups == in_ch == out_ch)
    check_deploy(block, _input(seed, in_ch, h, w), n_convs=1)


@REP_SETTINGS
@given(
    channels(),
    st.sampled_from([1, 3, 5]),
    st.sampled_from([1, 2]),
    st.integers(1, 3),
    sizes,
    sizes,
    seeds,
)
def test_mobileone_block_deploys_exactly(chans, kernel, stride, branches, h, w, seed) -> None:
    in_ch, out_ch, groups = chans
    block = MobileOneBlock(
        in_ch, out_ch, kernel, stride, kernel // 2, groups, num_conv_branches=branches
    )
    block = _randomised(block, seed)
    assert len(block.rbr_conv) == branches
    assert (block.rbr_scale is None) == (kernel == 1)
    assert (block.rbr_skip is None) == (in_ch != out_ch or stride != 1)
    x = _input(seed, in_ch, h, w)
    check_deploy(block, x, n_convs=1, relu_out=True)
    block.activation = nn.Identity()  # the merged region alone, every value seen
    check_deploy(block, x, n_convs=1)


def test_deploy_keeps_dtype_and_conv_geometry() -> None:
    block = ACBlock(4, 6, kernel=5, stride=2, padding=1, groups=2).eval()
    conv = block.switch_to_deploy().fused_conv
    assert isinstance(conv, nn.Conv2d) and conv.weight.dtype == torch.float32
    assert (conv.kernel_size, conv.stride, conv.padding, conv.groups) == ((5, 5), (2, 2), (1, 1), 2)
    assert conv.bias is not None
    assert block.square_conv is None and block.hor_bn is None and block.ver_crop is None


def test_blocks_reject_unalignable_geometry() -> None:
    with pytest.raises(ValueError, match="padding"):
        DBBlock(4, 4, kernel=3, padding=0)
    with pytest.raises(ValueError, match="padding"):
        MobileOneBlock(4, 4, kernel=3, padding=2)
    with pytest.raises(ValueError, match="odd"):
        ACBlock(4, 4, kernel=2, padding=1)
    with pytest.raises(ValueError, match="groups"):
        RepVGGBlock(4, 6, groups=4)


# --------------------------------------------------------------------------- DBB padding trap


def test_bn_and_pad_border_is_the_bn_of_zero() -> None:
    layer = _randomised(BNAndPad(3, pad=2), seed=5)
    x = _input(5, 3, 4, 6)
    out = layer(x)
    assert out.shape == (2, 3, 8, 10)
    of_zero = layer.bn(torch.zeros(1, 3, 1, 1, dtype=torch.float64))
    border = torch.ones(8, 10, dtype=torch.bool)
    border[2:-2, 2:-2] = False
    torch.testing.assert_close(out[:, :, border], of_zero.reshape(1, 3, 1).expand(2, 3, 56))
    torch.testing.assert_close(out[:, :, 2:-2, 2:-2], layer.bn(x), rtol=0, atol=0)


def test_dbb_conversion_needs_bn_and_pad() -> None:
    """Negative control: zero-padding after the biased BN (the naive layout) breaks the fold."""
    block = _randomised(DBBlock(4, 6, kernel=3), seed=9)
    x = _input(9, 4, 6, 6)
    deploy = copy.deepcopy(block).switch_to_deploy()
    assert max_errors(deploy(x), block(x))[1] < 1e-12
    for layer in block.modules():
        if isinstance(layer, BNAndPad):
            layer.forward = lambda t, layer=layer: nn.functional.pad(layer.bn(t), [layer.pad] * 4)
    assert max_errors(deploy(x), block(x))[1] > 1e-3


# --------------------------------------------------------------------------- tiny nets


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_net_deploys_exactly(name: str) -> None:
    model = models.create(name, num_classes=10)
    assert isinstance(model, TINY[name])
    model = _randomised(model, seed=len(name))
    blocks = [m for m in model.modules() if isinstance(m, BLOCK_TYPES)]
    assert blocks and len(blocks) == len(model.blocks())
    check_deploy(model, _input(3, 3, 32, 32), n_convs=len(blocks))


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_net_traces_and_trains(name: str) -> None:
    model = _randomised(models.create(name, num_classes=7), seed=1)
    x = _input(2, 3, 24, 24)
    traced = fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    deploy = copy.deepcopy(model).switch_to_deploy()
    torch.testing.assert_close(fx.symbolic_trace(deploy)(x), deploy(x), rtol=0, atol=0)
    model.train()
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_registry_has_the_reparameterization_models() -> None:
    expected = {"repvgg_a0", "repvgg_tiny", "acnet_tiny", "dbb_tiny", "mobileone_tiny"}
    assert expected <= set(models.names())


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_repvgg_a0_matches_published_parameter_counts() -> None:
    """RepVGG-A0 (Ding et al. 2021, Table 2): 9.11M parameters in training, 8.30M deployed."""
    a0 = models.create("repvgg_a0")
    assert isinstance(a0, RepVGG)
    assert [len(s) for s in (a0.stage1, a0.stage2, a0.stage3, a0.stage4)] == [2, 4, 14, 1]
    assert a0.stage0.out_ch == 48 and a0.linear.in_features == 1280
    assert _n_params(a0) == pytest.approx(9.11e6, rel=0.02)
    a0.switch_to_deploy()
    assert _n_params(a0) == pytest.approx(8.30e6, rel=0.02)
    assert len(_convs(a0)) == 22 and not _batch_norms(a0)
