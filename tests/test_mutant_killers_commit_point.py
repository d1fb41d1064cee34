"""The commit point rejects a rewrite that is wrong in one way only.

Each test hands ``FoldContext.commit`` a replacement for one conv that agrees with it except on
inputs of one kind — even heights, spatial sizes above 1, batches above 1 — or that differs by
a small relative error, by its Inf positions or by its dtype, and checks that the proof on
probes rejects it (``RewriteRejected``). Each property is first checked directly on a fresh
input, so that the test says what the replacement gets wrong. These tests keep the probes
honest (``tools/mutants.py``: one probe, probes of size 1, batch 1, a looser tolerance, no
NaN / Inf or dtype check would each let the rewrite through).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import commit_replacement, is_conv_module, scaled_conv
from torch import fx, nn

from repfx.passes.base import RewriteRejected
from repfx.report.fold_report import Folded


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class StridedConv(nn.Module):
    """One 3×3, stride-2, padding-1 conv with O(1) parameters."""

    def __init__(self, bias: torch.Tensor | None = None):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        gen = _gen(0)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen))
            self.conv.bias.copy_(torch.randn(5, generator=gen) if bias is None else bias)

    def forward(self, x):
        return self.conv(x)


def _commit_replacement(
    model: nn.Module, replacement: nn.Module, example: torch.Tensor | None
) -> Folded:
    """Ask the commit point to replace ``model.conv`` by ``replacement`` (raises
    ``RewriteRejected`` when the proof fails)."""
    examples = () if example is None else (example,)
    return commit_replacement(model, is_conv_module, replacement, *examples)


def _unpadded_copy(conv: nn.Conv2d) -> nn.Conv2d:
    wrong = nn.Conv2d(3, 5, 3, stride=2, padding=0)
    wrong.load_state_dict(conv.state_dict())
    return wrong


EXAMPLES = [None, torch.randn(2, 3, 9, 8, generator=_gen(1))]


@pytest.mark.parametrize("example", EXAMPLES, ids=["guessed_shapes", "recorded_shapes"])
def test_a_rewrite_right_only_on_odd_heights_is_rejected(example):
    """Padding the bottom by 2 instead of 1 changes nothing where the stride-2 windows never
    reach the extra row (odd heights, and size 1); on even heights it adds an output row."""
    model = StridedConv()
    wrong = nn.Sequential(nn.ZeroPad2d((1, 1, 1, 2)), _unpadded_copy(model.conv))
    with torch.no_grad():
        for h in (1, 5, 7):
            x = torch.randn(2, 3, h, 6, generator=_gen(h))
            torch.testing.assert_close(wrong(x), model(x))
        even = torch.randn(2, 3, 6, 6, generator=_gen(2))
        assert wrong(even).shape != model(even).shape
    with pytest.raises(RewriteRejected, match="rejected by local validation"):
        _commit_replacement(model, wrong, example)


def _agrees_on_only(wrong: nn.Module, model: nn.Module, same: torch.Tensor, other: torch.Tensor):
    """The replacement computes the model's function on ``same`` and not on ``other``."""
    with torch.no_grad():
        torch.testing.assert_close(wrong(same), model(same))
        assert (wrong(other) - model(other)).abs().max() > 0.1


class PointwiseConv(nn.Module):
    """One 1×1 conv with O(1) parameters: a region of pointwise ops only (one probe)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)
        gen = _gen(5)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen))
            self.conv.bias.copy_(torch.randn(5, generator=gen))

    def forward(self, x):
        return self.conv(x)


class FlippedHeight(nn.Module):
    """``inner(x)`` upside down: the same as ``inner`` wherever the height is 1."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).flip(-2)


@pytest.mark.parametrize(
    "example", [None, torch.randn(2, 3, 2, 4, generator=_gen(6))], ids=["guessed", "recorded"]
)
def test_a_pointwise_rewrite_that_flips_the_height_is_rejected(example):
    """A region of pointwise ops gets one probe; every dim of it that is not 1 in the recorded
    shapes (a 1 may be a broadcast dim, and is kept) has at least three positions."""
    model = PointwiseConv()
    wrong = FlippedHeight(copy.deepcopy(model.conv))
    flat, tall = (
        torch.randn(2, 3, 1, 6, generator=_gen(7)),
        torch.randn(2, 3, 3, 6, generator=_gen(8)),
    )
    _agrees_on_only(wrong, model, flat, tall)
    with pytest.raises(RewriteRejected, match="rejected by local validation"):
        _commit_replacement(model, wrong, example)


class BatchMean(nn.Module):
    """``inner(x)`` averaged over the batch: the same as ``inner`` for a batch of one."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).mean(0, keepdim=True).expand(x.shape[0], -1, -1, -1)


@pytest.mark.parametrize("example", EXAMPLES, ids=["guessed_shapes", "recorded_shapes"])
def test_a_rewrite_that_mixes_the_batch_is_rejected(example):
    model = StridedConv()
    wrong = BatchMean(copy.deepcopy(model.conv))
    one, two = (
        torch.randn(1, 3, 7, 6, generator=_gen(3)),
        torch.randn(2, 3, 7, 6, generator=_gen(4)),
    )
    _agrees_on_only(wrong, model, one, two)
    with pytest.raises(RewriteRejected, match="rejected by local validation"):
        _commit_replacement(model, wrong, example)


def test_float32_rewrite_off_by_1e_4_is_rejected_and_one_off_by_rounding_is_not():
    """The float32 rewrite tolerance is 1e-5 of the output's scale: a folded constant off by
    1e-4 (~840 ulps) is a wrong fold, one off by 1e-7 (~1 ulp) is rounding."""
    model = StridedConv()
    example = EXAMPLES[1]
    assert _commit_replacement(model, scaled_conv(model.conv, 1 + 1e-7), example)
    with pytest.raises(RewriteRejected, match="differs by"):
        _commit_replacement(model, scaled_conv(model.conv, 1 + 1e-4), example)


def test_a_rewrite_that_is_finite_where_the_region_is_infinite_is_rejected():
    """Output channel 1 of the original is +Inf everywhere; a replacement that computes every
    other channel exactly but a finite channel 1 is not the same function."""
    bias = torch.tensor([0.5, float("inf"), -1.0, 2.0, 0.25])
    model = StridedConv(bias)
    finite = copy.deepcopy(model.conv)
    with torch.no_grad():
        finite.bias[1] = 0.0
        x = torch.randn(2, 3, 7, 6, generator=_gen(5))
        assert torch.isinf(model(x)[:, 1]).all() and torch.isfinite(finite(x)).all()
        keep = [0, 2, 3, 4]
        torch.testing.assert_close(finite(x)[:, keep], model(x)[:, keep])
    with pytest.raises(RewriteRejected, match="non-finite"):
        _commit_replacement(model, finite, EXAMPLES[1])


class Cast(nn.Module):
    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x):
        return self.inner(x).to(self.dtype)


@pytest.mark.parametrize("example", EXAMPLES, ids=["guessed_shapes", "recorded_shapes"])
def test_a_rewrite_that_changes_the_output_dtype_is_rejected(example):
    """Evaluated in float64 both compute the same values; in the model's own float32 the
    replacement returns float64, which every later op would see."""
    model = StridedConv()
    wrong = Cast(copy.deepcopy(model.conv), torch.float64)
    with torch.no_grad():
        x = torch.randn(2, 3, 7, 6, generator=_gen(6))
        assert wrong(x).dtype == torch.float64 and model(x).dtype == torch.float32
    with pytest.raises(RewriteRejected, match="dtype"):
        _commit_replacement(model, wrong, example)


class AsFloat(nn.Module):
    """Integer ids as floats (of their magnitude, with ``magnitude``)."""

    def __init__(self, magnitude: bool = False):
        super().__init__()
        self.magnitude = magnitude

    def forward(self, n):
        return (n.abs() if self.magnitude else n).float()


def _is_float_cast(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target == "float"


def test_a_rewrite_right_only_on_non_negative_integers_is_rejected():
    """Integer inputs are probed with both signs: ``n.abs().float()`` is ``n.float()`` only
    for ``n ≥ 0``."""
    ids = torch.randint(-5, 6, (2, 3, 4, 5), generator=_gen(12))
    model = AsFloat()
    assert not torch.equal(AsFloat(magnitude=True)(ids), model(ids))
    assert commit_replacement(model, _is_float_cast, AsFloat(), ids)
    with pytest.raises(RewriteRejected, match="rejected by local validation"):
        commit_replacement(model, _is_float_cast, AsFloat(magnitude=True), ids)


class ReluThenConv(nn.Module):
    """A relu of the input, then a conv with O(1) parameters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        gen = _gen(13)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen))
            self.conv.bias.copy_(torch.randn(4, generator=gen))

    def forward(self, x):
        return self.conv(torch.relu(x))


def _is_relu(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.relu


@pytest.mark.parametrize("example", EXAMPLES, ids=["guessed_shapes", "recorded_shapes"])
def test_a_rewrite_right_only_on_non_negative_inputs_is_rejected(example):
    """Floating probes take both signs: dropping a relu is exact only on inputs ≥ 0."""
    model = ReluThenConv()
    positive, signed = torch.rand(2, 3, 5, 6, generator=_gen(14)), EXAMPLES[1]
    assert torch.equal(torch.relu(positive), positive)
    assert not torch.equal(torch.relu(signed), signed)
    examples = () if example is None else (example,)
    assert commit_replacement(model, _is_relu, nn.ReLU(), *examples)
    with pytest.raises(RewriteRejected, match="rejected by local validation"):
        commit_replacement(model, _is_relu, nn.Identity(), *examples)
