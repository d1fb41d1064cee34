import operator

import torch
from helpers import apply, call_targets, traced
from torch import nn

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
        return (y * 1) + 0


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
