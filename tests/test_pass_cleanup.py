import operator

import torch
from helpers import apply, call_targets, traced
from torch import nn

from repfx.ir.ops import identity_input
from repfx.passes import Cleanup


class NoOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.drop = nn.Dropout(0.5)
        self.ident = nn.Identity()

    def forward(self, x):
        y = self.ident(self.drop(self.conv(x)))
        y = torch.nn.functional.dropout(y, 0.2, training=False)
        return (y * 1) - 0


def test_cleanup_removes_eval_no_ops_and_is_idempotent():
    model = NoOps().eval()
    x = torch.randn(2, 3, 4, 4)
    gm = traced(model, x)
    result = apply(Cleanup(), gm)
    assert result.modified
    assert len(result.folded) == 5
    assert call_targets(gm) == ["conv"]
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    assert not apply(Cleanup(), gm).modified


def test_cleanup_keeps_scalar_arithmetic_of_unknown_dtype():
    """``x * 1`` turns an integer tensor into a float one: without dtype knowledge it stays."""

    class Scale(nn.Module):
        def forward(self, x):
            return x * 1

    gm = traced(Scale())
    assert not apply(Cleanup(), gm).modified
    assert call_targets(gm) == [operator.mul]


class SignedZeros(nn.Module):
    """``1 / (y + c)`` where ``y`` holds ``-0.0`` (``-relu(x)`` of a negative ``x``)."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x):
        return torch.reciprocal(-torch.relu(x) + self.c)


def test_adding_zero_is_kept_where_it_turns_minus_zero_into_plus_zero():
    x = torch.tensor([[-1.0, 2.0, -3.0]])
    for c, removed in ((0.0, False), (0, False), (-0.0, True)):
        model = SignedZeros(c)
        gm = traced(model, x)
        assert apply(Cleanup(), gm).modified is removed, c
        assert torch.equal(gm(x), model(x)), c  # -inf stays -inf, +inf +inf


def test_the_rule_itself_never_takes_adding_zero_for_a_no_op():
    """The commit point would refuse ``x + 0`` where a later op reads the sign of a zero
    (``repfx.proof.special_values``); the rule must not propose it in the first place."""
    x = torch.tensor([[-1.0, 2.0, -3.0]])
    for c, identity in ((0.0, False), (0, False), (-0.0, True)):
        gm = traced(SignedZeros(c), x)
        add = next(n for n in gm.graph.nodes if n.target in (operator.add, torch.add))
        assert (identity_input(gm, add) is not None) is identity, c


def test_subtracting_minus_zero_is_kept():
    class SubtractMinusZero(nn.Module):
        def forward(self, x):
            return torch.reciprocal(-torch.relu(x) - (-0.0))

    gm = traced(SubtractMinusZero(), torch.randn(2, 3))
    assert not apply(Cleanup(), gm).modified
