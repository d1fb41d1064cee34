"""A forward that draws random numbers: the folded module draws them on every call, as the
model does. torch.fx runs a draw whose arguments it does not record (``torch.randn(4)``) once,
while tracing, and would keep that one draw: capture refuses it, and with example inputs
torch.export, which records the draw, captures the model instead."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from grammar import randomise_
from helpers import batch_norms, fresh_input
from torch import nn

import repfx
from repfx.testing import assert_close

DRAWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "randn": lambda y: torch.randn(4, 1, 1),
    "rand": lambda y: torch.rand(4, 1, 1),
    "normal_": lambda y: torch.empty(4, 1, 1).normal_(),
    "randint": lambda y: torch.randint(0, 3, (4, 1, 1)).float(),
    "bernoulli": lambda y: torch.bernoulli(torch.full((4, 1, 1), 0.5)),
}


class Noisy(nn.Module):
    """conv → BN, plus noise drawn by ``draw``."""

    def __init__(self, draw: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.draw = draw
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y + self.draw(y)


def _noisy(draw: Callable[[torch.Tensor], torch.Tensor]) -> Noisy:
    return randomise_(Noisy(draw), torch.Generator().manual_seed(0)).eval()


def _assert_draws_like_the_model(folded: nn.Module, model: nn.Module) -> None:
    """The same numbers as the model from the same seed, other numbers on the next call."""
    x = fresh_input(3, 3, 6, 6)
    with torch.no_grad():
        torch.manual_seed(5)
        got, again = folded(x), folded(x)
        torch.manual_seed(5)
        assert_close(got, model(x))
    assert not torch.equal(got, again)


@pytest.mark.parametrize("spelling", DRAWS)
def test_a_draw_torch_fx_would_freeze_is_refused_without_example_inputs(spelling):
    with pytest.raises(repfx.CaptureError, match=r"draws random numbers .*every call"):
        repfx.fold(_noisy(DRAWS[spelling]))


@pytest.mark.parametrize("spelling", DRAWS)
def test_with_example_inputs_the_folded_module_keeps_drawing(spelling):
    model = _noisy(DRAWS[spelling])
    folded = repfx.fold(model, (fresh_input(1, 3, 6, 6),))
    assert any("captured with torch.export" in n for n in folded.meta[repfx.REPORT_KEY].notes)
    assert batch_norms(folded) == 0
    _assert_draws_like_the_model(folded, model)


def test_a_draw_from_the_input_is_recorded_by_torch_fx():
    model = _noisy(lambda y: torch.randn_like(y[:1, :, :1, :1]))
    folded = repfx.fold(model)
    assert batch_norms(folded) == 0
    _assert_draws_like_the_model(folded, model)
