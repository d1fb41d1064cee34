"""The commit point probes elementwise rewrites with signed zeros, ±inf, NaN and subnormals
(``repfx.proof.special_values``): a rule exact only on finite, non-zero values is refused where
it would change what the model computes, by construction rather than by a fix in the rule."""

from __future__ import annotations

import operator

import pytest
import torch
from helpers import traced
from torch import fx, nn

import repfx
from repfx.ir.ops import identity as identity_module
from repfx.passes.base import FoldContext, RewriteRejected
from repfx.passes.rewrite import replace_node
from repfx.proof.special_values import (
    SPECIAL_VALUES,
    same_special_values,
    with_special_values,
    zero_signs_matter,
)


class PlusZeroThenReciprocal(nn.Module):
    """``1 / (−relu(x) + 0)``: the ``+ 0`` turns −0.0 into +0.0, so it is not a no-op here."""

    def forward(self, x):
        return torch.reciprocal(-torch.relu(x) + 0)


class PlusZeroThenExp(nn.Module):
    """``exp(−relu(x) + 0)``: nothing after the ``+ 0`` tells −0.0 from +0.0."""

    def forward(self, x):
        return torch.exp(-torch.relu(x) + 0)


@pytest.fixture
def plus_zero_is_a_no_op(monkeypatch):
    """The rule as it once was: ``x + 0`` (not only ``x + (-0.0)``) taken for the identity."""
    for target in identity_module.ADD:
        monkeypatch.setitem(identity_module._NOOP_SCALARS, target, (0.0, True))


def _adds(gm: fx.GraphModule) -> int:
    return sum(
        n.op == "call_function" and n.target in (operator.add, torch.add) for n in gm.graph.nodes
    )


def test_a_no_op_that_flips_a_zero_read_by_a_reciprocal_is_refused(plus_zero_is_a_no_op):
    model = PlusZeroThenReciprocal().eval()
    x = torch.tensor([[-1.0, 2.0, 0.0, -3.0]])  # negatives: −relu(x) = −0.0 there
    folded = repfx.fold(model, (x,), verify=False)  # the commit point alone decides
    report = folded.meta[repfx.REPORT_KEY]
    refused = [s for s in report.skipped if s.rule == "cleanup"]
    assert refused and "sign of a zero" in refused[0].reason
    with torch.no_grad():
        want, got = model(x), folded(x)
    assert torch.equal(want, got) and torch.equal(want.signbit(), got.signbit())


def test_the_same_no_op_folds_where_nothing_reads_the_sign(plus_zero_is_a_no_op):
    x = torch.tensor([[-1.0, 2.0, 0.0, -3.0]])
    folded = repfx.fold(PlusZeroThenExp().eval(), (x,), verify=False)
    assert _adds(folded) == 0  # removed: exp(−0.0) = exp(+0.0)


def test_with_the_rule_as_it_is_the_plus_zero_stays_silently_exact():
    model = PlusZeroThenReciprocal().eval()
    x = torch.tensor([[-1.0, 2.0, 0.0]])
    folded = repfx.fold(model, (x,), verify=False)
    with torch.no_grad():
        assert torch.equal(model(x).signbit(), folded(x).signbit())


def test_a_rewrite_wrong_only_at_infinity_is_refused():
    """``x · 0 → 0``: true for every finite x, NaN for ±inf."""

    class TimesZero(nn.Module):
        def forward(self, x):
            return torch.relu(x) * 0.0 + 1.0

    gm = traced(TimesZero().eval())
    mul = next(n for n in gm.graph.nodes if n.target in (operator.mul, torch.mul))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    ctx = FoldContext(gm)

    def rewrite():
        with gm.graph.inserting_before(mul):
            zeros = gm.graph.call_function(torch.zeros_like, (mul.args[0],))
        replace_node(mul, zeros)
        return [zeros], "x * 0 -> 0"

    with pytest.raises(RewriteRejected, match="on special values") as refused:
        ctx.commit("times_zero", "mul", [mul], [x], rewrite)
    assert not refused.value.bug


def test_special_values_are_planted_in_every_floating_input():
    a, b, n = (fx.Graph().placeholder(name) for name in "abn")
    feeds = {a: torch.randn(3, 4, dtype=torch.float64), b: torch.randn(2), n: torch.arange(5)}
    planted = with_special_values(feeds)
    first = planted[a].reshape(-1)[: len(SPECIAL_VALUES)]
    assert first[0] == 0 and not first[0].signbit() and first[1] == 0 and first[1].signbit()
    assert first.isposinf().any() and first.isneginf().any() and first.isnan().any()
    assert planted[b].isnan().sum() + planted[b].isinf().sum() <= 2  # only 2 positions
    assert torch.equal(planted[n], feeds[n])  # integers as they were
    assert torch.equal(planted[a].reshape(-1)[len(SPECIAL_VALUES) :], feeds[a].reshape(-1)[7:])
    assert with_special_values({n: torch.arange(3)}) is None


def test_the_comparison_reads_zero_signs_only_when_asked():
    want = torch.tensor([-0.0, 1.0, float("inf")])
    flipped = torch.tensor([0.0, 1.0, float("inf")])
    assert same_special_values(want, flipped, signs_of_zeros=False) is None
    assert "sign of a zero" in same_special_values(want, flipped, signs_of_zeros=True).reason
    neg = torch.tensor([-0.0, 1.0, float("-inf")])
    assert "changes sign" in same_special_values(want, neg, signs_of_zeros=False).reason
    nan = torch.tensor([-0.0, 1.0, float("nan")])  # an algebraic fold may turn NaN into ±inf
    assert same_special_values(want, nan, signs_of_zeros=False) is None


def test_zero_signs_matter_only_downstream_of_a_reader():
    for model, expected in ((PlusZeroThenReciprocal(), True), (PlusZeroThenExp(), False)):
        gm = traced(model)
        add = next(n for n in gm.graph.nodes if n.target in (operator.add, torch.add))
        assert zero_signs_matter(gm, [add]) is expected


class ScaledToZero(nn.Module):
    """A conv whose output is scaled by 0: ``conv(x) · 0`` is ±0 with the sign of ``conv(x)``,
    and the reader ``read`` may tell the signs apart. Moving the 0 into the conv's weights
    makes every zero +0."""

    def __init__(self, read):
        super().__init__()
        self.conv, self.read = nn.Conv1d(1, 1, 1), read
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.fill_(0.25)

    def forward(self, x):
        y = self.conv(x) * 0.0
        return self.read(y)


def test_a_scale_of_zero_stays_where_a_later_op_reads_the_sign_of_the_zeros():
    """The random probes themselves make zeros of both signs here (not the special-values
    probe, which only elementwise regions get): the fold is refused, as a refusal, not a bug."""
    model = ScaledToZero(lambda y: torch.atan2(y, -torch.ones_like(y))).eval()
    folded = repfx.fold(model)
    x = torch.linspace(-2, 2, 10).reshape(2, 1, 5)
    assert torch.equal(folded(x), model(x))
    reasons = [s.reason for s in folded.meta[repfx.REPORT_KEY].skipped]
    assert any("the sign of a zero changes" in r for r in reasons), reasons


def test_a_scale_of_zero_folds_where_nothing_reads_the_sign():
    model = ScaledToZero(torch.relu).eval()
    folded = repfx.fold(model)
    assert folded.meta[repfx.REPORT_KEY].counts().get("fold_channel_affine", 0) == 1
    x = torch.linspace(-2, 2, 10).reshape(2, 1, 5)
    assert torch.equal(folded(x), model(x))
