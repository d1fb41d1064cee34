"""The verifier: every output on its own scale, NaN / Inf parity, structure mismatches as failed
verifications, a float64 re-check judged by the model's own float64 sensitivity, and a second
verification on a copy whose foldable parameters are re-drawn at O(1).

Wrong "folds" are made by hand: a module written to differ from the original, or a pass that
rewrites the graph without the commit point (so nothing but the verifier stands in its way).
"""

from __future__ import annotations

import copy
import dataclasses
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

import repfx
from repfx.passes.base import NodeRule, Pass, PassResult, PipelineState, Region
from repfx.proof.redraw import redraw_foldable_parameters_
from repfx.proof.tolerances import RELATIVE_TOLERANCE, max_errors, tolerance_for
from repfx.proof.verify import verify
from repfx.report.fold_report import (
    AS_GIVEN,
    DISCONTINUOUS,
    FAILED,
    ILL_CONDITIONED,
    OK,
    REDRAWN,
    Folded,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _set_(t: torch.Tensor, values: torch.Tensor) -> None:
    with torch.no_grad():
        t.copy_(values)


# ------------------------------------------------------------------ hand-made wrong folds


class TwoScales(nn.Module):
    """Two outputs of very different scales: ``(1e6 · conv(x), conv(x))``."""

    def __init__(self, wrong_small: float = 0.0):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.wrong_small = wrong_small

    def forward(self, x):
        y = self.conv(x)
        return 1e6 * y, y * (1 + self.wrong_small)


class Returns(nn.Module):
    """Returns whatever ``fn`` makes of the input (a hand-made "fold")."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Scaled(nn.Module):
    """A copy of ``inner`` whose output is multiplied by ``factor`` (a hand-made "fold")."""

    def __init__(self, inner: nn.Module, factor: float):
        super().__init__()
        self.inner, self.factor = copy.deepcopy(inner), factor

    def forward(self, x):
        return self.inner(x) * self.factor


class Pair(nn.Module):
    """Two heads on one input: ``(first(x), second(x))``."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return self.first(x), self.second(x)


class DropBatchNorm(Pass):
    """A wrong "fold": deletes every BatchNorm call (exact only on identity statistics)."""

    name = "drop_batch_norm"

    def __call__(self, gm: fx.GraphModule, state: PipelineState | None = None) -> PassResult:
        dropped = []
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _BatchNorm):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                dropped.append(Folded(self.name, node.target, "dropped"))
        gm.recompile()
        return PassResult(modified=bool(dropped), folded=dropped)


class DropLastModule(Pass):
    """A wrong "fold" that changes the output's shape: the last module call is skipped."""

    name = "drop_last_module"

    def __call__(self, gm: fx.GraphModule, state: PipelineState | None = None) -> PassResult:
        calls = [n for n in gm.graph.nodes if n.op == "call_module"]
        if len(calls) < 2:
            return PassResult(modified=False)
        last = calls[-1]
        last.replace_all_uses_with(last.args[0])
        gm.graph.erase_node(last)
        gm.recompile()
        return PassResult(modified=True, folded=[Folded(self.name, last.target, "dropped")])


# ------------------------------------------------------------------ max_errors, tolerances


def test_max_errors_is_the_max_not_the_mean():
    expected = torch.zeros(1000)
    expected[0] = 2.0
    actual = expected.clone()
    actual[500] = 1.0  # one element off by 1 among 1000: the mean error would be 1e-3
    assert max_errors(actual, expected) == (1.0, 0.5)


def test_max_errors_judges_each_output_on_its_own_scale():
    big, small = torch.full((4,), 1e6), torch.ones(4)
    abs_err, rel_err = max_errors((big, small * 1.01), (big, small))
    assert rel_err == pytest.approx(0.01)  # pooled, it would be 1e-8
    assert abs_err == pytest.approx(0.01)


def test_max_errors_nan_and_inf_parity():
    e = torch.tensor([1.0, float("nan"), float("inf")])
    assert max_errors(e.clone(), e) == (0.0, 0.0)  # NaN and Inf at the same positions: fine
    assert max_errors(torch.tensor([float("nan"), 1.0, float("inf")]), e)[1] == float("inf")
    assert max_errors(torch.tensor([1.0, float("nan"), -float("inf")]), e)[1] == float("inf")


def test_float32_tolerance_is_1e_5_and_a_1e_4_error_fails():
    assert RELATIVE_TOLERANCE[torch.float32] == tolerance_for(torch.float32) == 1e-5
    lin = nn.Linear(8, 8).eval()
    x = torch.randn(4, 8, generator=_gen(0))
    off_by_1e4 = Scaled(lin, 1 + 1e-4)
    # the float64 re-check cannot rescue it: the original rounds far less than 1e-4
    failed = verify(lin, off_by_1e4, (x,), refold=lambda m: m)
    assert not failed.passed and failed.outputs[0].verdict == FAILED
    assert failed.outputs[0].recheck is not None
    assert verify(lin, Scaled(lin, 1 + 5e-6), (x,)).passed


# ------------------------------------------------------------------ per output, parity, structure


def test_a_1e6_scale_output_does_not_hide_a_wrong_small_output():
    model = TwoScales().eval()
    wrong = copy.deepcopy(model)
    wrong.wrong_small = 1e-3  # off by 1e-3 of its own scale, 1e-9 of the pooled scale
    x = torch.randn(2, 3, 8, 8, generator=_gen(0))
    result = verify(model, wrong, (x,), refold=lambda m: m)
    assert not result.passed
    assert [(o.path, o.verdict) for o in result.outputs] == [("[0]", OK), ("[1]", FAILED)]
    assert result.outputs[1].rel_error == pytest.approx(1e-3, rel=1e-2)
    assert verify(model, copy.deepcopy(model), (x,)).passed


def test_nan_parity():
    x = torch.tensor([[-1.0, 0.0, 1.0, 4.0]])
    model = Returns(torch.sqrt)  # NaN at -1
    assert verify(model, Returns(lambda t: torch.sqrt(t) * 1.0), (x,)).passed  # same NaN
    extra_nan = Returns(lambda t: torch.where(t > 3, float("nan"), torch.sqrt(t)))
    result = verify(model, extra_nan, (x,))
    assert not result.passed and result.outputs[0].nonfinite_mismatches == 1
    assert "NaN / Inf" in result.outputs[0].problem
    no_nan = Returns(lambda t: torch.sqrt(t.abs()))
    assert not verify(model, no_nan, (x,)).passed
    flipped_inf = Returns(lambda t: -1 / t)  # the original is 1 / t: +inf at 0, this -inf
    assert not verify(Returns(lambda t: 1 / t), flipped_inf, (x,)).passed


def test_non_floating_outputs_are_compared_exactly():
    x = torch.tensor([1.0, 2.0, 3.0])
    model = Returns(lambda t: (t * 2).long())
    result = verify(model, Returns(lambda t: (t * 2).long() + (t > 2)), (x,))
    assert not result.passed and result.outputs[0].tolerance == 0
    assert verify(model, Returns(lambda t: (t + t).long()), (x,)).passed


def test_shape_mismatch_is_a_verification_error_not_a_value_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 1)).eval()
    x = torch.randn(1, 3, 8, 8, generator=_gen(0))
    with pytest.raises(repfx.VerificationError) as info:
        repfx.fold(model, (x,), passes=[DropLastModule()])
    output = info.value.report.verification.outputs[0]
    assert output.verdict == FAILED and "(1, 4, 6, 6)" in output.problem
    assert "(1, 8, 6, 6)" in output.problem


def test_dtype_and_structure_mismatches_fail():
    x = torch.randn(2, 4, generator=_gen(0))
    model = Returns(lambda t: (t, t + 1))
    assert (
        "float64"
        in verify(model, Returns(lambda t: (t, (t + 1).double())), (x,)).outputs[1].problem
    )
    fewer = verify(model, Returns(lambda t: (t,)), (x,))
    assert not fewer.passed and "1 output leaves, the original 2" in fewer.problem
    as_list = verify(model, Returns(lambda t: [t, t + 1]), (x,))
    assert not as_list.passed and "structure" in as_list.problem


# ------------------------------------------------------------------ float64 re-check


def ill_conditioned_chain(depth: int = 4, width: int = 16, shift: float = 1e7) -> nn.Module:
    """1×1 conv → BatchNorm2d → GroupNorm(1), ``depth`` times. Each BN adds the same ``shift``
    to every channel, which the GroupNorm cancels: rounding at the scale of the shift is
    amplified ``shift``-fold (float32 keeps nothing of the signal; float64 keeps ~1e-9).
    Parameters O(1)."""
    g = _gen(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        conv, bn = nn.Conv2d(width, width, 1), nn.BatchNorm2d(width)
        _set_(conv.weight, torch.randn(width, width, 1, 1, generator=g) / width**0.5)
        _set_(conv.bias, torch.randn(width, generator=g))
        _set_(bn.running_mean, 0.3 * torch.randn(width, generator=g))
        _set_(bn.running_var, 0.5 + torch.rand(width, generator=g))
        _set_(bn.weight, 1 + 0.5 * torch.randn(width, generator=g))
        _set_(bn.bias, shift + 0.3 * torch.randn(width, generator=g))
        layers += [conv, bn, nn.GroupNorm(1, width)]
    return nn.Sequential(*layers).eval()


def _chain_input() -> torch.Tensor:
    return torch.randn(2, 16, 3, 3, generator=_gen(1))


def test_ill_conditioned_correct_fold_passes_and_says_why():
    model = ill_conditioned_chain()
    x = _chain_input()
    folded = repfx.fold(model, (x,))
    report = folded.meta["repfx_report"]
    assert report.counts() == {"fold_bn": 4}
    output = report.verification.outputs[0]
    assert output.rel_error > 1e-2  # float32 keeps nothing of the signal, for the original too
    assert output.verdict == ILL_CONDITIONED and report.verification.passed
    recheck = output.recheck
    # the float64 fold is off by more than a fixed 1e-10 (which raised a false alarm) and
    # within the multiple of the model's own float64 sensitivity
    assert 1e-10 < recheck.fold_error <= recheck.criterion
    assert recheck.sensitivity is not None and recheck.criterion < 1e-6
    text = str(report)
    assert "the float32 difference is explained by ill-conditioning" in text
    assert "verification ok (as given)" in text


def test_wrong_fold_of_an_ill_conditioned_model_still_fails():
    model = ill_conditioned_chain()
    x = _chain_input()
    with pytest.raises(repfx.VerificationError) as info:
        repfx.fold(model, (x,), passes=[DropBatchNorm()])
    recheck = info.value.report.verification.outputs[0].recheck
    assert recheck.fold_error > 0.1 and recheck.criterion < 1e-6


def test_float64_sensitivity_is_per_output():
    """An ill-conditioned output lends no slack to a well-conditioned, wrong one."""
    chain = ill_conditioned_chain().double()
    x = _chain_input().double()
    folded_chain = repfx.fold(chain, (x,), verify=False)
    assert folded_chain.meta["repfx_report"].counts() == {"fold_bn": 4}
    lin = nn.Conv2d(16, 16, 1).double().eval()
    model = Pair(chain, lin)
    wrong = Pair(folded_chain, Scaled(lin, 1 + 1e-8))
    result = verify(model, wrong, (x,))
    chain_out, lin_out = result.outputs
    assert chain_out.verdict == ILL_CONDITIONED and chain_out.recheck.fold_error > 1e-10
    assert lin_out.verdict == FAILED
    assert lin_out.rel_error < chain_out.recheck.criterion  # a pooled criterion would pass it
    assert lin_out.recheck.criterion == RELATIVE_TOLERANCE[torch.float64]


# ------------------------------------------------------------------ low precision


def test_float16_fold_with_an_inf_weight_fails():
    lin = nn.Linear(4, 4).half().eval()
    broken = copy.deepcopy(lin)
    _set_(broken.weight[0, 0], torch.tensor(float("inf")))
    x = torch.randn(3, 4, generator=_gen(0)).half()
    result = verify(lin, broken, (x,), refold=lambda m: m)
    assert not result.passed and result.outputs[0].nonfinite_mismatches > 0


def test_low_precision_fallback_compares_against_float64_truth():
    """A float16 fold whose weights are 5% off: the float64 fold is exact, but the stored
    weights are off float64 truth far beyond what float16 rounding of the original explains —
    though not beyond the fold's own error, which must not be the yardstick."""
    lin = nn.Linear(16, 16).half().eval()
    off = copy.deepcopy(lin)
    _set_(off.weight, lin.weight * 1.05)
    x = torch.randn(8, 16, generator=_gen(0)).half()
    result = verify(lin, off, (x,), refold=lambda m: m)  # the float64 model is its own fold
    output = result.outputs[0]
    assert output.verdict == FAILED and output.recheck is not None
    r = output.recheck
    assert r.fold_error == 0.0
    assert r.weight_rounding > r.rounding_criterion
    assert r.weight_rounding <= 16 * r.folded_rounding  # against its own error it would pass


# ------------------------------------------------------------------ re-drawn parameters


def test_fold_wrong_only_off_identity_parameters_fails_through_the_redrawn_check():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()  # fresh BN
    x = torch.randn(2, 3, 8, 8, generator=_gen(0))
    passes = [DropBatchNorm()]
    unchecked = repfx.fold(model, (x,), passes=passes, verify_redrawn=False)
    assert unchecked.meta["repfx_report"].verification.passed  # identity BN: dropping it "works"
    with pytest.raises(repfx.VerificationError) as info:
        repfx.fold(model, (x,), passes=passes)
    report = info.value.report
    assert report.verification.passed and not report.redrawn_verification.passed
    assert report.failed_verification().label == REDRAWN
    assert "verification FAILED (re-drawn parameters)" in str(info.value)


@dataclasses.dataclass
class _Matched:
    node: fx.Node


class CommittedDropBatchNorm(NodeRule):
    """The same wrong "fold" as a rule through the commit point: proven wherever the statistics
    are the identity, refused elsewhere."""

    name = "committed_drop_batch_norm"
    words = ("dropped", "batch norm")

    def match(self, ctx, node):
        if node.op == "call_module" and isinstance(ctx.gm.get_submodule(node.target), _BatchNorm):
            return _Matched(node)
        return None

    def region(self, ctx, candidate):
        return Region([candidate.node], [candidate.node.args[0]])

    def rewrite(self, ctx, candidate):
        node = candidate.node
        source = node.args[0]
        node.replace_all_uses_with(source)
        ctx.gm.graph.erase_node(node)
        return [source], "dropped"


def test_the_redrawn_fold_repeats_the_rewrites_of_the_fold_it_checks():
    """A rewrite the commit point proved only because the given values hid the difference
    (identity statistics) is judged on re-drawn values, not refused there and forgotten."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()  # fresh BN
    x = torch.randn(2, 3, 8, 8, generator=_gen(0))
    with pytest.raises(repfx.VerificationError) as info:
        repfx.fold(model, (x,), passes=[CommittedDropBatchNorm()])
    report = info.value.report
    assert [f.rule for f in report.folded] == ["committed_drop_batch_norm"]
    assert report.verification.passed and not report.redrawn_verification.passed


class _ScalesByCalls(nn.Module):
    """Scales by how often it was called: state that changes on every call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.conv(x) * self.calls


class DropTensorScales(Pass):
    """A wrong "fold": drops every multiply by a tensor — exact while that tensor is 1 (on the
    first call of a fresh ``_ScalesByCalls``), wrong from the second call on."""

    name = "drop_tensor_scales"

    def __call__(self, gm: fx.GraphModule, state: PipelineState | None = None) -> PassResult:
        dropped = []
        for node in list(gm.graph.nodes):
            if node.target in (operator.mul, torch.mul) and isinstance(node.args[1], fx.Node):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                dropped.append(Folded(self.name, node.name, "dropped"))
        gm.recompile()
        return PassResult(modified=bool(dropped), folded=dropped)


def test_a_fold_that_may_write_is_compared_on_a_second_call_too():
    model, x = _ScalesByCalls().eval(), torch.randn(2, 3, 5, 5, generator=_gen(0))
    with pytest.raises(repfx.VerificationError) as info:
        repfx.fold(model, (x,), passes=[DropTensorScales()], verify_redrawn=False)
    check = info.value.report.verification
    assert check.calls == 2 and not check.passed
    assert [c.path for c in check.outputs if not c.passed] == ["output (second call)"]
    assert "over 2 calls" in check.summary()
    assert float(model.calls) == 0  # (verification ran copies)


def test_a_fold_that_writes_nothing_is_compared_on_one_call():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    report = repfx.fold(model, (torch.randn(2, 3, 8, 8, generator=_gen(0)),)).meta["repfx_report"]
    assert report.verification.calls == 1 and report.verification.passed


def test_both_verifications_are_reported_one_line_each_when_all_pass():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8, generator=_gen(0))
    report = repfx.fold(model, (x,)).meta["repfx_report"]
    assert report.verification.label == AS_GIVEN and report.redrawn_verification.label == REDRAWN
    lines = [line for line in str(report).splitlines() if line.startswith("  verification")]
    assert len(lines) == 2
    assert lines[0].startswith("  verification ok (as given): 1 output")
    assert lines[1].startswith("  verification ok (re-drawn parameters): 1 output")


class _ProbabilityGate(nn.Module):
    """Reads a per-channel parameter as a probability: re-drawn at O(1) it leaves [0, 1]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.bn = nn.BatchNorm2d(channels)  # a fold that reads parameters: the re-draw runs
        self.keep = nn.Parameter(torch.ones(channels))  # bernoulli(1) = 1: deterministic

    def forward(self, x):
        return self.bn(self.conv(x)) * torch.bernoulli(self.keep)[:, None, None]


def test_a_model_that_redrawing_breaks_is_verified_as_given_and_says_so():
    model = _ProbabilityGate(8).eval()
    x = torch.randn(2, 8, 5, 5, generator=_gen(0))
    report = repfx.fold(model, (x,)).meta["repfx_report"]
    assert report.verification.passed and report.redrawn_verification is None
    note = next(n for n in report.notes if "re-drawn" in n)
    assert "parameters as given only" in note and "RuntimeError" in note


def test_fold_without_inputs_says_nothing_was_verified():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    report = repfx.fold(model, verify=True).meta["repfx_report"]
    assert report.verification is None and report.redrawn_verification is None
    assert any("nothing was verified" in note for note in report.notes)
    assert "verification: none, nothing was verified" in str(report)


class Gamma(nn.Module):
    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.gamma = nn.Parameter(torch.full(shape, 1e-5))

    def forward(self, x):
        return x * self.gamma


def _redraw_zoo() -> nn.Module:
    return nn.ModuleDict(
        {
            "conv": nn.Conv2d(3, 8, 3),
            "bn": nn.BatchNorm2d(8),
            "ln": nn.LayerNorm(8),
            "gn": nn.GroupNorm(2, 8),
            "rms": nn.RMSNorm(8),
            "layer_scale": Gamma((8,)),
            "scale_c11": Gamma((8, 1, 1)),
            "scale_1c11": Gamma((1, 8, 1, 1)),
            "linear": nn.Linear(8, 8),
            "embedding": nn.Embedding(10, 8),
            "pos": Gamma((1, 4, 8)),  # two dimensions above 1: not a per-channel parameter
        }
    )


def test_redraw_reaches_everything_a_fold_moves_and_nothing_else():
    torch.manual_seed(0)
    before = _redraw_zoo()
    for m in (before.conv, before.linear):
        nn.init.zeros_(m.bias)
    after = redraw_foldable_parameters_(copy.deepcopy(before), seed=3)
    state_before, state_after = before.state_dict(), after.state_dict()
    kept = {"conv.weight", "linear.weight", "embedding.weight", "pos.gamma"}
    kept.add("bn.num_batches_tracked")
    for key, value in state_before.items():
        assert torch.equal(value, state_after[key]) == (key in kept), key
    assert float(after.bn.running_var.min()) >= 0.5
    assert float(after.bn.running_mean.abs().max()) > 0.1  # no longer identity statistics
    assert float((after.layer_scale.gamma.detach() - 1).abs().max()) > 0.1  # O(1), not 1e-5
    again = redraw_foldable_parameters_(copy.deepcopy(before), seed=3).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in state_after.items())
    other = redraw_foldable_parameters_(copy.deepcopy(before), seed=4).state_dict()
    assert not torch.equal(other["bn.weight"], state_after["bn.weight"])


class TiedLabels(nn.Module):
    """Features and their argmax over two channels; ``tie`` makes the channels equal."""

    def __init__(self, tie: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        if tie:
            with torch.no_grad():
                self.conv.weight[1] = self.conv.weight[0]
                self.conv.bias[1] = self.conv.bias[0]

    def forward(self, x):
        y = self.conv(x)
        return y, y.argmax(1)


def _rounded_copy(model: TiedLabels) -> TiedLabels:
    """The model with its second channel's weights moved by one float32 ulp: what a correct
    fold's rounding does."""
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        copy_.conv.weight[1] *= 1 + torch.finfo(torch.float32).eps
    return copy_


def _swapped(model: TiedLabels) -> TiedLabels:
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        copy_.conv.weight.copy_(copy_.conv.weight.flip(0))
        copy_.conv.bias.copy_(copy_.conv.bias.flip(0))
    return copy_


def test_labels_at_a_tie_are_not_verifiable_rather_than_failed():
    torch.manual_seed(0)
    model, x = TiedLabels(tie=True), (torch.randn(2, 3, 4, 4),)
    result = verify(model, _rounded_copy(model), x, refold=lambda m64: m64)
    features, labels = result.outputs
    assert features.verdict == OK
    assert labels.verdict == DISCONTINUOUS and labels.recheck.discontinuous
    assert result.passed and "1 not verifiable" in result.summary()


def test_wrong_labels_without_a_tie_still_fail():
    torch.manual_seed(0)
    model, x = TiedLabels(tie=False), (torch.randn(2, 3, 4, 4),)
    result = verify(model, _swapped(model), x, refold=_swapped)
    assert not result.passed
    assert [o.verdict for o in result.outputs] == [FAILED, FAILED]


CALLS = {"count": 0}


class CountsItsCalls(nn.Module):
    """Scales by how often any of its kind ran (global state, which no copy resets): no two
    runs agree, perturbed or not."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        CALLS["count"] += 1
        return self.conv(x) * CALLS["count"]


def test_a_model_whose_runs_disagree_fails_rather_than_being_called_discontinuous():
    torch.manual_seed(0)
    with pytest.raises(repfx.VerificationError) as info:
        repfx.fold(CountsItsCalls(), torch.randn(2, 3, 4, 4))
    outputs = info.value.report.failed_verification().outputs
    assert [o.verdict for o in outputs] == [FAILED]


class Cache:
    """An object torch's pytree does not know, holding tensors (a HuggingFace cache)."""

    def __init__(self, keys: list[torch.Tensor], step: int):
        self.keys, self.step = keys, step


class ReturnsCache(nn.Module):
    def __init__(self, shift: float = 0.0):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.shift = shift

    def forward(self, x):
        y = self.proj(x)
        return {"out": y, "cache": Cache([y * 2 + self.shift, y.sum(-1)], step=3)}


def test_an_object_holding_tensors_is_compared_by_its_tensors():
    model, x = ReturnsCache().eval(), torch.randn(2, 4)
    same = copy.deepcopy(model)
    assert verify(model, same, (x,)).passed
    off = copy.deepcopy(model)
    off.shift = 1e-3  # only the cache's first tensor differs
    result = verify(model, off, (x,))
    assert not result.passed
    failed = [c.path for c in result.outputs if c.verdict == FAILED]
    assert len(failed) == 1 and "keys" in failed[0] and "Cache" in failed[0]


class _FunctionalScaledConv(nn.Module):
    """A conv and a per-channel scale as plain tensors read through attributes (constants of
    the graph, not module calls)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3, generator=_gen(5)))
        self.gamma = nn.Parameter(torch.ones(8))  # 1 as initialised: a dropped scale "works"

    def forward(self, x):
        return F.conv2d(x, self.weight) * self.gamma.view(1, -1, 1, 1)


def test_the_redrawn_check_is_skipped_only_when_no_fold_read_a_parameter():
    x = torch.randn(2, 3, 8, 8, generator=_gen(0))
    free = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Identity(), nn.Dropout(0.3), nn.ReLU()).eval()
    report = repfx.fold(free, (x,)).meta["repfx_report"]
    assert report.folded and not any(f.reads_state for f in report.folded)
    assert report.verification.passed and report.redrawn_verification is None
    assert any("no fold read a parameter or buffer" in note for note in report.notes)
    for model in (
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Identity()).eval(),
        _FunctionalScaledConv().eval(),
    ):
        report = repfx.fold(model, (x,)).meta["repfx_report"]
        reading = [f for f in report.folded if f.reads_state]
        assert reading and all(f.rule != "cleanup" for f in reading)
        assert report.redrawn_verification is not None and report.redrawn_verification.passed


class _CastsBack(nn.Module):
    """Computes part of its forward in float32 and casts back to its input's dtype: torch.export
    records an assertion of the captured dtype before each cast."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return (self.bn(self.conv(x)).float() * 2).to(x.dtype)


def test_the_float64_recheck_runs_an_exported_low_precision_fold(monkeypatch):
    """The re-check evaluates the stored fold in float64: an exported graph's assertions of its
    bfloat16 dtypes must not stop it (it reported 'could not run', a failed verification)."""
    import repfx.proof.verify as verify_module

    model = redraw_foldable_parameters_(_CastsBack(), seed=2).eval().to(torch.bfloat16)
    x = torch.randn(2, 3, 6, 6, generator=_gen(0)).to(torch.bfloat16)
    folded = repfx.fold(model, (x,), capture="export", verify=False)
    assert any("assert_tensor_metadata" in str(n.target) for n in folded.graph.nodes)
    # every output misses its tolerance, so every one is re-checked
    monkeypatch.setattr(verify_module, "tolerance_for", lambda dtype: 0.0)
    refold = lambda m: repfx.fold(m, (x.double(),), capture="export", verify=False)  # noqa: E731
    check = verify(model, folded, (x,), refold)
    assert check.passed, check.summary()
    assert all(c.verdict == ILL_CONDITIONED for c in check.outputs)
    assert all(c.recheck.weight_rounding is not None for c in check.outputs)


def test_the_float64_refold_replays_the_rewrites_its_fold_proved(monkeypatch):
    """The re-check's float64 fold repeats the fold it re-checks: every rewrite that fold proved
    is applied without proving it again (passes.base: PipelineState.proven), and the result is
    still judged against float64 truth."""
    import repfx.proof.verify as verify_module
    from repfx.passes import base

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
    )
    model = redraw_foldable_parameters_(model, seed=2).eval()
    proved: list[torch.dtype] = []
    original = base.prove_before

    def spying(gm, outputs, inputs, consts):
        proof = original(gm, outputs, inputs, consts)
        proved.append(next(gm.parameters()).dtype)
        return proof

    monkeypatch.setattr(base, "prove_before", spying)
    # every output misses its tolerance, so both verifications re-check in float64
    monkeypatch.setattr(verify_module, "tolerance_for", lambda dtype: 0.0)
    x = torch.randn(2, 3, 8, 8, generator=_gen(0))
    report = repfx.fold(model, (x,)).meta["repfx_report"]
    assert report.verification.passed and report.redrawn_verification.passed
    rechecked = [*report.verification.outputs, *report.redrawn_verification.outputs]
    assert all(c.verdict == ILL_CONDITIONED for c in rechecked)
    assert proved and torch.float64 not in proved  # the two float64 folds proved nothing again
