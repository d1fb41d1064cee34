"""``torch.compile(model, backend="repfx")``: the same passes, inside the PT2 stack."""

from __future__ import annotations

import copy

import pytest
import torch
from grammar import ParallelBranches, Seq, randomise_
from torch import nn

import repfx
from repfx.dynamo import DynamoBackend, compile_backend, repfx_backend
from repfx.models import create
from repfx.passes.fold_bn import FoldBatchNorm
from repfx.testing import assert_close


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _random(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomise_(model, torch.Generator().manual_seed(seed)).eval()


def _repvgg_like() -> nn.Module:
    def block(c):
        return ParallelBranches(
            [
                Seq(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)),
                Seq(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)),
                nn.BatchNorm2d(c),
            ],
            [1.0, 1.0, 1.0],
        )

    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), block(8), nn.ReLU(), block(8), nn.ReLU())


class ResNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = Seq(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.conv1 = Seq(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.conv2 = Seq(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


MODELS = {
    "riformer": lambda: create("riformer_tiny", num_classes=10),
    "repvgg": _repvgg_like,
    "resnet": ResNetLike,
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_eval_model_matches_eager_and_reports_folds(name):
    model = _random(MODELS[name]())
    backend = compile_backend(inner="eager")
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(compiled(x), model(x))
    folded = backend.reports[-1].counts()
    assert folded, "nothing was folded"
    if name == "repvgg":
        assert folded["merge_branches"] >= 2
    else:
        assert sum(folded.values()) >= 2


def test_frozen_parameters_fold_even_with_grad_enabled():
    model = _random(_repvgg_like()).requires_grad_(False)
    backend = compile_backend(inner="eager")
    x = torch.randn(2, 3, 16, 16)
    assert_close(torch.compile(model, backend=backend)(x), model(x))
    assert backend.reports[-1].counts()["merge_branches"] >= 2


def test_training_mode_folds_nothing_and_gradients_are_right():
    model = _random(ResNetLike()).train()
    reference = copy.deepcopy(model)
    backend = compile_backend(inner="eager")
    x = torch.randn(4, 3, 8, 8)
    torch.compile(model, backend=backend)(x).square().sum().backward()
    reference(x).square().sum().backward()
    assert backend.reports[-1].folded == []
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None, name
        assert_close(p.grad, q.grad)
    # running statistics were updated by the compiled training step, as in eager mode
    for b, c in zip(model.buffers(), reference.buffers(), strict=True):
        assert_close(b, c)


def test_switching_to_eval_recompiles_and_folds():
    model = _random(ResNetLike()).train()
    backend = compile_backend(inner="eager")
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(2, 3, 8, 8)
    compiled(x)
    model.eval()
    with torch.no_grad():
        assert_close(compiled(x), model(x))
    assert backend.reports[0].folded == [] and backend.reports[-1].counts()["fold_bn"] == 3


def test_new_batch_sizes_stay_correct():
    model = _random(create("riformer_tiny", num_classes=10))
    compiled = torch.compile(model, backend=compile_backend(inner="eager"), dynamic=True)
    with torch.no_grad():
        for batch in (2, 3, 5):
            x = torch.randn(batch, 3, 32, 32)
            assert_close(compiled(x), model(x))


def test_the_backend_runs_the_shared_passes(monkeypatch):
    """One implementation of each fold: the backend calls repfx.passes, as repfx.fold does."""
    calls = []
    original = FoldBatchNorm.__call__
    monkeypatch.setattr(
        FoldBatchNorm,
        "__call__",
        lambda self, gm, state=None: calls.append(gm) or original(self, gm, state),
    )
    model = _random(ResNetLike())
    with torch.no_grad():
        torch.compile(model, backend=compile_backend(inner="eager"))(torch.randn(1, 3, 8, 8))
    assert calls, "the backend did not run the shared fold_bn pass"
    assert DynamoBackend().passes is repfx.passes.default_pipeline


def test_backend_name_is_registered():
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("repfx") is repfx_backend


@pytest.mark.slow
def test_inductor_runs_the_folded_graph():
    model = _random(create("riformer_tiny", num_classes=10))
    backend = compile_backend(inner="inductor")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(torch.compile(model, backend=backend)(x), model(x))
    assert backend.reports[-1].counts()["fold_channel_affine"] > 0


def test_grad_mode_switch_recompiles_without_freezing_parameters_that_need_grad():
    model = _random(_repvgg_like())
    reference = copy.deepcopy(model)
    backend = compile_backend(inner="eager")
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_close(compiled(x), model(x))
    assert backend.reports[-1].counts()["merge_branches"] >= 2
    compiled(x).sum().backward()  # grad enabled now: a new graph, parameters stay inputs
    reference(x).sum().backward()
    assert backend.reports[-1].folded == []
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert_close(p.grad, q.grad)


def test_new_spatial_sizes_stay_correct():
    model = _random(_repvgg_like())
    compiled = torch.compile(model, backend=compile_backend(inner="eager"), dynamic=True)
    with torch.no_grad():
        for size in (12, 17, 24):
            x = torch.randn(2, 3, size, size + 3)
            assert_close(compiled(x), model(x))


def _conv_bn_relu_chain() -> nn.Module:
    """Frozen convs, trainable BNs (fine-tuning the norms): the convs' weights are constants
    to dynamo, the BNs' γ and β are graph inputs."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        nn.BatchNorm2d(4),
    )
    return _freeze_convs(_random(model))


def _freeze_convs(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.requires_grad_(False)
    return model


def _assert_same_values_and_gradients(model: nn.Module, compiled, x: torch.Tensor) -> None:
    reference = copy.deepcopy(model)
    out, expected = compiled(x), reference(x)
    assert_close(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert_close(p.grad, q.grad)


def test_eval_model_with_trainable_parameters_under_grad_is_exact():
    """The default use: an eval model whose parameters require grad, grad mode on. BN
    parameters arrive as graph inputs; no fold may treat them as constants or as absent."""
    model = _conv_bn_relu_chain()
    backend = compile_backend(inner="eager")
    _assert_same_values_and_gradients(model, torch.compile(model, backend=backend), _x())


def test_default_string_backend_under_grad_is_exact():
    model = _conv_bn_relu_chain()
    _assert_same_values_and_gradients(model, torch.compile(model, backend="repfx"), _x())


def test_timm_resnet_with_trainable_bn_under_grad_is_exact():
    timm = pytest.importorskip("timm")
    from timm_weights import redraw_foldable_parameters_

    model = redraw_foldable_parameters_(timm.create_model("resnet18", num_classes=10)).eval()
    _freeze_convs(model)
    backend = compile_backend(inner="eager")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _assert_same_values_and_gradients(model, torch.compile(model, backend=backend), x)


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 9, 10, generator=torch.Generator().manual_seed(0))


class RepVggBlock(nn.Module):
    """``relu(bn3(conv3(x)) + bn1(conv1(x)) + bn_id(x))``: the identity-BN branch reads the
    graph's input, whose rank only dynamo's fake tensors tell."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.bn_id = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)) + self.bn_id(x))


def test_dynamo_graphs_fold_identity_bn_branches_with_the_shapes_dynamo_knows():
    model = _random(nn.Sequential(*[RepVggBlock(8) for _ in range(3)]))
    backend = compile_backend(inner="eager")
    x = torch.randn(4, 8, 12, 12)
    with torch.no_grad():
        assert_close(torch.compile(model, backend=backend)(x), model(x))
    after = backend.reports[-1].after.ops
    assert after.get("batch_norm", 0) == 0
    assert after["conv"] == 3  # one conv per block, as repfx.fold makes
    folded = repfx.fold(model, (x,))
    assert after == {k: v for k, v in folded.meta[repfx.REPORT_KEY].after.ops.items() if v}


class BreaksInTheMiddle(nn.Module):
    """Two RepVGG blocks with a data-dependent branch between them: dynamo captures one graph
    before the break and one after it (two more for the two ways the branch goes)."""

    def __init__(self, channels: int):
        super().__init__()
        self.first = RepVggBlock(channels)
        self.second = RepVggBlock(channels)

    def forward(self, x):
        y = self.first(x)
        if y.mean() > 0.5:  # a graph break: the value decides which code runs
            y = y * 2.0
        return self.second(y)


def test_each_graph_around_a_graph_break_is_folded():
    model = _random(BreaksInTheMiddle(8))
    backend = compile_backend(inner="eager")
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        for sample in (x, x + 3.0):  # both ways through the branch
            assert_close(compiled(sample), model(sample))
    graphs = [r for r in backend.reports if r.before.ops.get("conv", 0)]
    assert len(graphs) >= 2, "expected graphs before and after the break"
    for report in graphs:
        assert report.after.ops.get("batch_norm", 0) == 0
        assert report.after.ops["conv"] == report.before.ops["conv"] // 2  # one conv per block


def test_a_backend_keeps_a_bounded_number_of_reports():
    backend = compile_backend(inner="eager", max_reports=2)
    with torch.no_grad():
        for size in (6, 7, 8, 9):  # a new static shape per call: a new graph each time
            torch.compile(_random(RepVggBlock(4)), backend=backend, dynamic=False)(
                torch.randn(1, 4, size, size)
            )
            torch._dynamo.reset()
    assert len(backend.reports) == 2


def test_the_string_backend_reports_are_reachable_and_logged(monkeypatch, caplog):
    from repfx import dynamo

    monkeypatch.setattr(dynamo._REGISTERED, "inner", "eager")  # inductor is slow to compile
    model = _random(RepVggBlock(4))
    x = torch.randn(2, 4, 6, 6)
    with caplog.at_level("INFO", logger="repfx.dynamo"), torch.no_grad():
        assert_close(torch.compile(model, backend="repfx")(x), model(x))
    report = dynamo.last_reports()[-1]
    assert report.after.ops["conv"] == 1 and report.after.ops.get("batch_norm", 0) == 0
    assert str(report) in caplog.text


class InPlaceResidual(nn.Module):
    """``y += shortcut`` (as timm's RepVGG block writes its identity branch), with a shortcut
    of another dtype when ``shortcut_dtype`` is given: the in-place add keeps ``y``'s dtype."""

    def __init__(self, channels: int, shortcut_dtype: torch.dtype | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.shortcut = nn.BatchNorm2d(channels)
        self.shortcut_dtype = shortcut_dtype

    def forward(self, x):
        y = self.bn(self.conv(x))
        shortcut = self.shortcut(x)
        if self.shortcut_dtype is not None:
            shortcut = shortcut.to(self.shortcut_dtype)
        y += shortcut
        return y


@pytest.mark.parametrize("shortcut_dtype", [None, torch.float64])
def test_in_place_residual_adds_merge_only_when_they_keep_the_dtype(shortcut_dtype):
    model = _random(InPlaceResidual(6, shortcut_dtype))
    backend = compile_backend(inner="eager")
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        got, want = torch.compile(model, backend=backend)(x), model(x)
    assert got.dtype == want.dtype == torch.float32
    assert_close(got, want)
    after = backend.reports[-1].after.ops
    if shortcut_dtype is None:  # one conv, as repfx.fold makes
        assert after["conv"] == 1 and after.get("batch_norm", 0) == 0
        assert after == {k: v for k, v in _fold_ops(model, x).items() if v}
    else:  # the float64 branch promotes the sum: its cast back must stay
        assert after.get("batch_norm", 0) + after["conv"] >= 2


def _fold_ops(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    return repfx.fold(model, (x,)).meta[repfx.REPORT_KEY].after.ops


# --------------------------------------------------------------- frozen tensors that change


def _conv_bn() -> nn.Module:
    return _random(Seq(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()))


def _scale_weight(model: nn.Module) -> None:
    with torch.no_grad():
        model[0].weight.mul_(1.5)


def _load_state(model: nn.Module) -> None:
    state = {k: v + torch.rand_like(v) if v.is_floating_point() else v for k, v in
             model.state_dict().items()}  # fmt: skip
    model.load_state_dict(state)


def _write_statistics(model: nn.Module) -> None:
    model[1].running_var[2] = 4.0  # (an item assignment, as a calibration step might)


@pytest.mark.parametrize(
    "change", [_scale_weight, _load_state, _write_statistics],
    ids=["mul_", "load_state_dict", "setitem"],
)  # fmt: skip
def test_a_frozen_tensor_changed_after_compiling_is_refolded(change):
    model = _conv_bn()
    backend = compile_backend(inner="eager")
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_close(compiled(x), model(x))
        change(model)
        assert_close(compiled(x), model(x))
    assert len(backend.reports) == 2
    assert any("changed after the graph was compiled" in n for n in backend.reports[-1].notes)
    assert backend.reports[-1].counts()["fold_bn"] == 1


class MutatedThenNoisy(nn.Module):
    """Two convs merged around an in-place add, then a conv times a random draw from a
    parameter: a refold proves rewrites next to the draw."""

    def __init__(self):
        super().__init__()
        self.f, self.g = nn.Conv1d(2, 2, 1, bias=False), nn.Conv1d(2, 2, 1, bias=False)
        self.conv, self.s = nn.Conv1d(2, 2, 1), nn.Parameter(torch.randn(2, 1))

    def forward(self, x):
        y = 1 * x
        y.add_(0.5)
        z = torch.nn.functional.gelu(self.f(y) + self.g(x))
        return self.conv(z) * (self.s + torch.randn_like(self.s))


def test_a_refold_leaves_the_random_numbers_the_call_draws_as_they_are():
    torch._dynamo.reset()
    model = _random(MutatedThenNoisy())
    compiled = torch.compile(model, backend=compile_backend(inner="eager"))
    x = torch.randn(3, 2, 5)
    with torch.no_grad():
        for change in (None, _load_state):
            if change is not None:
                change(model)
            torch.manual_seed(1)
            got = compiled(x.clone())
            torch.manual_seed(1)
            assert_close(got, model(x.clone()))


def test_a_parameter_without_grad_changed_in_grad_mode_is_refolded():
    model = _conv_bn().requires_grad_(False)
    backend = compile_backend(inner="eager")
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(2, 3, 8, 8)
    assert_close(compiled(x), model(x))
    model[1].bias.copy_(torch.randn(6))  # grad mode: nothing to track, the copy is allowed
    assert_close(compiled(x), model(x))
    assert backend.reports[-1].counts()["fold_bn"] == 1 and len(backend.reports) == 2


def test_an_unchanged_model_is_folded_once():
    model = _conv_bn()
    backend = compile_backend(inner="eager")
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for _ in range(3):
            compiled(torch.randn(2, 3, 8, 8))
    assert len(backend.reports) == 1


def test_a_model_made_under_inference_mode_is_not_frozen_and_the_report_says_why():
    """Inference tensors have no version counter: a change to one could not be seen."""
    with torch.inference_mode():
        model = copy.deepcopy(_conv_bn())  # (its copies are inference tensors)
        backend = compile_backend(inner="eager")
        x = torch.randn(2, 3, 8, 8)
        assert_close(torch.compile(model, backend=backend)(x), model(x))
    assert backend.reports[-1].folded == []
    assert any("inference tensors" in n for n in backend.reports[-1].notes)


def test_a_statistic_holding_nan_is_not_refolded_on_every_call():
    """The watch compares the running statistics' bits: a NaN it read is still what it read."""
    model = _conv_bn()
    model[1].running_mean[0] = float("nan")
    backend = compile_backend(inner="eager")
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(compiled(x), model(x), equal_nan=True)
    assert len(backend.reports) == 1


def test_a_refold_names_the_statistic_that_changed():
    model = _random(
        Seq(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4))
    )
    backend = compile_backend(inner="eager")
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        compiled(x)
        model[3].train()(torch.randn(5, 4, 6, 6))  # (the kernel moves no version counter)
        model[3].eval()
        assert_close(compiled(x), model(x))
    refolded = [n for n in backend.reports[-1].notes if "changed after" in n]
    assert refolded and "3.running_mean" in refolded[0]


@pytest.mark.parametrize("train_compiled", [True, False], ids=["compiled", "eager"])
def test_statistics_a_training_step_updates_between_evaluations_are_refolded(train_compiled):
    """A compiled validation step during training: eval → train → eval. The training step's
    batch norms update their running statistics (the kernel does not move their version
    counter); the second evaluation must use the new ones."""
    model = _random(ResNetLike())
    compiled = torch.compile(model, backend=compile_backend(inner="eager"))
    x = torch.randn(2, 3, 8, 8)
    for step in range(2):
        with torch.no_grad():
            assert_close(compiled(x), model(x))
        model.train()
        (compiled if train_compiled else model)(torch.randn(4, 3, 8, 8) * (2 + step) + 1)
        model.eval()
    with torch.no_grad():
        assert_close(compiled(x), model(x))


def test_with_inductor_freezing_set_the_attributes_dynamo_hands_over_are_folded():
    """With ``torch._inductor.config.freezing`` set, dynamo hands parameters over as the
    graph's attributes, not its inputs: they are folded all the same, and watched."""
    model = _random(_repvgg_like())
    backend = compile_backend(inner="eager")
    x = torch.randn(2, 3, 16, 16)
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        compiled = torch.compile(model, backend=backend)
        assert_close(compiled(x), model(x))
        assert backend.reports[-1].counts()["merge_branches"] >= 2
        model[0].weight.mul_(-1)
        assert_close(compiled(x), model(x))
    assert any("changed after the graph was compiled" in n for n in backend.reports[-1].notes)


def test_a_refolded_graph_with_symbolic_shapes_runs_without_the_inner_backend():
    """Compiling a graph with symbolic sizes again needs dynamo's shape environment: after a
    refold such a graph runs in eager mode, and the report says so."""
    compiled_graphs = []

    def inner(gm, example_inputs):
        compiled_graphs.append(gm)
        return gm.forward

    model = _conv_bn()
    backend = compile_backend(inner=inner)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        compiled(torch.randn(2, 3, 8, 8))
        _scale_weight(model)
        x = torch.randn(3, 3, 10, 10)
        assert_close(compiled(x), model(x))
    assert len(compiled_graphs) == 1
    assert any("runs without" in n for n in backend.reports[-1].notes)
