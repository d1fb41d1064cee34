"""The safety paths, each pinned by the property it keeps (``tools/mutants.py``,
``SAFETY_MUTANTS``).

* The commit point refuses a region that reads a value written in place, even one the pass names
  as its input; it compares integer outputs exactly, and a tiny-scale or all-zero output on its
  own scale.
* Capture marks what a write through a view reaches, the statistics a training-mode batch norm
  updates wherever else they are read, and puts back what a trace wrote; it keeps an in-place
  module in place unless every call of it writes a fresh tensor, hands unknown code no tensor
  read after the call, and takes every tensor of a module whose hooks may write as live.
* The export front end keeps a constant pad's fill value, refuses hooked submodules and writes
  to lifted constants (after a read of them too); absorb_padding reads a positional fill value
  and a border mask's threshold.
* A scale region never scales a value broadcast along the channels, a value along two axes, a
  negative scale through a relu, or a mean over the channels; a reader undoes a scale only if
  no entry is zero and it mixes the channels the scale is on.
* fold_inside makes no set of replacements that was not proven together.
* Flatten and norm folds find the channel axis on ranks 3 and 5 too; a layer norm over several
  dims is no per-channel norm.
* The verifier does not excuse non-finite mismatches, nondeterministic outputs or merely
  ill-conditioned ones as discontinuous, nor any output against an all-zero one.

Every fold here runs with ``RewriteRejectedWarning`` as an error (a rewrite the commit point
had to reject is a bug) and is compared with the original on fresh inputs, call after call.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from grammar import randomise_
from helpers import commit_replacement, is_conv_module, scaled_conv, stored_multiplies
from torch import fx, nn

import repfx
from repfx.passes.base import RewriteRejected
from repfx.proof.verify import verify
from repfx.report.fold_report import FAILED
from repfx.testing import assert_close


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fresh(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed))


def _random(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with every parameter and BN statistic re-drawn at O(1)."""
    return randomise_(model, _gen(seed)).eval()


def _fold(model: nn.Module, *example: torch.Tensor, **options) -> fx.GraphModule:
    """``repfx.fold`` (verified), with a rewrite the commit point rejects raised as an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", repfx.RewriteRejectedWarning)
        return repfx.fold(model, tuple(example), **options)


def _agree(model: nn.Module, folded: nn.Module, *inputs: torch.Tensor, calls: int = 3) -> None:
    """``folded`` and ``model`` give the same outputs call after call (each writing its own
    state), and leave the inputs they are given as each other does."""
    with torch.no_grad():
        for _ in range(calls):
            mine, theirs = [x.clone() for x in inputs], [x.clone() for x in inputs]
            assert_close(folded(*mine), model(*theirs))
            for a, b in zip(mine, theirs, strict=True):
                assert_close(a, b)


def _folds_exactly(model: nn.Module, *shape: int, **options) -> fx.GraphModule:
    """Fold ``model`` on a random example of ``shape`` and check it on another input."""
    folded = _fold(model, _fresh(*shape, seed=1), **options)
    _agree(model, folded, _fresh(*shape, seed=2))
    return folded


def _report(folded: fx.GraphModule):
    return folded.meta[repfx.REPORT_KEY]


# ----------------------------------------------------------------------------- 1. commit point


class WritesBetweenBranches(nn.Module):
    """``a(x) + b(x)`` with ``x`` written in place between the two branches: ``b`` reads the
    written input, so the branches are not one conv of ``x``."""

    def __init__(self, write: Callable[[torch.Tensor], object]):
        super().__init__()
        self.write = write
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.a(x)
        self.write(x)
        return y + self.b(x)


INPUT_WRITES = {
    "x.mul_(c)": lambda x: x.mul_(-1.5),
    "x[:, :2].add_(c)": lambda x: x[:, :2].add_(0.75),
    "x.view(-1)[::2].mul_(c)": lambda x: x.view(-1)[::2].mul_(2.0),
}


@pytest.mark.parametrize("write", INPUT_WRITES)
def test_branches_are_not_merged_across_a_write_to_their_input(write):
    """The merge's region starts at ``x`` (the input the pass names) and ``x`` is written in
    place (directly, or through a view of it): the proof would hold only for one value of
    ``x`` read by both branches, so the merge is refused and the fold stays exact."""
    model = _random(WritesBetweenBranches(INPUT_WRITES[write]))
    folded = _folds_exactly(model, 2, 3, 6, 5)
    assert not _report(folded).counts().get("merge_branches")


class Labels(nn.Module):
    """The channel of the largest value of a conv's output, per position (int64)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, x):
        return self.conv(x).argmax(1)


class ArgminOf(nn.Module):
    def forward(self, y):
        return y.argmin(1)


class ArgmaxOf(nn.Module):
    def forward(self, y):
        return y.argmax(1)


def _is_argmax(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target == "argmax"


@pytest.mark.parametrize("example", [(), (_fresh(2, 3, 4, 5),)], ids=["guessed", "recorded"])
def test_an_integer_output_is_compared_exactly(example):
    """Indices are compared for equality: the argmin of the channels is not their argmax, though
    both are int64 tensors of the same shape; the argmax itself is accepted."""
    model = _random(Labels())
    y = _fresh(2, 5, 4, 5, seed=3)
    assert not torch.equal(ArgminOf()(y), ArgmaxOf()(y))
    assert commit_replacement(model, _is_argmax, ArgmaxOf(), *example)
    with pytest.raises(RewriteRejected, match="integer values differ"):
        commit_replacement(model, _is_argmax, ArgminOf(), *example)


class OneConv(nn.Module):
    """One conv with standard-normal parameters times ``scale`` (0: an all-zero output)."""

    def __init__(self, scale: float):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=_gen(4)) * scale)
            self.conv.bias.copy_(torch.randn(4, generator=_gen(5)) * scale)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("scale", [1e-6, 1e-9])
def test_a_tiny_output_is_compared_on_its_own_scale(scale):
    """An output of scale ``1e-6`` or less off by 10% of itself is wrong, however small the
    absolute difference; the conv itself, or one off by rounding, is accepted."""
    model = OneConv(scale)
    example = _fresh(2, 3, 5, 6)
    assert commit_replacement(model, is_conv_module, scaled_conv(model.conv, 1.0), example)
    assert commit_replacement(model, is_conv_module, scaled_conv(model.conv, 1 + 1e-7), example)
    with pytest.raises(RewriteRejected, match="differs by"):
        commit_replacement(model, is_conv_module, scaled_conv(model.conv, 1.1), example)


def test_a_replacement_of_an_all_zero_output_must_be_zero():
    """Where the region computes zeros everywhere, its scale is 0: any non-zero replacement is
    off by its own size, not by nothing. A replacement computing zeros is accepted."""
    model = OneConv(0.0)
    example = _fresh(2, 3, 5, 6)
    assert commit_replacement(model, is_conv_module, OneConv(0.0).conv, example)
    with pytest.raises(RewriteRejected, match="differs by"):
        commit_replacement(model, is_conv_module, OneConv(1.0).conv, example)


# ----------------------------------------------------------------------------- 2. capture


class WritesASliceOfItsResult(nn.Module):
    """conv → a slice of its output written in place → BN, which reads the written output."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        y[:, :2].mul_(-1.5)
        return self.bn(y)


def test_a_write_through_a_slice_reaches_the_tensor_it_slices():
    """The slice is not private to the write (the BN reads the whole tensor afterwards): the
    write stays in place and every reader of the conv's output sees it."""
    _folds_exactly(_random(WritesASliceOfItsResult()), 2, 3, 5, 6)


class ShrinksItsScale(nn.Module):
    """A layer scale whose first entries the forward shrinks in place, through a view, before
    reading it: the scale is not a constant of the model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("gamma", torch.ones(4))

    def forward(self, x):
        self.gamma.view(-1)[:2].mul_(0.5)
        return self.conv(x) * self.gamma.view(1, -1, 1, 1)


def test_a_scale_written_through_a_view_is_not_folded_as_a_constant():
    """The write to a view of the buffer reaches the buffer (and every read of it): the scale
    is not folded into the conv with the value it holds at fold time."""
    model = _random(ShrinksItsScale())
    with torch.no_grad():
        model.gamma.copy_(torch.randn(4, generator=_gen(3)))
    _folds_exactly(model, 2, 3, 4, 5)


class BatchStatisticsReadElsewhere(nn.Module):
    """A training-mode batch norm (a module, or ``F.batch_norm(training=True)`` on the model's
    own buffers) whose running mean the forward then adds to its output, before a conv: the
    mean read there is the one the batch norm has just updated."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1)
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x):
        if self.functional:
            y = F.batch_norm(x, self.mean, self.var, training=True)
            return self.conv(y + self.mean.view(1, -1, 1, 1))
        return self.conv(self.bn(x) + self.bn.running_mean.view(1, -1, 1, 1))


def _with_training_batch_norm(functional: bool) -> nn.Module:
    model = _random(BatchStatisticsReadElsewhere(functional))
    with torch.no_grad():
        model.mean.copy_(torch.randn(4, generator=_gen(3)))
        model.var.copy_(torch.rand(4, generator=_gen(4)) + 0.5)
    if not functional:
        model.bn.train()
    return model


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_statistics_a_training_batch_norm_updates_are_not_constants(functional, capture):
    """The shift ``+ running_mean`` is not folded into the conv after it with the value the
    mean holds at fold time: the folded model agrees with the original call after call."""
    model = _with_training_batch_norm(functional)
    x = _fresh(2, 4, 5, 5)
    if functional:
        folded = _fold(model, x, capture=capture)
    else:
        with pytest.warns(repfx.TrainingModeWarning):
            folded = _fold(model, x, capture=capture)
    _agree(model, folded, _fresh(3, 4, 5, 5, seed=2))


class ReluInPlaceTwice(nn.Module):
    """One ``nn.ReLU(inplace=True)`` called on a conv's fresh output and on the input itself:
    the second call writes the caller's tensor, which the sum then reads."""

    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.act(self.conv(x))
        self.act(x)
        return y + x


def test_an_in_place_module_stays_in_place_unless_every_call_writes_a_fresh_tensor():
    """The module cannot be switched to ``inplace=False`` for one call only: it stays in
    place, so the folded model writes the caller's input as the original does and the sum
    reads the written input."""
    model = _random(ReluInPlaceTwice())
    folded = _folds_exactly(model, 2, 3, 5, 6)
    assert any(m.inplace for m in folded.modules() if isinstance(m, nn.ReLU))


class WritesItsInput(nn.Module):
    """Code torch.fx cannot trace (a branch on a value) that writes to its input."""

    def forward(self, x):
        if x.sum() > float("-inf"):
            x.add_(1.0)
        return x * 2


class BranchesAroundAnOpaqueWrite(nn.Module):
    """``a(y) + b(y)`` with unknown code writing ``y`` in place between the two branches: ``a``
    reads ``y`` before the write, ``b`` after it."""

    def __init__(self):
        super().__init__()
        self.stem, self.leaf = nn.Conv2d(3, 4, 1), WritesItsInput()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.stem(x)
        first = self.a(y)
        self.leaf(y)
        return first + self.b(y)


def test_a_tensor_read_after_unknown_code_wrote_it_is_not_handed_over():
    """``y`` is read after the call: it is not the unknown code's to write unseen, and the
    branches (one reading ``y`` before the write, one after) are not merged into one conv of
    ``y``."""
    model = _random(BranchesAroundAnOpaqueWrite())
    folded = _folds_exactly(model, 2, 3, 5, 6)
    assert not _report(folded).counts().get("merge_branches")


class ReadsAHookedWeight(nn.Module):
    """A conv whose forward pre-hook flips the sign of its weight on every call (a torch.nn
    module, but its hook writes), and a scale computed from that weight after the call."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
        self.conv.register_forward_pre_hook(lambda m, args: m.weight.data.neg_())

    def forward(self, x):
        scale = self.conv(x).mean() * self.conv.weight.sum((1, 2, 3))
        return self.head(x.mean(1, keepdim=True).expand(-1, 4, -1, -1) * scale.view(1, -1, 1, 1))


def test_the_tensors_of_a_module_whose_hook_writes_are_no_constants():
    """Every tensor of a module whose hooks may write is live, in eval mode too: the scale
    read from the conv's weight is not folded into the head with the value it has at fold
    time, and the folded model follows the sign flips call after call."""
    model = _random(ReadsAHookedWeight())
    folded = _fold(model, _fresh(2, 3, 4, 5))
    _agree(model, folded, _fresh(3, 3, 4, 5, seed=2))


# ----------------------------------------------------------------------------- 3. export, padding


PAD_SPELLINGS = {
    "F.pad": lambda y, pads, fill: F.pad(y, pads, "constant", fill),
    "torch.constant_pad_nd": lambda y, pads, fill: torch.constant_pad_nd(y, pads, fill),
}


class PadsWithAValue(nn.Module):
    """A bias-free pointwise conv, its output padded with a fill value, then a 3×3 conv. The
    pad is ``F.pad`` or ``torch.constant_pad_nd``, which torch.export records as
    ``aten.constant_pad_nd`` and the export front end writes back as ``F.pad`` with the fill
    given positionally."""

    def __init__(self, fill: float, spelling: str = "F.pad"):
        super().__init__()
        self.fill, self.pad = fill, PAD_SPELLINGS[spelling]
        self.conv, self.head = nn.Conv2d(3, 4, 1, bias=False), nn.Conv2d(4, 2, 3)

    def forward(self, x):
        return self.head(self.pad(self.conv(x), [1, 1, 2, 2], self.fill))


def _fill() -> float:
    return 0.5 + float(torch.rand(1, generator=_gen(3)))


@pytest.mark.parametrize("spelling", PAD_SPELLINGS)
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_pad_keeps_its_fill_value(capture, spelling):
    """A fill other than zero is not a bias-free conv's border: the pad stays, with its value,
    and the fold is exact."""
    model = _random(PadsWithAValue(_fill(), spelling))
    folded = _folds_exactly(model, 2, 3, 5, 6, capture=capture)
    assert not _report(folded).counts().get("absorb_padding")


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_zero_fill_becomes_the_conv_padding(capture):
    """A zero fill is the bias-free conv's border: the conv takes the pad as its own."""
    folded = _folds_exactly(_random(PadsWithAValue(0.0)), 2, 3, 5, 6, capture=capture)
    assert _report(folded).counts().get("absorb_padding") == 1


class MaskedBorder(nn.Module):
    """DBB's spelling of a border: ``where(F.pad(zeros, p, value=c) > t, v, F.pad(y, p))``
    with ``v`` the pointwise conv's bias. With ``t`` at ``c`` the mask is empty: the border is
    zeros, not ``v``."""

    def __init__(self, fill: float, threshold: float):
        super().__init__()
        self.fill, self.threshold = fill, threshold
        self.conv, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 3)

    def forward(self, x):
        y = self.conv(x)
        p = [1, 1, 1, 1]
        border = F.pad(torch.zeros_like(y[:1, :1]), p, value=self.fill) > self.threshold
        return self.head(torch.where(border, self.conv.bias.reshape(1, -1, 1, 1), F.pad(y, p)))


def test_a_border_mask_is_one_only_where_its_threshold_is_below_the_fill():
    """A mask that selects no position leaves the zero padding as it is: not absorbed into the
    conv, whose border would be its bias. Below the fill, it is."""
    fill = _fill()
    folded = _folds_exactly(_random(MaskedBorder(fill, threshold=fill)), 2, 3, 5, 6)
    assert not _report(folded).counts().get("absorb_padding")
    folded = _folds_exactly(_random(MaskedBorder(fill, threshold=fill / 2)), 2, 3, 5, 6)
    assert _report(folded).counts().get("absorb_padding") == 1


class HookedBlock(nn.Module):
    """``head(block(x))`` behind a branch on the input's rank, which torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        if x.dim() == 4:
            return self.head(self.block(x))
        return x


def test_a_submodule_with_only_a_forward_pre_hook_keeps_it_running():
    """torch.export would run the pre-hook only while capturing: the model is not exported,
    and the hook runs on every call of the folded model, on what it sees in the original."""
    model = _random(HookedBlock())
    seen: list[torch.Size] = []
    model.head.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    folded = _fold(model, _fresh(2, 3, 6, 6))
    seen.clear()
    _agree(model, folded, _fresh(3, 3, 5, 4, seed=2), calls=1)
    assert seen == [torch.Size([3, 4, 5, 4])] * 2  # the fold's call, then the original's


class WritesAnAttributeThroughAView(nn.Module):
    """A plain tensor attribute (not a buffer) the forward writes through a slice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.offset = torch.zeros(4)

    def forward(self, x):
        self.offset[:2].add_(0.5)
        return self.conv(x) + self.offset.view(1, -1, 1, 1)


def test_export_refuses_a_write_through_a_view_of_a_lifted_constant():
    """torch.export lifts the attribute as a constant: the write would not reach it."""
    with pytest.raises(repfx.CaptureError, match="register_buffer"):
        repfx.fold(
            _random(WritesAnAttributeThroughAView()), (_fresh(2, 3, 4, 4),), capture="export"
        )


class ReadsAnAttributeThenWritesIt(nn.Module):
    """A plain tensor attribute (not a buffer) read, and only then written in place."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.offset = torch.zeros(4)

    def forward(self, x):
        y = self.conv(x) + self.offset.view(1, -1, 1, 1)
        self.offset.add_(0.5)
        return y


def test_export_refuses_a_write_to_a_lifted_constant_after_a_read_of_it():
    """Every reader of the lifted constant is examined, not only the first one."""
    with pytest.raises(repfx.CaptureError, match="register_buffer"):
        repfx.fold(_random(ReadsAnAttributeThenWritesIt()), (_fresh(2, 3, 4, 4),), capture="export")


# ----------------------------------------------------------------------------- 4. scale regions


class ScaledSum(nn.Module):
    """``γ ⊙ (a(x) + b(x))`` with ``b`` a conv of ``width`` output channels: with one, ``b(x)``
    is broadcast along the channels and cannot take a per-channel ``γ``."""

    def __init__(self, width: int):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, width, 1)
        self.gamma = nn.Parameter(torch.ones(4, 1, 1))

    def forward(self, x):
        return self.gamma * (self.a(x) + self.b(x))


@pytest.mark.parametrize("width", [4, 1], ids=["every_channel", "broadcast"])
def test_a_scale_crosses_a_sum_only_into_operands_with_every_channel(width):
    """``γ`` goes into both convs when both have every channel; otherwise it stays."""
    folded = _folds_exactly(_random(ScaledSum(width)), 2, 3, 5, 6)
    left = stored_multiplies(folded, _fresh(1, 3, 5, 6))
    assert left == ([] if width == 4 else ["gamma"])


class Gated(nn.Module):
    """``γ ⊙ (g(x) ⊙ a(·))``: the gate ``g`` (one channel, broadcast) comes first; ``a`` has
    every channel, computed from ``x`` itself or from its spatial mean (so that no factor has
    the product's whole shape)."""

    def __init__(self, pooled: bool):
        super().__init__()
        self.pooled = pooled
        self.g, self.a = nn.Conv2d(3, 1, 1), nn.Conv2d(3, 4, 1)
        self.gamma = nn.Parameter(torch.ones(4, 1, 1))

    def forward(self, x):
        source = x.mean((2, 3), keepdim=True) if self.pooled else x
        return self.gamma * (self.g(x) * self.a(source))


@pytest.mark.parametrize("pooled", [False, True], ids=["full", "pooled"])
def test_a_scale_after_a_product_goes_into_the_factor_with_every_channel(pooled):
    """``γ ⊙ (g ⊙ a) = g ⊙ (γ ⊙ a)``: ``γ`` goes into ``a``, never into the broadcast gate."""
    folded = _folds_exactly(_random(Gated(pooled)), 2, 3, 5, 6)
    assert stored_multiplies(folded, _fresh(1, 3, 5, 6)) == []
    details = " ".join(f.detail for f in _report(folded).folded)
    assert "conv a" in details and "conv g" not in details


class SymmetrisedTokens(nn.Module):
    """``γ ⊙ (y + yᵀ)`` over square token maps ``y = w·x`` of shape ``(N, C, C)``: ``y`` is
    read along its last axis and, transposed, along the one before; no single per-channel scale
    of ``y`` gives both (the uniform ``w`` could take a scale along either)."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.gamma = nn.Parameter(torch.ones(c))

    def forward(self, x):
        y = self.w * x
        return self.gamma * (y + y.transpose(1, 2))


def test_a_value_reached_along_two_axes_keeps_the_scale():
    """No rewrite is tried (none would be exact): the scale stays, and the fold is exact."""
    folded = _folds_exactly(_random(SymmetrisedTokens()), 2, 4, 4)
    assert stored_multiplies(folded, _fresh(1, 4, 4)) == ["gamma"]


class ScaledRelu(nn.Module):
    """``γ ⊙ relu(conv(x))``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gamma = nn.Parameter(torch.ones(4, 1, 1))

    def forward(self, x):
        return self.gamma * torch.relu(self.conv(x))


def test_a_scale_with_a_negative_entry_stays_after_a_relu():
    """``relu(s·y) = s·relu(y)`` for ``s ≥ 0`` only: one negative entry keeps the scale where
    it is; a non-negative one moves into the conv."""
    model = _random(ScaledRelu())
    with torch.no_grad():
        model.gamma.abs_()
        model.gamma[int(torch.randint(4, (1,), generator=_gen(3)))] *= -1
    folded = _folds_exactly(model, 2, 3, 5, 6)
    assert stored_multiplies(folded, _fresh(1, 3, 5, 6)) == ["gamma"]
    with torch.no_grad():
        model.gamma.abs_()
    assert stored_multiplies(_folds_exactly(model, 2, 3, 5, 6), _fresh(1, 3, 5, 6)) == []


class ScaledChannelMean(nn.Module):
    """``γ ⊙ mean(conv(x))`` over the channels (``keepdim``, so the product broadcasts it) or
    over the height: only the second commutes with a per-channel ``γ``."""

    def __init__(self, over: int):
        super().__init__()
        self.over = over
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gamma = nn.Parameter(torch.ones(4, 1, 1))

    def forward(self, x):
        return self.gamma * self.conv(x).mean(self.over, keepdim=True)


@pytest.mark.parametrize("over", [1, 2], ids=["channels", "height"])
def test_a_scale_moves_back_only_through_a_mean_over_other_axes(over):
    """Over the height, ``γ`` goes into the conv; over the channels, it stays."""
    folded = _folds_exactly(_random(ScaledChannelMean(over)), 2, 3, 5, 6)
    left = stored_multiplies(folded, _fresh(1, 3, 5, 6))
    assert left == (["gamma"] if over == 1 else [])


class ScaledAndRead(nn.Module):
    """``γ ⊙ y`` and ``reader(y)``, two outputs, with ``y = stem(x)``: ``γ`` can go into the
    stem only if the reader undoes it on its input side (``W ⊙_in γ⁻¹``), which needs every
    entry of ``γ`` non-zero and a reader that mixes the axis ``γ`` scales."""

    def __init__(self, stem: nn.Module, reader: nn.Module, gamma_shape: tuple[int, ...]):
        super().__init__()
        self.stem, self.reader = stem, reader
        self.gamma = nn.Parameter(torch.ones(gamma_shape))

    def forward(self, x):
        y = self.stem(x)
        return self.gamma * y, self.reader(y)


@pytest.mark.parametrize("zero", [False, True], ids=["invertible", "a_zero_entry"])
def test_a_reader_undoes_a_scale_only_if_no_entry_is_zero(zero):
    """With every entry non-zero ``γ`` goes into the stem and the reader's input weights;
    with one zero entry ``γ⁻¹`` does not exist: ``γ`` stays, and the report says that the
    reader needs the stem's output unscaled (not that a folded constant overflows, which
    would refuse a division by zero too). Exact either way."""
    model = ScaledAndRead(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1), (4, 1, 1))
    model = _random(model)
    if zero:
        with torch.no_grad():
            model.gamma[2] = 0.0
    folded = _folds_exactly(model, 2, 3, 5, 4)
    assert stored_multiplies(folded, _fresh(1, 3, 5, 4)) == (["gamma"] if zero else [])
    if zero:
        reasons = [s.reason for s in _report(folded).skipped if s.rule == "fold_channel_affine"]
        assert any("needs it unscaled" in r for r in reasons), reasons


@pytest.mark.parametrize("reader", ["linear", "conv1d"])
def test_a_reader_undoes_a_scale_only_along_the_axis_it_mixes(reader):
    """Tokens ``(N, 4, 4)``: ``γ`` scales the last axis (the stem linear's outputs). A linear
    reading ``y`` mixes that axis and undoes ``γ``, which folds; a pointwise Conv1d mixes the
    axis before it and cannot, and ``γ`` stays; the report says so where the region is
    found (the check of the conv's axis in the absorb rule would refuse it later, with a less
    direct reason). Exact either way."""
    readers = {"linear": nn.Linear(4, 4), "conv1d": nn.Conv1d(4, 4, 1)}
    model = _random(ScaledAndRead(nn.Linear(3, 4), readers[reader], (4,)))
    folded = _folds_exactly(model, 2, 4, 3)
    assert stored_multiplies(folded, _fresh(1, 4, 3)) == ([] if reader == "linear" else ["gamma"])
    if reader == "conv1d":  # (the reason is the reader's axis, found where the region is)
        reasons = [s.reason for s in _report(folded).skipped if s.rule == "fold_channel_affine"]
        assert any("Conv1d, which needs it unscaled" in r for r in reasons), reasons


# ----------------------------------------------------------------------------- 5. fold_inside


def _data_dependent(x: torch.Tensor) -> torch.Tensor:
    """A branch on a tensor's value: stops torch.fx and torch.export alike."""
    return x if x.sum() > float("-inf") else -x


class ConvBn(nn.Module):
    """conv → BN, a block with children that folds to a ``GraphModule``."""

    def __init__(self, c: int = 2):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.conv(x))


class ReadsItsBlocks(nn.Module):
    """Untraced code over three blocks that reads inside the first one (so the first cannot be
    replaced whole) and, with ``counts``, tells whether fewer than two of them are still
    ``ConvBn`` blocks: then either of the others replaced alone changes nothing, both together
    change the output."""

    def __init__(self, counts: bool):
        super().__init__()
        self.counts = counts
        self.m = nn.ModuleList([ConvBn(), ConvBn(), ConvBn()])

    def forward(self, x):
        for block in self.m:
            x = block(_data_dependent(x))
        x = x * self.m[0].bn.eps * 1e5
        if self.counts and sum(isinstance(m, ConvBn) for m in self.m) < 2:
            return -x
        return x


@pytest.mark.parametrize("counts", [True, False], ids=["counts", "reads_the_first"])
def test_replacements_that_pass_alone_are_made_only_if_they_pass_together(counts):
    """The first block is refused (the parent reads inside it); the other two pass alone, and
    are replaced only where they pass together too."""
    model = _random(ReadsItsBlocks(counts))
    folded = _folds_exactly(model, 2, 2, 4, 4, verify_redrawn=False)  # (halves the proofs)
    kept = [m for m in folded.modules() if isinstance(m, ConvBn)]
    assert len(kept) == (3 if counts else 1)


# ----------------------------------------------------------------------------- 6. ranks 3 and 5


CONVS = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}


class AffineFlattenLinear(nn.Module):
    """``fc(flatten(tanh(conv(x)) · s + t, 1))`` on a rank-``rank`` tensor of shape
    ``(N, 4, 4, …)``, the affine along dimension ``dim`` (1: the channels); tanh keeps the
    affine from moving back into the conv."""

    def __init__(self, rank: int, dim: int):
        super().__init__()
        self.conv = CONVS[rank](3, 4, 1)
        view = [1] * rank
        view[dim] = 4
        self.s, self.t = nn.Parameter(torch.ones(view[1:])), nn.Parameter(torch.zeros(view[1:]))
        self.fc = nn.Linear(4 ** (rank - 1), 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.tanh(self.conv(x)) * self.s + self.t, 1))


@pytest.mark.parametrize("rank", [3, 4, 5])
def test_a_channel_affine_folds_through_the_flatten_at_any_rank(rank):
    """The channels are dimension 1 whatever the rank, each spread over the positions after."""
    model = _random(AffineFlattenLinear(rank, dim=1))
    folded = _folds_exactly(model, 2, 3, *[4] * (rank - 2))
    assert _report(folded).counts().get("fold_affine_through_flatten") == 1
    assert stored_multiplies(folded, _fresh(1, 3, *[4] * (rank - 2))) == []


def test_an_affine_on_another_axis_than_the_channels_stays_before_the_flatten():
    """On ``(N, C, D, H, W)`` an affine along ``D`` (axis -3, the channels' axis at rank 4)
    is not per channel of the flatten's features in the way the fold assumes."""
    model = _random(AffineFlattenLinear(5, dim=2))
    folded = _folds_exactly(model, 2, 3, 4, 4, 4)
    assert not _report(folded).counts().get("fold_affine_through_flatten")


class GroupNormThenAffine(nn.Module):
    """``GroupNorm(x) · s + t`` on a rank-``rank`` input of shape ``(N, 4, 4, …)``, the affine
    along dimension ``dim`` (1: the channels)."""

    def __init__(self, rank: int, dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)
        view = [1] * rank
        view[dim] = 4
        self.s, self.t = nn.Parameter(torch.ones(view[1:])), nn.Parameter(torch.zeros(view[1:]))

    def forward(self, x):
        return self.norm(x) * self.s + self.t


@pytest.mark.parametrize("rank", [3, 4, 5])
def test_a_channel_affine_after_a_group_norm_folds_into_it_at_any_rank(rank):
    """A group norm's channels are dimension 1 at any rank: the affine goes into its γ, β."""
    folded = _folds_exactly(_random(GroupNormThenAffine(rank, dim=1)), 2, 4, *[4] * (rank - 2))
    assert stored_multiplies(folded, _fresh(1, 4, *[4] * (rank - 2))) == []


def test_an_affine_along_depth_does_not_go_into_a_group_norm():
    """Rank 5: the group norm's channels are at -4; an affine along the depth (-3, of the same
    size) is not per channel."""
    folded = _folds_exactly(_random(GroupNormThenAffine(5, dim=2)), 2, 4, 4, 4, 4)
    assert len(stored_multiplies(folded, _fresh(1, 4, 4, 4, 4))) == 1


class LayerNormThenAffine(nn.Module):
    """``F.layer_norm`` over the last ``dims`` dims of ``(N, 4, 4)``, then an affine along the
    last axis: per channel of the norm only when it normalises that one axis."""

    def __init__(self, dims: int):
        super().__init__()
        self.shape = (4,) * dims
        self.s, self.t = nn.Parameter(torch.ones(4)), nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return F.layer_norm(x, self.shape) * self.s + self.t


@pytest.mark.parametrize("dims", [1, 2])
def test_an_affine_goes_into_a_functional_layer_norm_over_its_axis_only(dims):
    """Over one axis the norm's γ, β are per channel and take the affine; over two they are
    not (and have as many entries as the two axes together)."""
    folded = _folds_exactly(_random(LayerNormThenAffine(dims)), 2, 4, 4)
    assert len(stored_multiplies(folded, _fresh(1, 4, 4))) == (0 if dims == 1 else 1)


class AffineAfterAWideLayerNorm(nn.Module):
    """A LayerNorm over the last ``len(shape)`` dims (with or without γ, β), then an affine
    along the last dim only, then a pointwise conv: the norm has no per-channel γ of the
    affine's size."""

    def __init__(self, shape: tuple[int, ...], affine: bool):
        super().__init__()
        self.norm = nn.LayerNorm(shape, elementwise_affine=affine)
        self.s, self.t = nn.Parameter(torch.ones(shape[-1])), nn.Parameter(torch.zeros(shape[-1]))
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.conv(self.norm(x) * self.s + self.t)


@pytest.mark.parametrize(
    ("shape", "affine"),
    [((5, 4), True), ((3, 5, 4), True), ((5, 4), False)],
    ids=["HW", "CHW", "HW_without_affine"],
)
def test_an_affine_after_a_layer_norm_over_several_dims_folds_exactly(shape, affine):
    """The norm module normalises over several trailing dims: it is no per-channel norm, and
    the affine after it is not folded into its γ, β as if it were one over the last dim
    (it goes into the conv instead, or stays); the fold is exact."""
    _folds_exactly(_random(AffineAfterAWideLayerNorm(shape, affine)), 2, 3, 5, 4)


# ----------------------------------------------------------------------------- 7. the verifier

EPS64 = torch.finfo(torch.float64).eps


class Returns(nn.Module):
    """Whatever ``fn`` makes of the input (a hand-made "fold")."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Cancels(nn.Module):
    """``a ⊙ x − b ⊙ x`` with O(1) ``a`` and ``b = a (1 − δ)``: a 1-ulp move of ``a`` or ``b``
    moves the output by about ``eps / δ`` of its scale — ill-conditioned, yet continuous."""

    def __init__(self, delta: float):
        super().__init__()
        a = (torch.rand(8, generator=_gen(3), dtype=torch.float64) + 0.5) * torch.where(
            torch.rand(8, generator=_gen(4)) > 0.5, 1.0, -1.0
        ).double()
        self.a, self.b = nn.Parameter(a), nn.Parameter(a * (1 - delta))

    def forward(self, x):
        return self.a * x - self.b * x


def test_a_wrong_fold_of_an_ill_conditioned_continuous_output_fails():
    """An output moving by ~1e-3 of its scale under a 1-ulp perturbation is ill-conditioned,
    not discontinuous: an O(1) error in a fold of it is judged, and fails."""
    delta = 2 * EPS64 / 1e-3
    model = Cancels(delta).eval()
    x = (_fresh(2, 8, seed=5).double(),)
    assert verify(model, copy.deepcopy(model), x).passed
    result = verify(model, Returns(lambda t: 1.5 * model(t)), x)
    [output] = result.outputs
    assert not result.passed and output.verdict == FAILED
    sensitivity = output.recheck.sensitivity
    assert EPS64 / delta / 10 < sensitivity < 10 * EPS64 / delta


class Step(nn.Module):
    """``x`` where ``x > p``, else 0, with an input exactly at the threshold ``p``: a 1-ulp
    move of ``p`` flips that position, so the output jumps there (discontinuous)."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.rand(1, generator=_gen(6), dtype=torch.float64) + 0.5)

    def forward(self, x):
        return torch.where(x > self.p, x, torch.zeros_like(x))


def test_a_nan_where_the_original_has_none_fails_even_where_the_original_jumps():
    model = Step().eval()
    x = _fresh(2, 8, seed=7).double()
    with torch.no_grad():
        x[0, 0] = model.p
    nan_at_end = Returns(
        lambda t: torch.cat([model(t)[:, :-1], torch.full_like(t[:, :1], torch.nan)], 1)
    )
    result = verify(model, nan_at_end, (x,))
    [output] = result.outputs
    assert not result.passed and output.verdict == FAILED
    assert output.nonfinite_mismatches == x.shape[0]


def test_any_output_differs_from_an_all_zero_one():
    """Against an expected output of zeros (scale 0) the error is the absolute difference."""
    x = _fresh(2, 5, seed=8)
    offset = torch.randn(5, generator=_gen(9))
    assert verify(Returns(torch.zeros_like), Returns(torch.zeros_like), (x,)).passed
    result = verify(Returns(torch.zeros_like), Returns(lambda t: 0 * t + offset), (x,))
    assert not result.passed and result.outputs[0].verdict == FAILED
