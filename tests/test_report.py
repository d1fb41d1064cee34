"""The fold report as people read it: a summary first, alike folds grouped, only what a user
could change listed as not folded, and the same content as data (``to_dict`` / ``to_json``)."""

from __future__ import annotations

import html
import json
import re

import pytest
import torch
from grammar import randomise_
from helpers import fresh_input
from torch import nn

import repfx
from repfx.cli import main
from repfx.models import metaformer
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


# ------------------------------------------------------------------------------ the picture


def _texts(svg: str) -> list[str]:
    return [text for _, text in _placed_texts(svg)]


def _placed_texts(svg: str) -> list[tuple[float, str]]:
    """(x, text) of every text element of a matplotlib SVG (text kept as text)."""
    found = re.findall(r'<text[^>]*?(?:x="([\d.]+)"|translate\(([\d.]+))[^>]*>([^<]*)</text>', svg)
    return [(float(x or tx), html.unescape(t)) for x, tx, t in found]


def _sides(svg: str) -> tuple[set[str], set[str]]:
    """The texts of the left (before) and right (after) halves of the picture."""
    placed = [(x, t) for x, t in _placed_texts(svg) if not t.startswith("red: removed")]
    middle = (min(x for x, _ in placed) + max(x for x, _ in placed)) / 2
    return {t for x, t in placed if x < middle}, {t for x, t in placed if x >= middle}


def test_picture_of_riformer_shows_the_mixer_gone(tmp_path):
    model = randomise_(metaformer.riformer_tiny(), torch.Generator().manual_seed(1)).eval()
    report = repfx.fold(model, (fresh_input(1, 3, 32, 32),)).meta["repfx_report"]
    block = report.draw(tmp_path / "fold.svg")
    assert block == "network.0.0"  # the first RIFormer block
    svg = (tmp_path / "fold.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    before, after = _sides(svg)
    assert "network.0.0: before (15 ops)" in before and "after (7 ops)" in after
    # the token mixer (a depthwise conv named affine, and the sub) and the LayerScale muls
    assert {"affine", "sub", "mul"} <= before
    assert not {"affine", "sub", "mul"} & after
    assert {"norm1", "norm2", "fc1", "fc2"} <= after
    assert [p.name for p in tmp_path.iterdir()] == ["fold.svg"]  # written atomically


def test_a_model_with_nothing_folded_has_no_picture(tmp_path):
    report = repfx.fold(nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU()).eval()).meta["repfx_report"]
    with pytest.raises(repfx.DrawError, match="nothing was folded"):
        report.draw(tmp_path / "none.svg")
    assert not list(tmp_path.iterdir())


def test_cli_draws_the_picture_and_refuses_to_overwrite_one(tmp_path, capsys):
    picture = tmp_path / "g.svg"
    args = ["optimize", "riformer_tiny", "--input-shape", "1,3,32,32", "--graph", str(picture)]
    assert main(args) == 0
    assert "drew network.0.0 before and after into" in capsys.readouterr().out
    assert "after (7 ops)" in _texts(picture.read_text())
    assert main([*args, "-q"]) == 2  # exists: --force to replace it
    assert "pass --force" in capsys.readouterr().err
    assert main([*args, "-q", "--force"]) == 0


@pytest.mark.slow
def test_cli_picture_of_riformer_s12_shows_its_mixer_gone(tmp_path):
    picture = tmp_path / "g.svg"
    assert main(["optimize", "riformer_s12", "--graph", str(picture), "-q"]) == 0
    before, after = _sides(picture.read_text())
    assert {"affine", "sub", "mul"} <= before and not {"affine", "sub", "mul"} & after


def test_a_block_too_large_to_read_is_refused_with_what_to_do(tmp_path):
    layers = [nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU()) for _ in range(30)]
    model = randomise_(nn.Sequential(*layers), torch.Generator().manual_seed(0)).eval()
    report = repfx.fold(model, (fresh_input(1, 3, 4, 4),)).meta["repfx_report"]
    with pytest.raises(repfx.DrawError, match="too many to draw readably"):
        report.draw(tmp_path / "all.svg", block="")
    assert report.draw(tmp_path / "one.svg", block="3") == "3"
