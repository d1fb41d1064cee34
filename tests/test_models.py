"""Tests for the reference models in ``repfx.models`` (registry, sizes, RIFormer deploy folds).

Equivalence tests re-draw every parameter at O(1) scale first: with the published LayerScale
init (1e-5) a wrong fold would change the output by ~1e-5 of its scale and pass unnoticed.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from repfx import models
from repfx.models import Affine, DropPath, PoolFormer, Registry, RIFormer, RIFormerBlock

torch.set_num_threads(1)

SIZES = ("s12", "s24", "s36", "m36", "m48")
# RIFormer paper, Table of configurations: parameters in millions.
PAPER_PARAMS_M = {"s12": 11.92, "s24": 21.39, "s36": 30.86, "m36": 56.17, "m48": 73.47}
FP32_RTOL = 1e-5
FP64_RTOL = 1e-12


# --------------------------------------------------------------------------- helpers


def redraw_parameters_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw every parameter at O(1) scale, in place.

    Per-channel vectors (LayerScale, GroupNorm gamma/beta, biases) ~ 1 + 0.5 N(0, 1); the
    depthwise affine ``s`` ~ N(0, 1) (so ``s - 1`` is O(1)); other weights ~ N(0, 1/fan_in),
    which keeps activations O(1) through the network.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            value = 1.0 + 0.5 * noise if p.ndim == 1 else noise / math.sqrt(p[0].numel())
            p.copy_(value.to(p.dtype))
    return model


def affine_param_count(model: nn.Module) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, Affine) for p in m.parameters())


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_close_rel(actual: Tensor, expected: Tensor, rtol: float) -> None:
    """``max|a - b| <= rtol * max|b|``: a tolerance relative to the output's scale."""
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rtol * scale, f"max abs error {err:.3e} > {rtol:.0e} * scale {scale:.3e}"


def tiny_riformer(seed: int = 0, dtype: torch.dtype = torch.float32) -> RIFormer:
    model = models.create("riformer_tiny", num_classes=10)
    assert isinstance(model, RIFormer)
    return redraw_parameters_(model.to(dtype), seed).eval()


def tiny_input(seed: int = 1, dtype: torch.dtype = torch.float32, size: int = 64) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, size, size, generator=gen, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------- registry


def test_names_lists_every_published_size_and_tiny() -> None:
    expected = {f"{fam}_{size}" for fam in ("poolformer", "riformer") for size in (*SIZES, "tiny")}
    assert set(models.names()) >= expected  # other families register names too
    assert models.names() == sorted(models.names())


def test_create_builds_the_right_class_and_applies_overrides() -> None:
    rif = models.create("riformer_tiny", num_classes=7)
    pool = models.create("poolformer_tiny", layers=(1, 2, 1, 1), dims=(8, 8, 16, 16))
    assert isinstance(rif, RIFormer) and rif.head.out_features == 7
    assert isinstance(pool, PoolFormer)
    assert [len(pool.network[i]) for i in (0, 2, 4, 6)] == [1, 2, 1, 1]
    assert pool.network[2][0].norm1.num_channels == 8


def test_unknown_name_raises_key_error_with_hint_and_known_names() -> None:
    with pytest.raises(KeyError) as info:
        models.create("riformer_s21")
    message = str(info.value)
    assert "riformer_s21" in message
    assert "Did you mean" in message and "'riformer_s12'" in message
    assert all(name in message for name in models.names())


def test_fresh_registry_register_create_and_duplicates() -> None:
    registry = Registry()

    @registry.register("identity")
    def make_identity(**kwargs: object) -> nn.Module:
        return nn.Identity()

    assert registry.names() == ["identity"]
    assert isinstance(registry.create("identity"), nn.Identity)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("identity")(make_identity)
    with pytest.raises(KeyError, match="Known models: identity"):
        registry.create("nope")


# --------------------------------------------------------------------------- architecture


@pytest.mark.parametrize("size", SIZES)
def test_param_counts_match_paper(size: str) -> None:
    with torch.device("meta"):  # no memory, no forward pass
        rif = models.create(f"riformer_{size}")
        pool = models.create(f"poolformer_{size}")
    paper = PAPER_PARAMS_M[size] * 1e6
    n_rif, n_pool = param_count(rif), param_count(pool)
    assert abs(n_rif - paper) <= 5e-3 * paper
    # PoolFormer has no token-mixer parameters: the difference is exactly the affine mixers,
    # 2 * C per block (depthwise 1x1 weight + bias).
    layers, dims = _stage_shapes(rif)
    per_block = sum(2 * d * n for n, d in zip(layers, dims, strict=True))
    assert n_rif - n_pool == affine_param_count(rif) == per_block
    # The paper's table reports the deploy form (no mixer) to the printed precision.
    assert abs((n_rif - affine_param_count(rif)) - paper) <= 0.5e4 + 1


def _stage_shapes(model: nn.Module) -> tuple[list[int], list[int]]:
    stages = [m for m in model.network if isinstance(m, nn.Sequential)]
    return [len(s) for s in stages], [s[0].norm2.num_channels for s in stages]


def test_published_layer_scale_init_and_structure() -> None:
    with torch.device("meta"):
        s24, m36 = models.create("riformer_s24"), models.create("riformer_m36")
    assert _stage_shapes(s24) == ([4, 4, 12, 4], [64, 128, 320, 512])
    assert _stage_shapes(m36) == ([6, 6, 18, 6], [96, 192, 384, 768])
    # meta tensors carry no values: check the init on a tiny model with the same code path
    tiny = models.create("riformer_tiny", layer_scale_init_value=1e-6)
    assert torch.all(tiny.network[0][0].layer_scale_1 == 1e-6)
    stem, down = s24.patch_embed.proj, s24.network[1].proj
    assert (stem.kernel_size, stem.stride, stem.padding) == ((7, 7), (4, 4), (2, 2))
    assert (down.kernel_size, down.stride, down.padding) == ((3, 3), (2, 2), (1, 1))
    block = s24.network[0][0]
    assert block.norm1.num_groups == 1 and block.norm1.eps == 1e-5
    assert block.mlp.fc1.out_channels == 4 * 64


def test_drop_path_rates_increase_linearly() -> None:
    model = models.create("riformer_tiny", drop_path_rate=0.3)
    rates = [m.p for m in model.modules() if isinstance(m, DropPath)]
    # first block has rate 0 (so no DropPath module); the rest 0.1, 0.2, 0.3
    assert rates == pytest.approx([0.1, 0.2, 0.3])


def test_drop_path_drops_whole_samples_and_is_identity_in_eval() -> None:
    drop = DropPath(0.5)
    x = torch.ones(256, 2, 3, 3)
    y = drop.train()(x)
    per_sample = y.flatten(1)
    assert torch.all((per_sample == 0).all(1) | (per_sample == 2).all(1))
    assert 0 < (per_sample[:, 0] == 0).sum() < 256
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.parametrize("name", ["riformer_tiny", "poolformer_tiny"])
@pytest.mark.parametrize(("batch", "size"), [(1, 64), (3, 32), (2, 50)])
def test_forward_shapes(name: str, batch: int, size: int) -> None:
    model = models.create(name, num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 3, size, size))
    assert out.shape == (batch, 5)
    assert torch.isfinite(out).all()


def test_poolformer_mixer_is_pool_minus_identity() -> None:
    block = models.create("poolformer_tiny").network[0][0]
    x = torch.randn(1, 8, 5, 5)
    expected = nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False) - x
    torch.testing.assert_close(block.token_mixer(x), expected)


# --------------------------------------------------------------------------- RIFormer deploy


def test_redraw_makes_the_token_mixer_visible() -> None:
    """Guards the equivalence tests: with O(1) parameters the mixer matters at the output."""
    model, x = tiny_riformer(), tiny_input()
    with torch.no_grad():
        reference = model(x)
        for m in model.modules():
            if isinstance(m, Affine):
                m.affine.weight.fill_(1.0)
                m.affine.bias.zero_()  # the mixer becomes the zero map
        without_mixer = model(x)
    assert (reference - without_mixer).abs().max() > 0.1 * reference.abs().max()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paper_deploy_matches_training_form_fp32(seed: int) -> None:
    model, x = tiny_riformer(seed), tiny_input(seed + 10)
    with torch.no_grad():
        expected = model(x)
        assert model.switch_to_deploy() is model
        actual = model(x)
    assert_close_rel(actual, expected, FP32_RTOL)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ideal_deploy_matches_training_form_fp32(seed: int) -> None:
    model, x = tiny_riformer(seed), tiny_input(seed + 10)
    with torch.no_grad():
        expected = model(x)
        assert model.deploy_ideal() is model
        actual = model(x)
    assert_close_rel(actual, expected, FP32_RTOL)


@pytest.mark.parametrize("ideal", [False, True])
def test_deploy_matches_training_form_fp64(ideal: bool) -> None:
    model, x = tiny_riformer(3, torch.float64), tiny_input(4, torch.float64, size=48)
    with torch.no_grad():
        expected = model(x)
        model.switch_to_deploy(fold_layerscale=ideal)
        actual = model(x)
    assert model.head.weight.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert_close_rel(actual, expected, FP64_RTOL)


def test_paper_deploy_structure_and_formula() -> None:
    model = tiny_riformer()
    block = model.network[0][0]
    gamma, beta = block.norm1.weight.clone(), block.norm1.bias.clone()
    s = block.token_mixer.affine.weight.reshape(-1).clone()
    t = block.token_mixer.affine.bias.clone()
    ls1 = block.layer_scale_1.clone()
    n_before, n_affine = param_count(model), affine_param_count(model)

    model.switch_to_deploy()

    assert not any(isinstance(m, Affine) for m in model.modules())
    assert all(b.token_mixer is None for b in model.modules() if isinstance(b, RIFormerBlock))
    assert param_count(model) == n_before - n_affine
    assert isinstance(block.norm1, nn.GroupNorm) and block.norm1.num_groups == 1
    torch.testing.assert_close(block.norm1.weight, gamma * (s - 1))
    torch.testing.assert_close(block.norm1.bias, beta * (s - 1) + t)
    torch.testing.assert_close(block.layer_scale_1, ls1)  # the paper keeps the multiply


def test_ideal_deploy_removes_layer_scales() -> None:
    model = tiny_riformer().deploy_ideal()
    blocks = [m for m in model.modules() if isinstance(m, RIFormerBlock)]
    assert blocks and all(b.is_deployed and b.is_ideal for b in blocks)
    assert not any("layer_scale" in name for name, _ in model.named_parameters())
    assert not any(isinstance(m, Affine) for m in model.modules())


def test_deploy_is_idempotent_and_paper_then_ideal_is_exact() -> None:
    model, x = tiny_riformer(5), tiny_input(6)
    with torch.no_grad():
        expected = model(x)
        model.switch_to_deploy()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.switch_to_deploy()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
        model.deploy_ideal()
        model.deploy_ideal()
        actual = model(x)
    assert_close_rel(actual, expected, FP32_RTOL)


def test_deploy_keeps_requires_grad_and_trains() -> None:
    model = tiny_riformer().switch_to_deploy().train()
    out = model(tiny_input()).sum()
    out.backward()
    assert all(p.grad is not None for p in model.parameters())
