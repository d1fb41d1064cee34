"""The commit point: every rewrite is proven on probes before it is kept.

A wrong rewrite is injected into a pass (its fold arithmetic is made wrong); the commit point
must reject it — raising under strict mode, and otherwise undoing it, reporting it, warning
(``RewriteRejectedWarning``) and folding everything else. Graph surgery outside a commit is
itself reported as a bug.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from helpers import traced, wrong_output_fold
from torch import fx, nn

import repfx
from repfx import algebra
from repfx.ir.graph import MUTATED_KEY, ConstantFolder
from repfx.passes import (
    FoldBatchNorm,
    PassError,
    RewriteRejectedWarning,
    default_pipeline,
    run_to_fixpoint,
)
from repfx.passes import _absorb as absorb_module
from repfx.passes.base import RewriteRejected, apply_rule
from repfx.passes.rewrite import GraphSurgeryError, all_finite, replace_node
from repfx.proof.probe_shapes import _tap_coverage, probe_sizes
from repfx.proof.redraw import redraw_foldable_parameters_
from repfx.proof.region import ValidationFailure
from repfx.proof.validate import prove_before
from repfx.report.fold_report import Folded
from repfx.testing import assert_close


def _randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def _conv_bn_net() -> nn.Module:
    return _randomised(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 1),
            nn.BatchNorm2d(8),
        )
    )


def test_injected_wrong_rewrite_raises_under_strict_mode(monkeypatch):
    monkeypatch.setattr(absorb_module, "fold_affine_into_conv_output", wrong_output_fold)
    with pytest.raises(RewriteRejected, match="rejected by local validation"):
        run_to_fixpoint(traced(_conv_bn_net()), default_pipeline(), strict=True)


def test_injected_wrong_rewrite_is_undone_reported_and_warned_about(monkeypatch):
    monkeypatch.setattr(absorb_module, "fold_affine_into_conv_output", wrong_output_fold)
    model = _conv_bn_net()
    with pytest.warns(RewriteRejectedWarning, match=r"fold_bn at [14]: .* a repfx bug") as warned:
        folded = repfx.fold(model, verify=False)  # no example inputs: nothing else catches it
    rejected = [w for w in warned if issubclass(w.category, RewriteRejectedWarning)]
    assert {str(w.message).split(":")[0] for w in rejected} == {"fold_bn at 1", "fold_bn at 4"}
    report = folded.meta[repfx.REPORT_KEY]
    rejected = [s for s in report.skipped if "rejected by local validation" in s.reason]
    assert {s.where for s in rejected} == {"1", "4"}
    assert not [f for f in report.folded if f.rule == "fold_bn"]
    x = torch.randn(3, 3, 7, 6)
    with torch.no_grad():
        assert_close(folded(x), model(x))


def test_only_the_wrong_rewrites_are_denied(monkeypatch):
    """Wrong only for the 3×3 conv's BN: the pointwise conv's BN still folds."""

    def wrong_for_3x3(weight, bias, affine):
        w, b = algebra.fold_affine_into_conv_output(weight, bias, affine)
        return (w, b + 1) if weight.dim() == 4 and weight.shape[-1] == 3 else (w, b)

    monkeypatch.setattr(absorb_module, "fold_affine_into_conv_output", wrong_for_3x3)
    model = _conv_bn_net()
    x = torch.randn(2, 3, 9, 8)
    with pytest.warns(RewriteRejectedWarning, match="fold_bn at 1"):
        folded = repfx.fold(model, (x,))
    report = folded.meta[repfx.REPORT_KEY]
    assert [f.where for f in report.folded if f.rule == "fold_bn"] == ["4"]
    assert any(s.where == "1" and "rejected" in s.reason for s in report.skipped)
    other = torch.randn(3, 3, 5, 7)
    with torch.no_grad():
        assert_close(folded(other), model(other))


def test_wrong_rewrite_with_shapes_known_is_rejected(monkeypatch):
    """Shapes propagated: the probes use the recorded channel layout."""
    monkeypatch.setattr(absorb_module, "fold_affine_into_conv_output", wrong_output_fold)
    gm = traced(_conv_bn_net(), torch.randn(1, 3, 16, 16))
    with pytest.raises(RewriteRejected):
        run_to_fixpoint(gm, default_pipeline(), strict=True)


def test_a_rule_that_edits_the_graph_without_a_commit_is_reported():
    gm = traced(_conv_bn_net())

    def sneaky(ctx, node: fx.Node):
        if node.op == "call_module" and node.target == "2":  # the ReLU
            replace_node(node, node.args[0])  # surgery outside a commit
            return Folded("sneaky", "2", "removed")
        return None

    with pytest.raises(GraphSurgeryError):
        apply_rule(gm, sneaky)


def test_a_rule_that_erases_nodes_directly_is_reported():
    gm = traced(_conv_bn_net())

    def direct(ctx, node: fx.Node):
        if node.op == "call_module" and node.target == "2":
            node.replace_all_uses_with(node.args[0])
            ctx.gm.graph.erase_node(node)
        return None

    with pytest.raises(PassError, match="without a commit"):
        apply_rule(gm, direct)


def test_a_region_touching_a_mutated_tensor_is_not_rewritten():
    gm = traced(_conv_bn_net())
    conv = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "0")
    conv.meta[MUTATED_KEY] = True
    result = FoldBatchNorm()(gm)
    assert [f.where for f in result.folded] == ["4"]  # the other conv → BN still folds
    assert any(s.where == "1" and "mutated in place" in s.reason for s in result.skipped)


def test_fold_that_overflows_the_dtype_is_refused_not_a_bug():
    """float16 conv weights near the top of the range, doubled by a scale: the folded weight
    would be inf. The rewrite is refused (a plain skip, even under strict mode: no warning)."""

    class Doubled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1, bias=False).half()
            self.register_buffer("scale", torch.tensor([2.0, 3.0]).half().view(1, 2, 1, 1))
            with torch.no_grad():
                self.conv.weight.fill_(60000.0)

        def forward(self, x):
            return self.conv(x) * self.scale

    model = Doubled().eval()
    x = torch.full((1, 2, 3, 3), 1e-4, dtype=torch.float16)
    gm = traced(model, x)
    fixpoint = run_to_fixpoint(gm, default_pipeline(), strict=True)
    assert any("overflows torch.float16" in s.reason for s in fixpoint.skipped)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RewriteRejectedWarning)
        folded = repfx.fold(model, (x,), verify=False)
    report = folded.meta[repfx.REPORT_KEY]
    assert any("overflows torch.float16" in s.reason for s in report.skipped)
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_tells_every_non_finite_entry_and_every_overflowing_sum(dtype):
    big = torch.finfo(dtype).max / 2
    finite_sum_overflows = torch.full((64,), big, dtype=dtype)
    assert all_finite(finite_sum_overflows) and all_finite(torch.randn(5, 7).to(dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        value = torch.randn(5, 7).to(dtype)
        value[3, 2] = bad
        assert not all_finite(value)
    both_infinities = torch.tensor([float("inf"), -float("inf"), 1.0], dtype=dtype)
    assert not all_finite(both_infinities)


def test_probe_sizes_let_every_tap_read_data_in_both_parities():
    model = nn.Sequential(nn.Conv2d(2, 2, 5, stride=3, padding=2), nn.BatchNorm2d(2)).eval()
    gm = traced(model)
    from repfx.ir.graph import ConstantFolder
    from repfx.proof.region import collect_region

    nodes = [n for n in gm.graph.nodes if n.op == "call_module"]
    region = collect_region([nodes[1]], [nodes[0].args[0]], ConstantFolder(gm))
    first, second = probe_sizes(gm, region)
    assert min(first + second) >= _tap_coverage(5, 1, 2, 3) == 4  # 3 would miss taps 0 and 1
    assert {first[0] % 2, second[0] % 2} == {0, 1}
    assert first[0] % 3 != 0  # the odd size is not a multiple of the stride


def test_every_fold_of_every_pass_went_through_a_commit(monkeypatch):
    from collections import Counter

    from repfx.models import create
    from repfx.passes import base

    calls: Counter[str] = Counter()
    original = base.FoldContext.commit

    def counting(self, rule, *args, **kwargs):
        outcome = original(self, rule, *args, **kwargs)
        calls[rule] += isinstance(outcome, Folded)
        return outcome

    monkeypatch.setattr(base.FoldContext, "commit", counting)
    folds: Counter[str] = Counter()
    for name in ("riformer_tiny", "repvgg_tiny", "dbb_tiny", "acnet_tiny", "mobileone_tiny"):
        x = torch.randn(1, 3, 32, 32)
        folded = repfx.fold(_randomised(create(name)), (x,), verify=False)
        folds += Counter(f.rule for f in folded.meta[repfx.REPORT_KEY].folded)
    assert folds == calls
    exercised = {
        "precompute_constants", "cleanup", "fold_bn", "fold_affine_mixer",
        "fold_channel_affine", "merge_branches", "absorb_padding", "merge_sequential",
    }  # fmt: skip
    assert exercised <= set(folds) <= {p.name for p in default_pipeline()}


def _outer_taps_wrong(weight, bias, affine):
    """``algebra.fold_affine_into_conv_output`` with the kernel's corner taps doubled: wrong
    only where an output reads a corner tap within the input."""
    w, b = algebra.fold_affine_into_conv_output(weight, bias, affine)
    w = w.clone()
    w[..., 0, 0] *= 2
    w[..., -1, -1] *= 2
    return w, b


@pytest.mark.parametrize("example_size", [4, 32])
def test_a_fold_wrong_only_at_a_dilated_conv_s_outer_taps_is_refused(monkeypatch, example_size):
    """The probes are large enough for every tap of a dilated conv to read data, whether the
    example input is smaller than the kernel's extent or not."""
    monkeypatch.setattr(absorb_module, "fold_affine_into_conv_output", _outer_taps_wrong)
    model = _randomised(nn.Sequential(nn.Conv2d(2, 3, 3, padding=6, dilation=6), nn.BatchNorm2d(3)))
    gm = traced(model, torch.randn(1, 2, example_size, example_size))
    with pytest.raises(RewriteRejected, match="rejected by local validation"):
        run_to_fixpoint(gm, default_pipeline(), strict=True)


def test_probe_sizes_let_every_tap_read_data_at_no_more_than_the_window_s_extent():
    for k, d, p, s in itertools.product((1, 2, 3, 5), (1, 2, 6), (0, 1, 2, 6, 12), (1, 2, 3)):
        extent = d * (k - 1) + 1
        n = _tap_coverage(k, d, p, s)
        assert 1 <= n <= extent + s - 1
        ones = torch.ones(1, 1, n)
        for tap in range(k):
            weight = torch.zeros(1, 1, k)
            weight[..., tap] = 1  # the output reads only this tap
            out = torch.nn.functional.conv1d(ones, weight, stride=s, padding=p, dilation=d)
            assert out.sum() > 0, (k, d, p, s, tap)  # some output reads it within the input


class _ScaledLinear(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc = nn.Linear(c, c)
        self.gamma = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return self.fc(x) * self.gamma


@pytest.mark.parametrize("layout", ["channels first", "channels last"])
def test_probes_shrink_spatial_dims_that_happen_to_equal_the_channel_count(monkeypatch, layout):
    """efficientnet's first stage holds 144 channels at 144×144: only the channel dim may keep
    its size, or every proof there runs at full resolution. A wrong fold there is still found."""
    from repfx.passes import base

    c = 12
    if layout == "channels first":
        model = nn.Sequential(nn.Conv2d(c, c, 3, stride=2, padding=1), nn.BatchNorm2d(c))
        x = torch.randn(1, c, c, c)
        channel_dim = 1
    else:
        model = _ScaledLinear(c)
        x = torch.randn(1, c, c, c)
        channel_dim = 3
    model = redraw_foldable_parameters_(model.eval(), seed=2)
    shapes: list[tuple[int, ...]] = []
    original = base.prove_before

    def spying(gm, outputs, inputs, consts):
        proof = original(gm, outputs, inputs, consts)
        shapes.extend(tuple(v.shape) for p in proof.probes for v in p.feeds.values())
        return proof

    monkeypatch.setattr(base, "prove_before", spying)
    folded = repfx.fold(model, (x,))
    assert shapes
    for shape in shapes:
        assert shape[channel_dim] == c
        assert all(d < c for i, d in enumerate(shape) if i not in (0, channel_dim))
    fresh = torch.randn(3, c, c + 2, c) if channel_dim == 1 else torch.randn(3, 5, 7, c)
    with torch.no_grad():
        assert_close(folded(fresh), model(fresh))


class RandomMask(nn.Module):
    def forward(self, x):
        return x * torch.bernoulli(torch.full_like(x, 0.5))


def test_a_region_that_draws_random_numbers_cannot_be_proven_and_leaves_the_random_state():
    """Two evaluations of ``x · bernoulli(p)`` differ: the commit point refuses to prove any
    rewrite of it (a refusal, not a rejected rewrite), and its attempt draws nothing from the
    caller's generator."""
    gm = fx.symbolic_trace(RandomMask())
    x, *_, mul, _output = gm.graph.nodes
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with pytest.raises(ValidationFailure, match=r"draws random numbers \(bernoulli"):
        prove_before(gm, [mul], [x], ConstantFolder(gm))
    assert torch.equal(torch.get_rng_state(), state)
