"""Rank guards: a fold that assumed a batch (conv, BatchNormNd and pools read axis 1 as the
channels of a batch; torch also takes an unbatched input, whose axis 1 is spatial) checks the
rank on each call of the folded module and raises ``repfx.GuardError`` when it differs, where
the fold would otherwise compute something else than the original."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from grammar import randomise_
from torch import nn

import repfx
from repfx.ir.graph import ConstantFolder, annotate_ranks, is_guard
from repfx.proof.probe_shapes import input_spec
from repfx.proof.region import collect_region
from repfx.testing import assert_equivalent

C = 4


class ConvThenFunctionalBatchNorm(nn.Module):
    def __init__(self, functional_conv: bool = False):
        super().__init__()
        self.functional_conv = functional_conv
        self.conv = nn.Conv2d(3, C, 3, padding=1)
        self.register_buffer("mean", torch.zeros(C))
        self.register_buffer("var", torch.ones(C))
        self.weight = nn.Parameter(torch.ones(C))
        self.bias = nn.Parameter(torch.zeros(C))

    def forward(self, x):
        if self.functional_conv:
            y = F.conv2d(x, self.conv.weight, self.conv.bias, padding=1)
        else:
            y = self.conv(x)
        return F.batch_norm(y, self.mean, self.var, self.weight, self.bias, False)


class Conv1dThenBatchNorm1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(C, C, 3, padding=1)
        self.bn = nn.BatchNorm1d(C)

    def forward(self, x):
        return self.bn(self.conv(x))


class ConvGroupNormScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.norm = nn.GroupNorm(2, C)
        self.scale = nn.Parameter(torch.ones(C, 1, 1))

    def forward(self, x):
        return self.scale * self.norm(self.conv(x))


class IdentityThenConv1dScale(nn.Module):
    """A no-op before the conv (cleanup removes it, handing its guard to the input) and a
    scale of shape ``(1, C, 1)``, which broadcasts an unbatched input to rank 3 (the fuzzer's
    find)."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Identity(), nn.Conv1d(C, C, 1)
        self.scale = nn.Parameter(torch.ones(1, C, 1))

    def forward(self, x):
        return F.gelu(self.conv(self.stem(x)) * self.scale)


# (model, a batched input, an unbatched input the original runs on: its axis 1 has C entries)
CASES = {
    "conv_then_F.batch_norm": (lambda: ConvThenFunctionalBatchNorm(), (2, 3, 4, 5), (3, C, 5)),
    "F.conv2d_then_F.batch_norm": (
        lambda: ConvThenFunctionalBatchNorm(functional_conv=True),
        (2, 3, 4, 5),
        (3, C, 5),
    ),
    "conv1d_then_batch_norm1d": (Conv1dThenBatchNorm1d, (2, C, 6), (C, C)),
    "conv_group_norm_scale": (ConvGroupNormScale, (2, C, 4, 5), (C, C, 5)),
    "identity_then_conv1d_scale": (IdentityThenConv1dScale, (2, C, 6), (C, 6)),
}


def _model(name: str) -> nn.Module:
    return randomise_(CASES[name][0](), torch.Generator().manual_seed(0)).eval()


def _input(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("with_examples", [False, True], ids=["no_examples", "examples"])
def test_an_unbatched_input_to_a_fold_that_assumed_a_batch_raises(name, with_examples):
    model = _model(name)
    _, batched, unbatched = CASES[name]
    examples = (_input(batched),) if with_examples else None
    folded = repfx.fold(model, examples)
    assert folded.meta[repfx.REPORT_KEY].folded  # the fold that assumed a batch was made
    assert_equivalent(model, folded, (_input((3, *batched[1:]), seed=2),))
    with torch.no_grad():
        model(_input(unbatched))  # the original runs on it (and normalises another axis)
    rank = len(batched)
    expected = rf"input x has rank {rank - 1}, but .* assuming rank {rank} .*example inputs"
    with pytest.raises(repfx.GuardError, match=expected):
        folded(_input(unbatched))


def test_a_model_without_batch_reading_ops_takes_any_rank():
    """Linears and a LayerNorm read the last axis: nothing to guard, any rank folds exactly."""
    model = nn.Sequential(nn.Linear(C, C), nn.LayerNorm(C), nn.Linear(C, 3))
    model = randomise_(model, torch.Generator().manual_seed(0)).eval()
    for examples in (None, (_input((2, C)),)):
        folded = repfx.fold(model, examples)
        assert not [n for n in folded.graph.nodes if is_guard(n)]
        for shape in ((5, C), (2, 3, C), (C,)):
            assert_equivalent(model, folded, (_input(shape, seed=3),))


class OpaqueThenConv(nn.Module):
    """A conv reading the output of code repfx does not trace: the guard sits on that value."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        y = _untraced(x)
        return self.bn(self.conv(y))


@torch.fx.wrap
def _untraced(x):
    return x.unsqueeze(0) if x.dim() == 3 else x


def test_a_value_computed_by_unknown_code_is_guarded_where_it_is_computed():
    model = randomise_(OpaqueThenConv(), torch.Generator().manual_seed(0)).eval()
    folded = repfx.fold(model)
    guards = [n for n in folded.graph.nodes if is_guard(n)]
    assert [g.args[0].name for g in guards] == ["_untraced"]
    assert_equivalent(model, folded, (_input((2, C, 3, 3)),))
    assert_equivalent(model, folded, (_input((C, 3, 3)),))  # _untraced makes it a batch


def test_the_guard_survives_a_refold_a_copy_and_a_save():
    model = _model("conv_then_F.batch_norm")
    folded = repfx.fold(model)
    again = repfx.fold(folded)
    buffer = io.BytesIO()
    torch.save(folded, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for module in (again, copy.deepcopy(folded), loaded):
        assert len([n for n in module.graph.nodes if is_guard(n)]) == 1
        assert_equivalent(model, module, (_input((2, 3, 4, 5)),))
        with pytest.raises(repfx.GuardError):
            module(_input((3, C, 5)))


def test_the_guard_lets_torch_export_capture_the_folded_module():
    model = _model("conv_then_F.batch_norm")
    folded = repfx.fold(model)
    x = _input((2, 3, 4, 5))
    program = torch.export.export(folded, (x,))
    torch.testing.assert_close(program.module()(x), folded(x))


def test_the_commit_point_probes_a_guarded_input_at_the_rank_its_guard_requires():
    """Without example inputs a Conv3d's input of unknown rank is guarded to a batch (rank 5):
    the proofs of folds next to it probe batches too, not the unbatched rank 4 torch also
    accepts (where a per-channel scale of shape (1, C, 1, 1, 1) broadcasts to another rank)."""

    model = nn.Sequential(nn.Conv3d(2, 2, 1), nn.GELU()).eval()
    gm = torch.fx.symbolic_trace(model)
    annotate_ranks(gm)
    x, conv = [n for n in gm.graph.nodes][:2]
    region = collect_region([conv], [x], ConstantFolder(gm))
    assert input_spec(x, torch.device("cpu")).rank is None  # nothing recorded or inferred
    assert input_spec(x, torch.device("cpu"), gm, region).rank == 5


class ShiftedScaledThenConv3d(nn.Module):
    """``−conv(x)``, then ``t + v · s ⊙ y`` with ``s, t`` of shape (1, C, 1, 1, 1), then a
    Conv3d: the per-channel affine folds into the second conv."""

    def __init__(self, c: int = 2):
        super().__init__()
        self.before, self.after = nn.Conv3d(c, c, 1), nn.Conv3d(c, c, 1)
        self.scale, self.shift = nn.Parameter(torch.randn(c)), nn.Parameter(torch.randn(c))

    def forward(self, x):
        view = (1, -1, 1, 1, 1)
        y = torch.addcmul(self.shift.view(view), self.scale.view(view), -self.before(x), value=0.7)
        return F.gelu(self.after(y))


def test_a_broadcast_size_of_one_is_no_channel_count_for_the_probes():
    """The constants' sizes of 1 are broadcast axes: probing a 1-channel input (which the
    original broadcasts, and the folded conv cannot read) refused the exact fold as a bug."""
    model = randomise_(ShiftedScaledThenConv3d(), torch.Generator().manual_seed(0)).eval()
    folded = repfx.fold(model)  # (a RewriteRejectedWarning fails the test)
    assert folded.meta[repfx.REPORT_KEY].counts().get("fold_channel_affine", 0) == 1
    assert_equivalent(model, folded, (torch.randn(2, 2, 3, 4, 3),))
