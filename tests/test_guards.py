"""One negative test per guard: the fold must leave the op alone and say why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from grammar import randomise_
from torch import nn

import repfx
from repfx.ir.graph import ConstantFolder, is_guard, tensor_use_counts
from repfx.ir.op_kinds import op_counts
from repfx.testing import assert_equivalent


def _randomised(module: nn.Module) -> nn.Module:
    return randomise_(module, torch.Generator().manual_seed(0))


def _fold(model: nn.Module, x: torch.Tensor):
    folded = repfx.fold(model, (x,))
    assert_equivalent(model, folded, (x,))
    return folded, folded.meta["repfx_report"]


def _reasons(report) -> str:
    return "\n".join(s.reason for s in report.skipped)


def test_training_mode_batch_norm_is_not_folded():
    model = _randomised(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(repfx.TrainingModeWarning, match="training mode"):
        folded, report = _fold(model, x)
    assert report.folded == []
    assert op_counts(folded)["batch_norm"] == 1
    assert "training mode" in _reasons(report)


def test_training_mode_dropout_is_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5)).train()
    with pytest.warns(repfx.TrainingModeWarning, match="training mode"):
        folded = repfx.fold(model)
    report = folded.meta["repfx_report"]
    assert report.folded == []
    assert any(isinstance(m, nn.Dropout) for m in folded.modules())
    assert "Dropout in training mode" in _reasons(report)


class SharedConv(nn.Module):
    """One conv called at two sites, each followed by its own BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(torch.relu(x)))


def test_conv_shared_by_two_call_sites_is_not_rewritten():
    model = _randomised(SharedConv()).eval()
    folded, report = _fold(model, torch.randn(2, 4, 6, 6))
    assert report.folded == []
    assert op_counts(folded)["batch_norm"] == 2
    assert "conv module is shared by 2 call sites" in _reasons(report)


class TiedWeight(nn.Module):
    """One weight tensor read by two functional convs."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4, 1, 1))
        self.gamma = nn.Parameter(torch.randn(4))

    def forward(self, x):
        y = F.conv2d(x, self.weight) * self.gamma[:, None, None]
        return y + F.conv2d(torch.relu(x), self.weight)


def test_tensor_used_twice_is_not_rewritten():
    model = TiedWeight().eval()
    folded, report = _fold(model, torch.randn(2, 4, 5, 5))
    assert report.folded == []
    assert op_counts(folded)["channel_affine"] == 1
    assert "parameter is used at 2 call sites" in _reasons(report)


def test_tensor_use_counts_are_keyed_by_the_tensor_itself():
    model = TiedWeight().eval()
    gm = torch.fx.symbolic_trace(model)
    uses = tensor_use_counts(gm, ConstantFolder(gm))
    assert (uses[model.weight], uses[model.gamma]) == (2, 1)
    assert uses[model.weight.detach().clone()] == 0  # equal values, another tensor: not counted
    assert uses[torch.zeros(1)] == 0


def test_shift_before_zero_padded_conv_is_not_folded():
    model = _randomised(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)))
    folded, report = _fold(model.eval(), torch.randn(2, 3, 6, 6))
    assert report.folded == []
    assert op_counts(folded)["batch_norm"] == 1
    assert "zero-pads its input" in _reasons(report)


class NonChannelBroadcast(nn.Module):
    """``x * w`` with ``w`` varying along the width, not the channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.w = nn.Parameter(torch.randn(5))

    def forward(self, x):
        return self.conv(x) * self.w


def test_non_channel_broadcast_is_not_folded():
    model = NonChannelBroadcast().eval()
    folded, report = _fold(model, torch.randn(2, 3, 5, 5))
    assert report.folded == []
    assert op_counts(folded)["conv"] == 1
    calls = [n for n in folded.graph.nodes if n.op == "call_function" and not is_guard(n)]
    assert len(calls) == 1  # the mul


class WideningConstant(nn.Module):
    """A constant with more dims than the input broadcasts the *input* up: not per-channel."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.g = nn.Parameter(torch.randn(2, 1, 4))

    def forward(self, x):
        return self.linear(x) * self.g


def test_constant_that_widens_the_input_is_not_folded():
    model = WideningConstant().eval()
    folded, report = _fold(model, torch.randn(5, 3))
    assert report.folded == []
    assert sum(n.op == "call_function" for n in folded.graph.nodes) == 1  # the mul stays


class TwoUsers(nn.Module):
    """The conv's output is read by the BN and by the residual add: the BN cannot fold into it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return y + torch.relu(self.bn(y))


def test_producer_with_another_user_is_not_rewritten():
    model = _randomised(TwoUsers()).eval()
    folded, report = _fold(model, torch.randn(2, 3, 6, 6))
    assert report.folded == []
    assert op_counts(folded)["batch_norm"] == 1
    assert "producer Conv2d has 2 users" in _reasons(report)


def test_group_norm_without_known_rank_is_not_folded_without_inputs():
    """Without example inputs or a conv upstream, GroupNorm's channel axis is unknown."""
    model = _randomised(nn.Sequential(nn.GroupNorm(2, 4), nn.BatchNorm2d(4))).eval()
    folded = repfx.fold(model)
    report = folded.meta["repfx_report"]
    assert report.folded == []
    assert "channel axis of the op is unknown" in _reasons(report)
    # with example inputs the rank is known, and the BN folds into the norm's affine
    x = torch.randn(2, 4, 3, 3)
    folded, report = _fold(model, x)
    assert report.counts() == {"fold_bn": 1}
