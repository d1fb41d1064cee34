"""Capture: untraceable parts, side effects, bad input, and the report's readability."""

from __future__ import annotations

import copy

import pytest
import torch
from grammar import BatchNormAct, randomise_
from torch import nn

import repfx
from repfx.ir.op_kinds import op_counts
from repfx.testing import assert_equivalent


class DataDependent(nn.Module):
    """Data-dependent control flow: fx cannot trace this forward."""

    def __init__(self):
        super().__init__()
        self.positive = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.negative = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        if x.sum() > 0:
            return self.positive(x)
        return self.negative(x)


class WithUntraceablePart(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.body = DataDependent()

    def forward(self, x):
        return self.body(torch.relu(self.stem(x)))


def _batch_norms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())


def test_untraceable_submodule_is_a_leaf_and_folded_inside():
    model = randomise_(WithUntraceablePart(), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(2, 3, 8, 8)
    folded = repfx.fold(model, (x,))
    report = folded.meta["repfx_report"]
    assert set(report.opaque_modules) == {"body"}
    assert "TraceError" in report.opaque_modules["body"]
    assert _batch_norms(folded) == 0  # the stem's BN, and both BNs inside the leaf
    assert _batch_norms(model) == 3
    for sign in (1.0, -1.0):  # both sides of the data-dependent branch
        probe = sign * torch.rand(2, 3, 8, 8)
        assert_equivalent(model, folded, (probe,))
    assert {f.where for f in report.folded if f.rule == "fold_bn"} >= {
        "stem.1",
        "body.positive.1",
        "body.negative.1",
    }


class Untraceable(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def test_untraceable_top_level_forward_is_a_clear_error():
    with pytest.raises(repfx.CaptureError, match="pass example inputs"):
        repfx.fold(Untraceable())


def test_a_forward_no_front_end_captures_runs_as_it_is():
    model, x = Untraceable(), torch.randn(2, 3)
    folded = repfx.fold(model, x)
    why = folded.meta[repfx.REPORT_KEY].opaque_modules["forward"]
    assert "neither front end" in why and "control flow on tensor values" in why
    assert torch.equal(folded(x), model(x)) and torch.equal(folded(-x), model(-x))


class CountsCalls(nn.Module):
    """A forward with a side effect on the module (a cache)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.bn(self.conv(x))


def test_tracing_side_effects_land_on_the_copy():
    model = CountsCalls().eval()
    hook_calls = []
    model.conv.register_forward_hook(lambda *args: hook_calls.append(1))
    folded = repfx.fold(model)
    assert model.calls == 0
    assert hook_calls == []  # tracing does not run hooks of leaf modules
    assert len(model.conv._forward_hooks) == 1
    # a hooked module is never rewritten: its hook would see other values
    assert op_counts(folded)["batch_norm"] == 1
    assert "conv module has hooks" in folded.meta["repfx_report"].explain()
    folded(torch.randn(1, 3, 4, 4))
    assert model.calls == 0
    assert hook_calls == [1]  # the copied conv keeps its hook, which runs as in the original


def test_bn_subclass_with_own_forward_is_recognised():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct(4))
    randomise_(model, torch.Generator().manual_seed(3)).eval()
    x = torch.randn(2, 3, 7, 7)
    folded = repfx.fold(model, (x,))
    assert op_counts(folded)["batch_norm"] == 0
    assert_equivalent(model, folded, (x,))


def test_example_inputs_of_the_wrong_type_are_a_clear_error():
    with pytest.raises(TypeError, match="example_inputs must be a tensor or a tuple"):
        repfx.fold(nn.Conv2d(3, 3, 1), example_inputs={"x": torch.randn(1, 3, 2, 2)})


def test_a_non_module_is_a_clear_error():
    with pytest.raises(TypeError, match=r"expects an nn\.Module"):
        repfx.fold(lambda x: x)


def test_report_is_readable_and_explains_skips():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    randomise_(model, torch.Generator().manual_seed(4)).eval()
    folded = repfx.fold(model, (torch.randn(2, 3, 6, 6),))
    report = folded.meta["repfx_report"]
    text = str(report)
    assert "fold_bn" in text and "verification ok" in text
    assert text.splitlines()[1] == (
        "  4 → 3 ops; removed 1 batch norm; parameters 128 → 120; verification ok (2 checks)"
    )
    assert "    batch norm                      2 → 1" in text
    assert "1 other candidate cannot fold as the model is built" in text
    assert repr(report).startswith("<repfx FoldReport: 4 → 3 ops") and len(repr(report)) < 200
    assert report.counts() == {"fold_bn": 1}
    assert report.explain().startswith("fold_bn: 3: producer ReLU is not a conv")


class ReadsTrainingStatistics(nn.Module):
    """An eval BN whose shift reads a training-mode BN's running mean through a view (fx runs
    ``running_mean.view(...)`` while tracing and records the result as a tensor constant)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.bn2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x, *args):
        y = self.bn(self.conv(x))
        return self.bn2(y) + self.bn.running_mean.view(1, -1, 1, 1)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_view_of_a_training_statistic_is_not_a_constant(capture):
    torch.manual_seed(0)
    model = ReadsTrainingStatistics()
    model.bn2.eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn2.running_mean.normal_()
    x = torch.randn(2, 3, 4, 4)
    with pytest.warns(repfx.TrainingModeWarning):
        folded = repfx.fold(model, x, verify=False, capture=capture)
    reference = copy.deepcopy(model)
    for _ in range(2):  # the statistic moves on every call
        fresh = torch.randn(2, 3, 4, 4)
        torch.testing.assert_close(folded(fresh), reference(fresh))
    torch.testing.assert_close(folded.bn.running_mean, reference.bn.running_mean)


class MBConvTail(nn.Module):
    """torchvision's MBConv residual: ``result = stochastic_depth(bn(conv(x))); result += x``.
    torchvision keeps ``stochastic_depth`` one call in the graph (``torch.fx.wrap``); in eval
    mode it returns its input itself, so ``+=`` writes into the BN's own output."""

    def __init__(self, channels: int = 4):
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.stochastic_depth = StochasticDepth(0.2, "row")

    def forward(self, x):
        result = self.stochastic_depth(self.bn(self.conv(x)))
        result += x
        return result


def test_a_write_through_eval_stochastic_depth_into_a_fresh_result_is_made_out_of_place():
    model = randomise_(MBConvTail(), torch.Generator().manual_seed(3)).eval()
    x = torch.randn(2, 4, 5, 5)
    folded = repfx.fold(model, (x,))
    assert op_counts(folded)["batch_norm"] == 0  # the BN output is private: it folds
    assert_equivalent(model, folded, (torch.randn(3, 4, 6, 6),))
    assert not any("stochastic_depth" in str(n.target) for n in folded.graph.nodes)


def test_stochastic_depth_in_training_mode_is_not_an_identity():
    from torchvision.ops import StochasticDepth

    from repfx.ir.match import Fail
    from repfx.ir.ops import identity_input

    gm = torch.fx.symbolic_trace(nn.Sequential(StochasticDepth(0.5, "row")).train())
    node = next(n for n in gm.graph.nodes if "stochastic_depth" in str(n.target))
    assert identity_input(gm, node) == Fail("stochastic depth in training mode")
    gm = torch.fx.symbolic_trace(nn.Sequential(StochasticDepth(0.5, "row")).eval())
    node = next(n for n in gm.graph.nodes if "stochastic_depth" in str(n.target))
    assert identity_input(gm, node) is node.args[0]


class NormalizedThenScaled(nn.Module):
    """``F.normalize``, which torch.fx records with its defaults (``out=None``), before a
    linear whose per-channel output scale folds into it (SwiftFormer's attention)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.scale = nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x):
        return self.scale * self.proj(torch.nn.functional.normalize(x, dim=-1))


def test_a_call_recorded_with_out_none_writes_nothing():
    model = randomise_(NormalizedThenScaled(), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(3, 5, 6)
    folded = repfx.fold(model, (x,))
    assert folded.meta[repfx.REPORT_KEY].counts().get("fold_channel_affine") == 1
    assert_equivalent(model, folded, (torch.randn(2, 4, 6),))


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx keeps this module as an opaque leaf."""

    def forward(self, x):
        if x.mean() > 0:
            return x * 2
        return x.relu()


class GatedConvBns(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6))
        self.gate = Gate()
        self.b = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6))

    def forward(self, x):
        return self.b(self.gate(self.a(x)))


def test_the_output_of_an_opaque_leaf_is_not_taken_for_a_written_tensor():
    """Unknown code may write to what it is given, but its own result only exists after that:
    the conv-BN reading it folds; and what it is given, which nothing reads after it, folds
    too (the fold computes it into memory of its own)."""
    model = randomise_(GatedConvBns(), torch.Generator().manual_seed(0)).eval()
    folded = repfx.fold(model, (torch.randn(2, 3, 8, 8),))
    report = folded.meta[repfx.REPORT_KEY]
    assert "gate" in report.opaque_modules
    assert report.counts().get("fold_bn") == 2  # the BN before the gate too
    for batch in (1, 3):
        x = torch.randn(batch, 3, 8, 8)
        for sign in (1, -1):  # both ways through the gate
            assert_equivalent(model, folded, (x.abs() * sign,))


class FeatureCollector(nn.Module):
    """A backbone whose forward hooks gather the stages' outputs into a list the forward then
    reads (HuggingFace backbones collect feature maps this way): a graph does not see the
    list fill up."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(c, 6, 3, padding=1), nn.BatchNorm2d(6)) for c in (3, 6)]
        )
        self.head = nn.Sequential(nn.Conv2d(12, 4, 1), nn.BatchNorm2d(4))
        self.collected: list[torch.Tensor] | None = None
        for stage in self.stages:
            stage.register_forward_hook(self._collect)

    def _collect(self, module, args, output):
        if self.collected is not None:
            self.collected.append(output)

    def forward(self, x):
        self.collected = []
        for stage in self.stages:
            x = stage(x)
        features, self.collected = self.collected, None
        return self.head(torch.cat(features, 1) if features else x)


def test_a_graph_that_misses_what_hooks_gather_is_not_taken_for_bad_inputs():
    model = randomise_(FeatureCollector(), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(1, 3, 8, 8)
    folded = repfx.fold(model, (x,))
    report = folded.meta[repfx.REPORT_KEY]
    assert "forward hooks on stages.0" in report.opaque_modules["forward"]
    assert folded.meta[repfx.REPORT_KEY].counts().get("fold_bn", 0) >= 1
    assert_equivalent(model, folded, (torch.randn(3, 3, 8, 8),))
    with pytest.raises(repfx.CaptureError, match=r"forward hooks on stages\.0"):
        repfx.fold(model, (x,), capture="fx")


class WritesWhenPositive(nn.Module):
    """Unknown code that writes to its input, on some inputs only."""

    def forward(self, x):
        if x.sum() > 0:
            x.add_(1.0)
        return x * 2


class HandsOverAScaledCopy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.leaf = WritesWhenPositive()

    def forward(self, x):
        y = self.conv(x)
        return self.leaf(y * 1.0) + y  # removing ``* 1.0`` would hand ``y`` itself over


def test_a_tensor_handed_to_code_that_writes_it_never_becomes_an_alias():
    model = randomise_(HandsOverAScaledCopy(), torch.Generator().manual_seed(0)).eval()
    folded = repfx.fold(model, (torch.randn(2, 3, 4, 4),))
    reasons = [s.reason for s in folded.meta[repfx.REPORT_KEY].skipped]
    assert any("code that may write to it" in r for r in reasons), reasons
    for sign in (1.0, -1.0):  # the leaf writes, and does not
        assert_equivalent(model, folded, (sign * torch.rand(3, 3, 4, 4) + sign,))


class VarArgsForward(nn.Module):
    """``forward(x, *args, **kwargs)`` (ultralytics' models): ``torch.fx`` cannot iterate a
    proxy for ``*args``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x, *args, **kwargs):
        for extra in args:
            x = x + extra
        return self.body(x) * kwargs.get("scale", 1.0)


def test_varargs_left_empty_by_the_example_are_traced_empty():
    model = randomise_(VarArgsForward(), torch.Generator().manual_seed(0)).eval()
    folded = repfx.fold(model, (torch.randn(1, 3, 8, 8),), capture="fx")
    assert folded.meta[repfx.REPORT_KEY].counts().get("fold_bn") == 1
    assert_equivalent(model, folded, (torch.randn(3, 3, 8, 8),))
    with pytest.raises(TypeError):  # folded as forward(x): never silently ignored
        folded(torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8))


class SplitThenLoop(nn.Module):
    """A split whose parts a loop or ``list`` takes (ultralytics' ``C2f``:
    ``y = list(x.chunk(2, 1)); y.extend(m(y[-1]) for m in self.m)``)."""

    def __init__(self, spelling: str, channels: int = 6):
        super().__init__()
        self.spelling = spelling
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 1), nn.BatchNorm2d(channels))
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(channels // 2, 3, 3, padding=1), nn.BatchNorm2d(3))]
        )

    def parts(self, y):
        if self.spelling == "chunk":
            return list(y.chunk(2, 1))
        if self.spelling == "torch.chunk":
            return [t for t in torch.chunk(y, chunks=2, dim=1)]
        if self.spelling == "split":
            return list(y.split([3, 3], dim=1))
        return list(torch.tensor_split(y, 2, dim=1))

    def forward(self, x):
        y = self.parts(self.stem(x))
        y.extend(block(y[-1]) for block in self.blocks)
        return torch.cat(y, 1)


@pytest.mark.parametrize("spelling", ["chunk", "torch.chunk", "split", "tensor_split"])
def test_a_split_into_a_known_number_of_parts_is_traced_through(spelling):
    model = randomise_(SplitThenLoop(spelling), torch.Generator().manual_seed(0)).eval()
    folded = repfx.fold(model, (torch.randn(1, 3, 8, 8),), capture="fx")
    report = folded.meta[repfx.REPORT_KEY]
    assert not report.opaque_modules
    assert report.counts().get("fold_bn") == 2
    assert_equivalent(model, folded, (torch.randn(3, 3, 8, 8),))


def test_a_chunk_into_fewer_parts_than_asked_is_never_silent():
    """``chunk(2)`` of a one-channel axis gives one part: the traced second part raises."""
    model = randomise_(SplitThenLoop("chunk", channels=2), torch.Generator().manual_seed(0))
    model.stem = nn.Sequential(nn.Conv2d(3, 1, 1), nn.BatchNorm2d(1))
    model.blocks[0] = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3))
    model.eval()
    folded = repfx.fold(model, (torch.randn(1, 3, 8, 8),))  # auto: the graph fails, runs as is
    assert_equivalent(model, folded, (torch.randn(3, 3, 8, 8),))
    traced = repfx.fold(model, capture="fx", verify=False)
    with pytest.raises(IndexError):
        traced(torch.randn(1, 3, 8, 8))
