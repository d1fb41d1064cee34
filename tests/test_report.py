"""The fold report as people read it: a summary first, alike folds grouped, only what a user
could change listed as not folded, and the same content as data (``to_dict`` / ``to_json``)."""

from __future__ import annotations

import json

import torch
from grammar import randomise_
from helpers import fresh_input
from torch import nn

import repfx
from repfx.report.fold_report import Skipped, actionable, pattern


class Blocks(nn.Module):
    """Three alike conv → BN blocks with residual sums around a ReLU, the last conv hooked."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(3))
        self.bns = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(3))
        self.convs[2].register_forward_hook(lambda m, args, out: None)

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns, strict=True):
            x = x + torch.relu(bn(conv(x)))
        return x


def _report():
    model = randomise_(Blocks(), torch.Generator().manual_seed(2)).eval()
    folded = repfx.fold(model, (fresh_input(2, 4, 5, 5),))
    return folded.meta["repfx_report"]


def test_text_reads_summary_first_then_grouped_folds_then_what_a_user_could_change():
    report = _report()
    lines = str(report).splitlines()
    assert lines[1].startswith("  ") and "removed 2 batch norm" in lines[1]
    assert "verification ok (2 checks)" in lines[1]
    text = "\n".join(lines)
    assert "      bns.*: into conv convs.*  (×2)" in text  # two alike folds, one line
    could_change = text.split("you could change that:")[1]
    assert "conv module has hooks" in could_change.splitlines()[1]
    # the residual sums around a ReLU are not something to change: counted, not listed
    assert "non-affine op" not in could_change
    assert "cannot fold as the model is built" in text
    assert "non-affine op" in report.explain()  # everything, on request
    assert "non-affine op" not in report.explain(everything=False)


def test_report_as_data_round_trips_through_json():
    report = _report()
    data = json.loads(report.to_json(indent=2))
    assert data == json.loads(json.dumps(report.to_dict()))
    assert data["summary"] == report.summary()
    assert data["folded"] == report.counts() == {"fold_bn": 2}
    hooked = [s for s in data["skipped"] if "hooks" in s["reason"]]
    assert hooked and all(s["actionable"] for s in hooked)
    assert data["verification"]["passed"] and data["redrawn_verification"]["passed"]


def test_repr_is_short_and_notebooks_get_the_text():
    report = _report()
    assert repr(report) == f"<repfx FoldReport: {report.summary()}>"
    html = report._repr_html_()
    assert html.startswith("<pre>") and "repfx fold report" in html and "→" in html


def test_patterns_wildcard_indices_and_node_counters_only():
    assert pattern("stages.2.blocks.11.norm1:mul_23") == "stages.*.blocks.*.norm1:mul"
    assert pattern("into conv features.3.block.0.0") == "into conv features.*.block.*.*"
    assert pattern("conv2d_1x1") == "conv2d_1x1"
    assert pattern("at m.0 max rel 1.0 (tolerance 1.5e-05), 0.25)") == (
        "at m.* max rel 1.0 (tolerance 1.5e-05), 0.25)"
    )


def test_actionable_reasons_are_those_a_user_can_change():
    assert actionable(Skipped("fold_bn", "a", "producer conv module has hooks"))
    assert actionable(Skipped("fold_bn", "a", "channel axis unknown (pass example inputs)"))
    assert not actionable(Skipped("merge_branches", "a", "a branch contains a non-affine op"))
