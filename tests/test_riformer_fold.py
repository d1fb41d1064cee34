"""The acceptance case: RIFormer-S12 folds to ``x + N'(x)`` token mixers, with the paper's
hand-written deploy form as the oracle."""

from __future__ import annotations

import copy
import operator
from collections import Counter

import pytest
import torch
from grammar import randomise_
from torch import fx, nn

import repfx
from repfx.ir.op_kinds import op_counts
from repfx.models import create
from repfx.testing import assert_equivalent

BLOCKS_S12 = 2 + 2 + 6 + 2


@pytest.fixture(scope="module")
def riformer_s12() -> nn.Module:
    model = create("riformer_s12").eval()
    return randomise_(model, torch.Generator().manual_seed(12))


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def _block_paths(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if type(m).__name__ == "RIFormerBlock"]


def _assert_mixer_folded(folded: fx.GraphModule, block_paths: list[str]) -> None:
    counts = op_counts(folded)
    assert counts["channel_affine"] == 0, "a LayerScale or affine multiply survived"
    # convs left: stem + 3 downsamplings + fc1, fc2 per block (no depthwise token mixer)
    assert counts["conv"] == 1 + 3 + 2 * len(block_paths)
    assert counts["group_norm"] == 2 * len(block_paths) + 1
    arithmetic = Counter(
        n.target for n in folded.graph.nodes if n.op == "call_function" and n.target in _ARITH
    )
    assert arithmetic == Counter({operator.add: 2 * len(block_paths)})  # the two residuals
    norms_per_block = Counter(
        path
        for n in folded.graph.nodes
        if n.op == "call_module" and isinstance(folded.get_submodule(n.target), nn.GroupNorm)
        for path in block_paths
        if n.target.startswith(path + ".")
    )
    assert norms_per_block == Counter({path: 2 for path in block_paths})


_ARITH = {operator.add, operator.sub, operator.mul, operator.truediv, torch.mul, torch.addcmul}


def test_riformer_s12_folds_with_example_inputs(riformer_s12, image):
    before = copy.deepcopy(riformer_s12.state_dict())
    folded = repfx.fold(riformer_s12, (image,))
    report = folded.meta["repfx_report"]
    assert report.verification.passed
    assert_equivalent(riformer_s12, folded, (image,), refold=repfx.fold)
    paths = _block_paths(riformer_s12)
    assert len(paths) == BLOCKS_S12
    _assert_mixer_folded(folded, paths)
    assert report.counts()["fold_affine_mixer"] == BLOCKS_S12
    for key, value in riformer_s12.state_dict().items():
        assert torch.equal(value, before[key])


def test_riformer_s12_folds_without_example_inputs(riformer_s12, image):
    folded = repfx.fold(riformer_s12)
    assert folded.meta["repfx_report"].verification is None
    _assert_mixer_folded(folded, _block_paths(riformer_s12))
    assert_equivalent(riformer_s12, folded, (image,), refold=repfx.fold)


def test_fold_matches_the_papers_deploy_form(riformer_s12, image):
    """The paper's hand-written reparameterization is the oracle; repfx also folds the
    LayerScales, so it has fewer parameters and no multiplies."""
    deploy = copy.deepcopy(riformer_s12).switch_to_deploy()
    folded = repfx.fold(riformer_s12)
    assert_equivalent(deploy, folded, (image,))
    deploy_muls = sum(
        n.op == "call_function" and n.target in _ARITH - {operator.add}
        for n in fx.symbolic_trace(deploy).graph.nodes
    )
    assert deploy_muls == 2 * BLOCKS_S12  # the paper keeps both LayerScale multiplies
    assert folded.meta["repfx_report"].after.parameters < sum(
        p.numel() for p in deploy.parameters()
    )


def test_folded_parameter_names_stay_readable(riformer_s12):
    folded = repfx.fold(riformer_s12)
    names = {name for name, _ in folded.named_parameters()}
    assert "network.0.0.norm1.weight" in names
    assert "network.0.0.mlp.fc2.weight" in names
    assert not any("token_mixer" in name or "layer_scale" in name for name in names)
