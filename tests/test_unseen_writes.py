"""A forward that writes a module's tensors through another node than the module's call
(``self.bn.running_mean[:2] += 0.25`` before ``self.bn(x)``): a fold must not freeze the values
they hold at fold time. The write is found by storage, whatever node reads the tensor."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from grammar import randomise_
from torch import nn

import repfx
from repfx.dynamo import compile_backend
from repfx.testing import assert_close


def _shift_mean_slice(m: nn.Module) -> None:
    m.bn.running_mean[:2] += 0.25


def _scale_weight_data(m: nn.Module) -> None:
    m.bn.weight.data.mul_(1.1)


def _set_variance_item(m: nn.Module) -> None:
    m.bn.running_var[1] = 3.0


def _decay_mean(m: nn.Module) -> None:
    m.bn.running_mean.copy_(m.bn.running_mean * 0.9)


def _scale_conv_weight(m: nn.Module) -> None:
    m.conv.weight.data.mul_(1.01)


WRITES: dict[str, Callable[[nn.Module], None]] = {
    "slice_iadd": _shift_mean_slice,
    "data_mul_": _scale_weight_data,
    "setitem": _set_variance_item,
    "copy_": _decay_mean,
    "conv_weight": _scale_conv_weight,
}


class WritesItsState(nn.Module):
    """conv → BN, with a write to a tensor of theirs before (or after) the BN runs."""

    def __init__(self, write: Callable[[nn.Module], None], after: bool = False):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.write, self.after = write, after

    def forward(self, x):
        if not self.after:
            self.write(self)
        y = self.bn(self.conv(x))
        if self.after:
            self.write(self)
        return y


def _model(write: Callable[[nn.Module], None], after: bool = False) -> nn.Module:
    return randomise_(WritesItsState(write, after), torch.Generator().manual_seed(0)).eval()


def _agree_over_calls(model: nn.Module, folded: Callable, calls: int = 3) -> None:
    """``folded`` and a copy of ``model`` agree call after call, each writing its own state."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for _ in range(calls):
            assert_close(folded(x), model(x))


@pytest.mark.parametrize("examples", [True, False], ids=["with_examples", "without"])
@pytest.mark.parametrize("after", [False, True], ids=["before_the_bn", "after_the_bn"])
@pytest.mark.parametrize("write", WRITES)
def test_a_fold_does_not_freeze_a_tensor_the_forward_writes(write, after, examples):
    model = _model(WRITES[write], after)
    reference = copy.deepcopy(model)
    inputs = (torch.randn(2, 3, 8, 8),) if examples else None
    with torch.no_grad():
        folded = repfx.fold(model, inputs, verify=False)
    _agree_over_calls(reference, folded)
    assert folded.meta[repfx.REPORT_KEY].counts().get("fold_bn", 0) == 0


@pytest.mark.parametrize("examples", [True, False], ids=["with_examples", "without"])
def test_a_write_through_a_plain_tensor_attribute_is_exact_or_refused(examples):
    """The write goes through a second name for the BN's statistics, a plain tensor attribute
    that torch.fx does not record: the fold is exact (torch.export records it) or refused with
    a repfx error naming the attribute."""
    model = _model(lambda m: m.stats.add_(0.5))
    model.stats = model.bn.running_mean
    reference = copy.deepcopy(model)
    inputs = (torch.randn(2, 3, 8, 8),) if examples else None
    try:
        with torch.no_grad():
            folded = repfx.fold(model, inputs, verify=False)
    except repfx.CaptureError as exc:
        assert "writes to stats" in str(exc) and "register_buffer" in str(exc)
        assert not examples  # with example inputs, torch.export captures it
        return
    _agree_over_calls(reference, folded)


@pytest.mark.parametrize("write", WRITES)
def test_the_compile_backend_does_not_freeze_a_tensor_the_forward_writes(write):
    torch._dynamo.reset()
    model = _model(WRITES[write])
    reference = copy.deepcopy(model)
    backend = compile_backend(inner="eager")
    _agree_over_calls(reference, torch.compile(model, backend=backend))
    assert len(backend.reports) == 1  # the written tensor is not frozen: nothing to refold
    torch._dynamo.reset()


def test_a_module_whose_state_nobody_writes_still_folds():
    model = _model(lambda m: m.stats.add_(1.0))
    model.register_buffer("stats", torch.zeros(4))  # written, but not the BN's
    reference = copy.deepcopy(model)
    with torch.no_grad():
        folded = repfx.fold(model, verify=False)
    _agree_over_calls(reference, folded)
    assert folded.meta[repfx.REPORT_KEY].counts()["fold_bn"] == 1


class Counts(nn.Module):
    """conv → BN with a call counter in a buffer, updated in place (``+=``) or reassigned."""

    def __init__(self, reassign: bool):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.reassign = reassign

    def forward(self, x):
        if self.reassign:
            self.calls = self.calls + 1
        else:
            self.calls += 1
        return self.bn(self.conv(x)) * self.calls


@pytest.mark.parametrize("examples", [True, False], ids=["with_examples", "without"])
def test_a_counter_updated_in_place_keeps_counting_in_the_folded_module(examples):
    model = randomise_(Counts(reassign=False), torch.Generator().manual_seed(0)).eval()
    reference = copy.deepcopy(model)
    inputs = (torch.randn(2, 3, 8, 8),) if examples else None
    folded = repfx.fold(model, inputs)
    _agree_over_calls(reference, folded)
    assert folded.calls.item() == reference.calls.item() == 3
    assert model.calls.item() == 0  # the user's model did not run
    assert folded.meta[repfx.REPORT_KEY].counts()["fold_bn"] == 1


def test_a_counter_reassigned_is_refused_by_torch_fx_and_captured_by_export():
    model = randomise_(Counts(reassign=True), torch.Generator().manual_seed(0)).eval()
    with pytest.raises(repfx.CaptureError, match="assigns a new tensor to calls"):
        repfx.fold(model)
    reference = copy.deepcopy(model)
    folded = repfx.fold(model, (torch.randn(2, 3, 8, 8),))
    _agree_over_calls(reference, folded)
    assert model.calls.item() == 0


@pytest.mark.parametrize(
    ("method", "writes"),
    [("__iadd__", True), ("__setitem__", True), ("__imul__", True), ("add_", True),
     ("__add__", False), ("__getitem__", False), ("add", False)],
)  # fmt: skip
def test_a_write_recorded_as_a_dunder_method_is_a_write(method, writes):
    """A graph from another tracer may record ``t += y`` / ``t[i] = v`` as the method calls
    ``t.__iadd__(y)`` / ``t.__setitem__(i, v)``: those write ``t`` as ``add_`` does."""
    from repfx.ir.graph import writes_in_place

    graph = torch.fx.Graph()
    t, y = graph.placeholder("t"), graph.placeholder("y")
    args = (t, 0, y) if "item" in method else (t, y)
    node = graph.call_method(method, args)
    graph.output(node)
    assert writes_in_place(node) is writes


class ScalesItsOwnAttribute(nn.Module):
    """Code torch.fx runs opaque (a branch on a value) that updates a plain tensor attribute of
    its own on every call."""

    def __init__(self):
        super().__init__()
        self.scale = torch.rand(4, 1, 1, generator=torch.Generator().manual_seed(3)) + 0.5

    def forward(self, x):
        if x.sum() > -1e9:
            self.scale.mul_(1.1)
        return x


class ReadsAnOpaqueAttribute(nn.Module):
    """A per-channel multiply by that attribute before a conv: moving it into the conv would
    freeze the value it had at fold time."""

    def __init__(self):
        super().__init__()
        self.leaf, self.conv = ScalesItsOwnAttribute(), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv(self.leaf(x) * self.leaf.scale)


@pytest.mark.parametrize("examples", [True, False], ids=["with_examples", "without"])
def test_a_plain_tensor_attribute_of_code_run_opaque_is_not_folded(examples):
    model = randomise_(ReadsAnOpaqueAttribute(), torch.Generator().manual_seed(0)).eval()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    folded = repfx.fold(model, (x,) if examples else None)
    with torch.no_grad():
        for _ in range(3):
            assert_close(folded(x), reference(x))
