"""``repfx.fold(..., progress=...)`` names the phase it is in on stderr (capture, fold, verify):
a bar on a terminal, plain lines in a log, nothing unless asked when stderr is not a terminal
(``repfx.report.progress``)."""

from __future__ import annotations

import io
import sys

import pytest
from helpers import fresh_input
from torch import nn

import repfx
from repfx.proof.redraw import redraw_foldable_parameters_


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _model(batch_norm: bool = True) -> nn.Module:
    layers = [nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8) if batch_norm else nn.Identity(), nn.ReLU()]
    return redraw_foldable_parameters_(nn.Sequential(*layers), seed=4).eval()


def _phases(text: str) -> list[str]:
    return [
        line.removeprefix("repfx.fold: ").rsplit(" (", 1)[0]
        for line in text.splitlines()
        if line.startswith("repfx.fold: ")
    ]


def test_plain_lines_name_every_phase_of_a_verified_fold(capsys):
    repfx.fold(_model(), (fresh_input(2, 3, 7, 7),), progress=True)
    assert _phases(capsys.readouterr().err) == [
        "capture",
        "fold",
        "verify",
        "fold, re-drawn parameters",
        "verify, re-drawn parameters",
        "done",
    ]


def test_phases_follow_what_the_fold_does(capsys):
    repfx.fold(_model(batch_norm=False), (fresh_input(2, 3, 7, 7),), progress=True)
    assert _phases(capsys.readouterr().err) == ["capture", "fold", "verify", "done"]
    repfx.fold(_model(), (fresh_input(2, 3, 7, 7),), verify=False, progress=True)
    assert _phases(capsys.readouterr().err) == ["capture", "fold", "done"]


@pytest.mark.parametrize("progress", [None, False])
def test_nothing_is_shown_off_a_terminal_unless_asked(capsys, progress):
    repfx.fold(_model(), (fresh_input(2, 3, 7, 7),), progress=progress)
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_a_bar_with_the_phase(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    repfx.fold(_model(), (fresh_input(2, 3, 7, 7),), progress=True)
    shown = terminal.getvalue()
    assert "repfx.fold:" in shown and "verify, re-drawn parameters" in shown
    assert "5/5" in shown or "4/5" in shown  # (the bar is cleared once the fold is done)
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    repfx.fold(_model(), (fresh_input(2, 3, 7, 7),), progress=False)
    assert quiet.getvalue() == ""
