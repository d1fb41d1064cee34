"""The norm registry (repfx.ir.norms): every declared norm is viewed, counted and folded into, and
the RMSNorm — declared there once — behaves like the others where it can (a scale goes into
its γ) and refuses where it cannot (it has no β for a shift)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from grammar import randomise_
from helpers import fold_matches, fresh_input, stored_multiplies
from torch import fx, nn

import repfx
from repfx.ir.graph import ConstantFolder, annotate_ranks, rank_of
from repfx.ir.norms import NORMS
from repfx.ir.op_kinds import OP_KINDS, op_counts
from repfx.ir.ops import norm_op


def _random(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomise_(model, torch.Generator().manual_seed(seed)).eval()


class NormThenScale(nn.Module):
    """``gelu(s ⊙ norm(x) + t)``: nothing after the norm can take the affine."""

    def __init__(self, norm: nn.Module, shift: bool = False):
        super().__init__()
        self.norm = norm
        self.s = nn.Parameter(torch.ones(6))
        self.t = nn.Parameter(torch.zeros(6)) if shift else None

    def forward(self, x):
        y = self.norm(x) * self.s
        return F.gelu(y if self.t is None else y + self.t)


class FunctionalRMSNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(6))
        self.s = nn.Parameter(torch.ones(6))

    def forward(self, x):
        return F.gelu(F.rms_norm(x, (6,), self.w, 1e-6) * self.s)


def _assert_scale_gone(model: nn.Module, folded: nn.Module) -> None:
    """The multiply by ``s`` is gone from the graph, and ``s`` is multiplied no more at run
    time (an RMSNorm's own γ is a multiply of its own)."""
    x = fresh_input(1, 5, 6)
    assert op_counts(folded)["channel_affine"] == 0
    assert "s" in stored_multiplies(model, x) and "s" not in stored_multiplies(folded, x)


def test_every_declared_norm_is_an_op_kind_with_words():
    from repfx.report.fold_report import OP_WORDS

    for norm in NORMS:
        assert norm.kind in OP_KINDS
        assert OP_WORDS[norm.kind] == norm.words


@pytest.mark.parametrize(
    "norm", [nn.LayerNorm(6), nn.RMSNorm(6), nn.RMSNorm(6, elementwise_affine=False)]
)
def test_a_scale_after_a_last_axis_norm_goes_into_it(norm):
    model = _random(NormThenScale(norm))
    folded = fold_matches(model, fresh_input(2, 5, 6), fresh_input(3, 4, 6, seed=2))
    _assert_scale_gone(model, folded)


def test_a_functional_rms_norm_takes_the_scale_too():
    model = _random(FunctionalRMSNorm())
    folded = fold_matches(model, fresh_input(2, 5, 6), fresh_input(3, 4, 6, seed=2))
    _assert_scale_gone(model, folded)


def test_a_shift_does_not_go_into_an_rms_norm_which_has_no_bias():
    model = _random(NormThenScale(nn.RMSNorm(6), shift=True))
    folded = fold_matches(model, fresh_input(2, 5, 6), fresh_input(3, 4, 6, seed=2))
    reasons = " ".join(s.reason for s in folded.meta["repfx_report"].skipped)
    assert "rms_norm has no bias to take the shift" in reasons
    assert not hasattr(folded.norm, "bias") or folded.norm.bias is None


def test_rms_norm_is_viewed_and_counted_and_keeps_the_rank():
    model = _random(nn.Sequential(nn.Linear(6, 6), nn.RMSNorm(6), nn.Linear(6, 3)))
    gm = fx.symbolic_trace(model)
    annotate_ranks(gm)
    consts = ConstantFolder(gm)
    norm_node = next(n for n in gm.graph.nodes if n.target == "1")
    view = norm_op(gm, norm_node, consts)
    assert (view.kind, view.channels, view.channel_axis, view.bias_slot) == (
        "rms_norm",
        6,
        -1,
        None,
    )
    assert op_counts(gm)["rms_norm"] == 1
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert rank_of(norm_node) == rank_of(placeholder)


def test_fold_norm_affine_moves_an_rms_norms_weight_into_its_readers():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.RMSNorm(6)
            self.q, self.k = nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False)

        def forward(self, x):
            n = self.norm(x)
            return self.q(n) @ self.k(n).transpose(-1, -2)

    model = _random(Attention())
    folded = repfx.fold(model, (fresh_input(2, 5, 6),), fold_norm_affine=True)
    fresh = fresh_input(3, 4, 6, seed=5)
    with torch.no_grad():
        repfx.testing.assert_close(folded(fresh), model(fresh))
    assert folded.norm.weight is None
    assert folded.q.bias is None  # γ only: no β to give the linears a bias
