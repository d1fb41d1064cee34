"""repfx against the hand-written deploy conversions of the reference blocks: the same number of
convs, and the same function."""

from __future__ import annotations

import copy

import torch
from grammar import randomise_
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import repfx
from repfx.ir.op_kinds import op_counts
from repfx.models import ACBlock, DBBlock, MobileOneBlock, RepVGGBlock, create
from repfx.proof.verify import float64_inputs
from repfx.testing import assert_equivalent


def _convs(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in module.modules())


def _check_against_deploy(model: nn.Module, x: torch.Tensor) -> None:
    model = randomise_(model, torch.Generator().manual_seed(0)).eval()
    deploy = copy.deepcopy(model).switch_to_deploy()
    folded = repfx.fold(model, (x,))
    counts = op_counts(folded)
    # one op per block, as in the deploy form; a block whose branches are all per-channel
    # (a 1×1 depthwise conv, BN, identity) becomes a per-channel affine, cheaper than its conv
    assert counts["conv"] + counts["channel_affine"] == _convs(deploy)
    assert counts["batch_norm"] == 0
    # the same function: both against the original, each within its own rounding (the two
    # float32 folds may differ from each other by both roundings; the float64 fold explains
    # an output that misses the tolerance)
    x64 = float64_inputs((x,))
    assert_equivalent(model, folded, (x,), lambda m64: repfx.fold(m64, x64, verify=False))
    assert_equivalent(model, deploy, (x,), lambda m64: copy.deepcopy(m64).switch_to_deploy())


def test_repvgg_tiny_folds_like_its_deploy_form():
    _check_against_deploy(create("repvgg_tiny", num_classes=10), torch.randn(2, 3, 32, 32))


def test_acnet_tiny_folds_like_its_deploy_form():
    """Including its block whose 1×k / k×1 branches read a cropped input."""
    _check_against_deploy(create("acnet_tiny", num_classes=10), torch.randn(2, 3, 32, 32))


def test_dbb_tiny_folds_like_its_deploy_form():
    """DBB: 1×1 → BNAndPad → K×K and 1×1 → BNAndPad → avg-pool branches compose, then merge."""
    _check_against_deploy(create("dbb_tiny", num_classes=10), torch.randn(2, 3, 32, 32))


def test_mobileone_tiny_folds_like_its_deploy_form():
    _check_against_deploy(create("mobileone_tiny", num_classes=10), torch.randn(2, 3, 32, 32))


class Chain(nn.Module):
    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(x)

    def switch_to_deploy(self):
        for block in self.blocks:
            if hasattr(block, "switch_to_deploy"):  # not the activations between blocks
                block.switch_to_deploy()
        return self


@st.composite
def block_chains(draw):
    channels = draw(st.integers(1, 6))
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.sampled_from([channels, draw(st.integers(1, 6))]))
        common = [g for g in range(1, min(channels, out) + 1) if channels % g == 0 and out % g == 0]
        groups, stride = draw(st.sampled_from(common)), draw(st.sampled_from([1, 2]))
        kind = draw(st.sampled_from(["repvgg", "acnet", "mobileone", "dbb"]))
        if kind == "repvgg":
            blocks.append(RepVGGBlock(channels, out, stride, groups))
        elif kind == "dbb":
            k = draw(st.sampled_from([3, 5]))
            blocks.append(DBBlock(channels, out, k, stride, k // 2, groups))
            blocks.append(nn.ReLU())
        elif kind == "acnet":
            k = draw(st.sampled_from([3, 5]))
            padding = draw(st.integers(0, k // 2))  # below k // 2 the 1×k / k×1 inputs are cropped
            blocks.append(ACBlock(channels, out, k, stride, padding, groups))
            blocks.append(nn.ReLU())
        else:
            k = draw(st.sampled_from([1, 3]))
            branches = draw(st.integers(1, 3))
            blocks.append(MobileOneBlock(channels, out, k, stride, None, groups, branches))
        channels = out
    return Chain(blocks), channels


@settings(max_examples=20)
@given(block_chains(), st.integers(10, 14))
def test_random_nets_of_reference_blocks_fold_like_their_deploy_form(chain, size):
    model, _ = chain
    x = torch.randn(2, _in_channels(model), size, size, generator=torch.Generator().manual_seed(1))
    _check_against_deploy(model, x)


def _in_channels(model: nn.Module) -> int:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
