"""Verification runs repfx's own folded graph module without a copy only when nothing in it can
write (``repfx.proof.pure``): whatever it says runs clean must leave the module as it was, and a
module that writes must be recognised as such."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import fresh_input, traced
from torch import fx, nn

import repfx
from repfx.proof.pure import runs_without_writes
from repfx.proof.redraw import redraw_foldable_parameters_


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}


def _unchanged_by_a_run(module: nn.Module, x: torch.Tensor) -> bool:
    before = _state(module)
    with torch.no_grad():
        module(x)
    after = _state(module)
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


class _Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        return self.head(y.mean((2, 3)))


class _Counts(nn.Module):
    """Writes a buffer of its own on every call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.conv(x) * self.calls


class _Custom(nn.Module):
    def forward(self, x):
        return x * 2


class _HoldsCustom(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.custom = _Custom()

    def forward(self, x):
        return self.custom(self.conv(x))


def _redrawn(model: nn.Module) -> nn.Module:
    return redraw_foldable_parameters_(model, seed=3).eval()


def test_a_folded_stock_model_runs_as_it_is_and_stays_unchanged():
    x = fresh_input(2, 3, 7, 7)
    folded = repfx.fold(_redrawn(_Stem()), (x,))
    assert runs_without_writes(folded)
    assert _unchanged_by_a_run(folded, fresh_input(3, 3, 9, 9, seed=2))


def test_a_training_mode_batch_norm_writes():
    model = _redrawn(_Stem())
    model.bn.train()
    gm = fx.symbolic_trace(model)
    assert not runs_without_writes(gm)
    assert not _unchanged_by_a_run(gm, fresh_input(2, 3, 5, 5))


def test_an_in_place_write_to_a_buffer_is_seen():
    gm = traced(_Counts().eval())  # (plain symbolic_trace would run the write once instead)
    assert not runs_without_writes(gm)
    assert not _unchanged_by_a_run(gm, fresh_input(2, 3, 5, 5))


@pytest.mark.parametrize("spelling", ["hook", "custom module", "training flag", "not a graph"])
def test_what_cannot_be_judged_is_copied(spelling):
    if spelling == "custom module":
        tracer_leaf = fx.Tracer()
        tracer_leaf.is_leaf_module = lambda m, name: (
            isinstance(m, _Custom) or type(m).__module__.startswith("torch.nn")
        )
        root = _HoldsCustom().eval()
        module = fx.GraphModule(root, tracer_leaf.trace(root))
        assert any(n.op == "call_module" and n.target == "custom" for n in module.graph.nodes)
    elif spelling == "not a graph":
        module = _Stem().eval()
    else:
        module = fx.symbolic_trace(_Stem().eval())
        if spelling == "hook":
            module.head.register_forward_hook(lambda m, i, o: None)
        else:
            module.train()
    assert not runs_without_writes(module)


def test_a_fold_stays_unchanged_by_its_own_verification():
    """The folded module the user gets back is the one verification ran: it must come back
    exactly as folded (same tensors, same values) whether verification copied it or not."""
    x = fresh_input(2, 3, 7, 7)
    model = _redrawn(_Stem())
    folded = repfx.fold(model, (x,))
    unverified = repfx.fold(model, (x,), verify=False)
    a, b = _state(folded), _state(unverified)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    y = fresh_input(3, 3, 6, 6, seed=5)
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(folded)(y), unverified(y))


class _FunctionalStatistics(nn.Module):
    """Normalises with batch statistics and updates its own running statistics, functionally."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x):
        y = self.conv(x)
        return torch.nn.functional.batch_norm(y, self.mean, self.var, training=True) + y


def test_a_functional_batch_norm_updating_its_statistics_writes():
    gm = traced(_FunctionalStatistics().eval())
    assert not runs_without_writes(gm)
    assert not _unchanged_by_a_run(gm, fresh_input(2, 3, 5, 5))


class _GrowsItsScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        with torch.no_grad():
            self.scale.add_(1.0)
        return x * self.scale.view(1, -1, 1, 1)


def test_an_in_place_op_is_a_write_in_a_graph_capture_did_not_mark():
    """A graph repfx's capture did not make (plain ``symbolic_trace``) carries no marks: the
    in-place op itself says the graph writes."""
    gm = fx.symbolic_trace(_GrowsItsScale().eval())
    assert not runs_without_writes(gm)
    assert not _unchanged_by_a_run(gm, fresh_input(2, 3, 4, 4))
