"""The re-drawn copy's fold binds the graph captured for the fold it checks to its own tensors
(``repfx.capture.reuse``) instead of capturing that copy again; a graph holding what its trace
computed from a value is caught by the re-drawn verification, which then captures afresh."""

from __future__ import annotations

import importlib

import torch
from helpers import fresh_input
from torch import nn

import repfx
from repfx.capture import capture
from repfx.capture.reuse import CapturedGraph
from repfx.proof.inputs import copy_model, run
from repfx.proof.redraw import redraw_foldable_parameters_

fold_module = importlib.import_module("repfx.fold")


class _ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))

    def forward(self, x):
        return self.bn(self.conv(x)) * self.scale


class _ReadsAValueWhileTraced(_ConvBN):
    """Scales by a number read off its BatchNorm's statistics while the forward runs: torch.fx
    reads buffers as plain tensors, and keeps the number it read while tracing."""

    def forward(self, x):
        k = float(self.bn.running_var.max())
        return self.bn(self.conv(x)) * k


def test_a_kept_graph_bound_to_another_copy_computes_that_copy():
    model = redraw_foldable_parameters_(_ConvBN().eval(), seed=1)
    gm, opaque = capture(copy_model(model))
    kept = CapturedGraph.keep(gm, opaque, gm)
    other = redraw_foldable_parameters_(copy_model(model), seed=2)
    x = fresh_input(2, 3, 6, 6)
    assert not torch.equal(run(model, (x,)), run(other, (x,)))
    assert torch.equal(run(kept.bound_to(other), (x,)), run(other, (x,)))
    assert torch.equal(run(kept.gm, (x,)), run(model, (x,)))  # (the kept one is unchanged)


def _count_captures(monkeypatch) -> list[int]:
    calls = []
    real = fold_module.capture_with_shapes

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fold_module, "capture_with_shapes", counted)
    return calls


def test_a_verified_fold_captures_the_model_once(monkeypatch):
    model = redraw_foldable_parameters_(_ConvBN().eval(), seed=1)
    captures = _count_captures(monkeypatch)
    report = repfx.fold(model, (fresh_input(1, 3, 6, 6),)).meta["repfx_report"]
    assert report.redrawn_verification.passed
    assert len(captures) == 1


def test_a_graph_holding_a_traced_value_is_captured_afresh_for_the_redrawn_copy(monkeypatch):
    model = redraw_foldable_parameters_(_ReadsAValueWhileTraced().eval(), seed=3)
    captures = _count_captures(monkeypatch)
    x = fresh_input(1, 3, 6, 6)
    folded = repfx.fold(model, (x,))
    report = folded.meta["repfx_report"]
    assert report.redrawn_verification.passed
    # the bound graph kept the given model's number and failed (its float64 re-check captured
    # a float64 copy); the re-drawn copy was then captured afresh, and that fold passed
    assert len(captures) == 3
    y = fresh_input(3, 3, 6, 6)
    torch.testing.assert_close(run(folded, (y,)), run(model, (y,)))


class _CachesAGrid(nn.Module):
    """Caches a tensor with the input size it is for, in Python state (a detection head's
    anchors): torch.fx cannot trace it (a branch on a size), so it runs opaque."""

    def __init__(self):
        super().__init__()
        self.grid, self.size = torch.zeros(0), None

    def forward(self, x):
        if self.size != x.shape[-1]:
            self.grid, self.size = torch.linspace(0, 1, x.shape[-1]), x.shape[-1]
        return x + self.grid


class _ConvBNGrid(_ConvBN):
    def __init__(self):
        super().__init__()
        self.head = _CachesAGrid()

    def forward(self, x):
        return self.head(super().forward(x))


def test_a_graph_with_code_run_opaque_is_not_bound_to_another_copy(monkeypatch):
    """Shapes propagated through the opaque head set its cache on the captured copy; bound to the
    re-drawn copy's tensors, the cached size would describe a grid that copy does not have."""
    model = redraw_foldable_parameters_(_ConvBNGrid().eval(), seed=3)
    captures = _count_captures(monkeypatch)
    x = fresh_input(1, 3, 6, 6)
    folded = repfx.fold(model, (x,), capture="fx")
    report = folded.meta["repfx_report"]
    assert report.opaque_modules and report.redrawn_verification.passed
    assert len(captures) == 2
    y = fresh_input(3, 3, 6, 6)
    torch.testing.assert_close(run(folded, (y,)), run(model, (y,)))
