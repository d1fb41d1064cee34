"""The report's words are true: errors read against their tolerance and scale, ``explain`` is
never silent, the op table lines up, and the compile backend's reports name the model's own
modules and count its frozen parameters."""

from __future__ import annotations

import re

import torch
from grammar import randomise_
from helpers import fresh_input
from torch import nn

import repfx
from repfx.models import metaformer


class LargeOutput(nn.Module):
    """conv → BN with outputs of order 1e5: a rounding difference of 1e-2 is tiny on them."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * 1e5


def _report(model: nn.Module, x: torch.Tensor):
    return repfx.fold(model.eval(), (x,)).meta["repfx_report"]


def test_a_verification_leads_with_the_relative_error_and_gives_the_scale_of_an_absolute_one():
    model = randomise_(LargeOutput(), torch.Generator().manual_seed(3)).eval()
    x = fresh_input(2, 3, 6, 6)
    report = _report(model, x)
    with torch.no_grad():
        scale = model(x).abs().max().item()
    for v in report.verifications():
        line = v.summary()
        found = re.search(r"relative error (\S+) ≤ (\S+)(?: \(largest difference (\S+) on values "
                          r"up to (\S+)\))?$", line)  # fmt: skip
        assert found, line
        rel, tolerance = float(found.group(1)), float(found.group(2))
        assert rel == float(f"{v.max_rel_error:.2g}") and tolerance == v.tolerance
        if v.max_abs_error:  # an absolute figure never stands without its scale
            assert found.group(4) is not None, line
            assert float(found.group(3)) == float(f"{v.max_abs_error:.2g}")
        if v.label == "as given" and found.group(4):
            assert float(found.group(4)) == float(f"{scale:.2g}")  # the output's own scale
    assert all(v.abs_error_scale for v in report.verifications() if v.max_abs_error)


def test_explain_is_never_empty_and_says_what_was_left():
    model = randomise_(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), torch.Generator())
    clean = _report(model, fresh_input(1, 3, 4, 4))
    assert clean.skipped == []
    for everything in (True, False):
        assert clean.explain(everything=everything).startswith("nothing was left")

    riformer = randomise_(metaformer.riformer_tiny(), torch.Generator().manual_seed(1))
    report = _report(riformer, fresh_input(1, 3, 32, 32))
    left = len(report.skipped)
    assert left and not any(s for s in report.skipped if "hooks" in s.reason)
    mine = report.explain(everything=False)
    assert mine.startswith("nothing you could change") and f"the {left} candidates left" in mine
    assert len(report.explain().splitlines()) == left


def test_the_op_table_lines_up_every_row():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout())
    model = randomise_(model, torch.Generator().manual_seed(0))
    text = str(_report(model, fresh_input(1, 3, 6, 6)))
    table = text[text.index("ops before → after") :].splitlines()[1:]
    rows = [line for line in table if line.startswith("    ") and "→" in line]
    assert any("buffers (elements)" in row for row in rows)
    assert len({row.index("→") for row in rows}) == 1, "\n".join(rows)


def test_compile_backend_reports_name_the_models_modules_and_count_frozen_parameters():
    model = randomise_(metaformer.riformer_tiny(), torch.Generator().manual_seed(1)).eval()
    backend = repfx.compile_backend(inner="eager")
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(fresh_input(1, 3, 32, 32))
    report = backend.reports[-1]
    torch._dynamo.reset()
    assert report.folded
    assert not any("L[" in f.where or "L[" in f.detail for f in report.folded)
    modules = {name for name, _ in model.named_modules()}
    paths = {f.where.split(":")[0] for f in report.folded}  # a module, or one a fold created
    assert all(p in modules or p.rsplit(".", 1)[0] in modules for p in paths), paths - modules
    assert report.before.parameters == sum(p.numel() for p in model.parameters())
    eager = _report(model, fresh_input(1, 3, 32, 32))
    assert report.after.parameters == eager.after.parameters  # the same folds, the same count
