"""The verifier's numbers, checked directly (found by ``tools/mutants.py``): the worst output
whatever its position, the least precise dtype setting the tolerance, the float64 criterion's
floor, multiple and ceiling, and non-tensor outputs compared by value."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from repfx.proof.tolerances import (
    FLOAT64_CRITERION_CEILING,
    FLOAT64_SENSITIVITY_MULTIPLE,
    RELATIVE_TOLERANCE,
    float64_criterion,
    max_errors,
    reference_dtype,
    tolerance_for,
)
from repfx.proof.verify import verify


@pytest.mark.parametrize("wrong_first", [True, False])
def test_max_errors_reports_the_worst_output_wherever_it_is(wrong_first):
    right, wrong = torch.ones(4), torch.full((4,), 2.0)
    pairs = [(wrong, right), (right, right)]
    if not wrong_first:
        pairs.reverse()
    actual, expected = zip(*pairs, strict=True)
    assert max_errors(actual, expected) == (1.0, 1.0)


def test_the_least_precise_output_dtype_sets_the_tolerance():
    outputs = (torch.ones(2), torch.ones(2, dtype=torch.float16), torch.ones(2).double())
    assert reference_dtype(outputs) == torch.float16
    assert reference_dtype((torch.ones(2).double(), torch.ones(2))) == torch.float32
    assert reference_dtype((torch.ones(2, dtype=torch.long),)) == torch.float64
    assert tolerance_for(reference_dtype(outputs)) == RELATIVE_TOLERANCE[torch.float16]


def test_float64_criterion_floor_multiple_and_ceiling():
    floor = RELATIVE_TOLERANCE[torch.float64]
    assert float64_criterion(0.0) == floor  # well-conditioned: the 1e-10 floor
    assert float64_criterion(1e-9) == pytest.approx(FLOAT64_SENSITIVITY_MULTIPLE * 1e-9)
    # a wrong fold is O(1) off: however ill-conditioned the model, the criterion stays small
    assert FLOAT64_CRITERION_CEILING <= 1e-3
    for sensitivity in (1e-3, 1.0, 1e6, math.inf, math.nan):
        assert float64_criterion(sensitivity) == FLOAT64_CRITERION_CEILING


class Returns(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize(
    "other",
    [1, "b", None, (2, 3)],
    ids=["int", "str", "None", "tuple"],
)
def test_non_tensor_outputs_are_compared_by_value(other):
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    model = Returns(lambda t: (t * 2, 0))
    assert verify(model, Returns(lambda t: (t + t, 0)), (x,)).passed
    result = verify(model, Returns(lambda t: (t * 2, other)), (x,))
    assert not result.passed
