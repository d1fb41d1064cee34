"""The fold picture (``report.draw``), checked from its layout (``repfx.report.draw.layout``):
no two boxes overlap, each box's colour tells the truth about its op (red: gone from the folded
graph; green: created, or its parameters changed), the headers count the block's ops as the
report counts a graph's, shape checks are not drawn, and the default block shows the fold that
matters (a RepVGG block with its merged conv, a RIFormer block with its token mixer gone)."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from grammar import randomise_
from helpers import fresh_input, traced
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

import repfx
from repfx.cli import main
from repfx.ir.graph import fetch_attr, is_guard
from repfx.models import ACBlock, DBBlock, create, metaformer
from repfx.report.draw import CHANGED, INPUT, KEPT, OUTSIDE, REMOVED, fold_targets, layout
from repfx.report.fold_report import Folded
from repfx.report.sketch import in_module


class LayerScale(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(channels, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def conv_bn_relu_layer_scale(channels: int = 8) -> nn.Sequential:
    """Conv → BN → ReLU blocks, each followed by a LayerScale, then a 1×1 conv: each BN folds
    into its conv, each LayerScale into the input of the next conv (modules named 0, 1, 2, …:
    paths without a dot)."""
    blocks = []
    for _ in range(3):
        conv = nn.Conv2d(channels, channels, 3, padding=1)
        blocks += [nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU()), LayerScale(channels)]
    return nn.Sequential(*blocks, nn.Conv2d(channels, channels, 1))


class Folding:
    """A model, its fold and the fold's report."""

    def __init__(self, model: nn.Module, x: torch.Tensor, verify: bool = True):
        self.model = randomise_(model, torch.Generator().manual_seed(1)).eval()
        self.x = x
        self.folded = repfx.fold(self.model, (x,), verify=verify)
        self.report = self.folded.meta["repfx_report"]


@pytest.fixture(scope="module")
def riformer():
    return Folding(metaformer.riformer_tiny(), fresh_input(1, 3, 32, 32))


@pytest.fixture(scope="module")
def repvgg():
    return Folding(create("repvgg_tiny", num_classes=10), fresh_input(1, 3, 32, 32))


@pytest.fixture(scope="module")
def layer_scale():
    return Folding(conv_bn_relu_layer_scale(), fresh_input(1, 8, 8, 8))


# ------------------------------------------------------------------------------ what is true


def _module_path(node: fx.Node) -> str | None:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack.values()))[0] if stack else None


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


def _took_a_fold(f: Folding, node: fx.Node) -> bool:
    """Did ``node`` of the folded graph get parameters other than the original model's at the
    same place (a module whose weights changed, a parameter operand that did)?"""
    if node.op == "call_module":
        try:
            original = f.model.get_submodule(node.target)
        except AttributeError:
            return True  # a module the fold created
        now = f.folded.get_submodule(node.target)
        return not _same_tensors(original.state_dict(), now.state_dict())
    for operand in (i for i in node.all_input_nodes if i.op == "get_attr"):
        try:
            original = fetch_attr(f.model, operand.target)
        except AttributeError:
            return True
        if not _same_tensors({"t": original}, {"t": fetch_attr(f.folded, operand.target)}):
            return True
    return False


def _ops_in(gm: fx.GraphModule, block: str) -> int:
    """The block's ops as the report counts a graph's: its calls but rank guards (those of
    the whole graph for ``""``)."""
    calls = [n for n in gm.graph.nodes if n.op.startswith("call_") and not is_guard(n)]
    if not block:
        return len(calls)
    return sum(1 for n in calls if _module_path(n) and in_module(_module_path(n), block))


def _tensor_valued(gm: fx.GraphModule, x: torch.Tensor) -> set[str]:
    """The nodes of ``gm`` whose value, run on ``x``, is a tensor."""
    ShapeProp(gm).propagate(x)
    return {n.name for n in gm.graph.nodes if "tensor_meta" in n.meta}


# ------------------------------------------------------------------------------ the checks


def _check_layout(f: Folding, block: str | None = None):
    """What every picture must satisfy; returns the picture."""
    picture = layout(f.report, block)
    boxes = picture.boxes
    for a, b in itertools.combinations(boxes, 2):
        assert not a.bbox.overlaps(b.bbox), (a.label, b.label)
    for box in boxes:
        assert box.bbox.x0 <= box.text.x0 and box.text.x1 <= box.bbox.x1, box.label
        assert box.bbox.y0 <= box.text.y0 and box.text.y1 <= box.bbox.y1, box.label
    for (key, extent), box in itertools.product(picture.furniture.items(), boxes):
        assert not extent.overlaps(box.bbox), (key, box.label)
    _check_colours(f, picture)
    _check_counts(f, picture)
    return picture


def _check_colours(f: Folding, picture) -> None:
    folded = {n.name: n for n in f.folded.graph.nodes}
    captured = {n.name for n in f.report.before_sketch.nodes}
    for box in picture.boxes:
        if box.name.startswith(INPUT):
            assert box.colour == OUTSIDE
        elif box.side == "before":
            assert box.colour == (KEPT if box.name in folded else REMOVED), box.label
        else:
            changed = box.name not in captured or _took_a_fold(f, folded[box.name])
            assert box.colour == (CHANGED if changed else KEPT), box.label


def _check_counts(f: Folding, picture) -> None:
    """The header counts all of the block's ops (as the report counts); the drawn ones plus
    those it says are not drawn make that count."""
    for side in ("before", "after"):
        header = picture.headers[side]
        count = int(re.match(rf"{side}: (\d+) ops?\n", header).group(1))
        hidden = sum(int(n) for n in re.findall(r"(\d+) (?:shape|on parameters)", header))
        drawn = [b for b in picture.boxes if b.side == side and not b.name.startswith(INPUT)]
        assert count == picture.ops[side] == len(drawn) + hidden, header
    assert picture.ops["after"] == _ops_in(f.folded, picture.block)


def test_picture_of_riformer_shows_its_token_mixer_and_layer_scales_gone(riformer, tmp_path):
    picture = _check_layout(riformer)
    assert re.fullmatch(r"network\.\d+\.\d+", picture.block)  # a RIFormer block
    before = {b.label.split("\n")[-1]: b.colour for b in picture.boxes if b.side == "before"}
    after = {b.label.split("\n")[-1]: b.colour for b in picture.boxes if b.side == "after"}
    assert before["token_mixer.affine"] == before["token_mixer"] == REMOVED
    assert {"mul layer_scale_1", "mul layer_scale_2"} <= before.keys()
    assert not {"token_mixer.affine", "token_mixer", "mul layer_scale_1"} & after.keys()
    assert after["norm1"] == CHANGED and after["mlp.fc2"] == CHANGED  # took mixer and scales
    assert "conv 1×1, 8→32" in next(b.label for b in picture.boxes if "mlp.fc1" in b.label)
    block = riformer.report.draw(tmp_path / "fold.svg")
    assert block == picture.block
    svg = (tmp_path / "fold.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg and "norm1" in svg  # text kept
    assert [p.name for p in tmp_path.iterdir()] == ["fold.svg"]  # written atomically


def test_whole_model_headers_are_the_reports_op_counts(riformer, layer_scale):
    for f in (riformer, layer_scale):
        picture = _check_layout(f, block="")
        assert picture.ops == {"before": f.report.before.nodes, "after": f.report.after.nodes}
        assert f"{f.report.before.nodes:,} → {f.report.after.nodes:,} ops" in f.report.summary()


def test_block_headers_count_the_captured_graphs_ops(riformer):
    picture = _check_layout(riformer, block="network.0.0")
    captured = traced(riformer.model, riformer.x)
    assert picture.ops["before"] == _ops_in(captured, "network.0.0")


def test_convs_that_took_a_batch_norm_or_a_layer_scale_are_green(layer_scale, tmp_path):
    picture = _check_layout(layer_scale)
    convs = [b for b in picture.boxes if b.side == "after" and b.label.startswith("conv")]
    assert len(convs) == 4 and all(b.colour == CHANGED for b in convs)
    relus = [b for b in picture.boxes if b.side == "after" and b.label.startswith("ReLU")]
    assert relus and all(b.colour == KEPT for b in relus)
    assert layer_scale.report.draw(tmp_path / "ls.png") == picture.block
    assert (tmp_path / "ls.png").read_bytes().startswith(b"\x89PNG")


def test_repvgg_block_shows_its_branches_merged_into_one_conv(repvgg):
    picture = _check_layout(repvgg)
    before = [b for b in picture.boxes if b.side == "before"]
    after = [b for b in picture.boxes if b.side == "after" and not b.name.startswith(INPUT)]
    assert (
        sum(b.label.startswith("conv 3×3") or b.label.startswith("conv 1×1") for b in before) >= 2
    )
    merged = [b for b in after if b.label.startswith("conv 3×3") and b.colour == CHANGED]
    assert len(merged) == 1
    assert all(b.colour == REMOVED for b in before if "BatchNorm2d" in b.label)


def test_blocks_with_many_branches_lay_out_without_overlaps(repvgg):
    """Branches that cross (ACNet's cropped 1×k / k×1 branches, DBB's four composed branches),
    and a block whose ops all folded away (a RepVGG branch)."""
    for block in (ACBlock(4, 6, kernel=5, stride=2, padding=1, groups=2), DBBlock(4, 4, 3)):
        _check_layout(Folding(nn.Sequential(block), fresh_input(1, 4, 9, 9)), block="0")
    picture = _check_layout(repvgg, block=_check_layout(repvgg).block + ".rbr_dense")
    assert picture.ops["after"] == 0 and picture.headers["after"] == "after: 0 ops\nnone"


def test_fold_targets_are_where_a_record_says_a_fold_went():
    class Report:
        folded = [
            Folded("fold_bn", "0.1", "into conv 0.0"),
            Folded(
                "fold_channel_affine",
                "m:mul",
                "into the input of linear a.q, linear a.k (through relu a.act)",
            ),
            Folded("fold_affine_mixer", "t:sub", "merged branches (conv) into one affine"),
            Folded("fold_affine_through_flatten", "x", "folded into linear fc through the flatten"),
            Folded("merge_branches", "s:add", "merged 3 ops into one conv s.merged_conv"),
            Folded(
                "fold_channel_affine",
                "y:mul",
                "into conv b.0; undone in the input of conv b.1 (through ReLU)",
            ),
            Folded("fold_channel_affine", "z:mul", "composed with batch_norm z:batch_norm"),
            Folded("precompute_constants", "p", "precomputed (3 ops on parameters only)"),
            Folded("cleanup", "drop", "removed no-op"),
        ]

    places = {"0.0", "a.q", "a.k", "fc", "s.merged_conv", "b.0", "b.1"}
    assert fold_targets(Report()) == places


def test_a_model_with_nothing_folded_has_no_picture(tmp_path):
    report = repfx.fold(nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU()).eval()).meta["repfx_report"]
    with pytest.raises(repfx.DrawError, match="nothing was folded"):
        report.draw(tmp_path / "none.svg")
    assert not list(tmp_path.iterdir())


def test_a_block_that_is_not_a_module_is_refused(riformer, tmp_path):
    with pytest.raises(repfx.DrawError, match="no op of the captured graph belongs to module"):
        riformer.report.draw(tmp_path / "x.svg", block="network.0.O")
    assert not list(tmp_path.iterdir())


def test_a_block_too_large_to_read_is_refused_with_what_to_do(tmp_path):
    layers = [nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU()) for _ in range(30)]
    model = randomise_(nn.Sequential(*layers), torch.Generator().manual_seed(0)).eval()
    report = repfx.fold(model, (fresh_input(1, 3, 4, 4),)).meta["repfx_report"]
    with pytest.raises(repfx.DrawError, match="too many to draw readably"):
        report.draw(tmp_path / "all.svg", block="")
    assert report.draw(tmp_path / "one.svg", block="3") == "3"


def test_cli_draws_the_picture_and_refuses_to_overwrite_one(tmp_path, capsys):
    picture = tmp_path / "g.svg"
    args = ["optimize", "riformer_tiny", "--input-shape", "1,3,32,32", "--graph", str(picture)]
    assert main(args) == 0
    assert "drew network.0.0 before and after into" in capsys.readouterr().out
    assert "after: 7 ops" in picture.read_text()
    assert main([*args, "-q"]) == 2  # exists: --force to replace it
    assert "pass --force" in capsys.readouterr().err
    assert main([*args, "-q", "--force"]) == 0


@pytest.mark.slow
def test_timm_repvgg_a0_default_block_is_a_stage_block_with_its_merged_conv(tmp_path):
    """The default is a ``stages.X.Y`` block (not the stem's first BN), its branches merged
    into one new conv; its BatchNormAct2d shape checks are counted, not drawn."""
    timm = pytest.importorskip("timm")
    f = Folding(timm.create_model("repvgg_a0"), fresh_input(1, 3, 224, 224), verify=False)
    picture = _check_layout(f)
    assert re.fullmatch(r"stages\.\d+\.\d+", picture.block)
    after = [b for b in picture.boxes if b.side == "after" and not b.name.startswith(INPUT)]
    merged = [b for b in after if b.label.startswith("conv 3×3") and "merged" in b.label]
    assert len(merged) == 1 and merged[0].colour == CHANGED
    assert sum(b.label.startswith("conv") for b in picture.boxes if b.side == "before") >= 2
    tensors = _tensor_valued(f.folded, f.x)
    assert all(b.name in tensors for b in after)  # only tensors drawn ...
    in_block = {n.name for n in f.report.after_sketch.block(picture.block)}
    assert in_block - tensors  # ... though the block has shape checks, counted in the header
    assert "shape reads / checks" in picture.headers["after"]
    for block in (picture.block, "stages.0.0"):
        _check_layout(f, block=block)
    assert f.report.draw(tmp_path / "stage.png", block="stages.0.0") == "stages.0.0"


@pytest.mark.slow
def test_picture_of_riformer_s12_shows_its_mixer_gone():
    f = Folding(create("riformer_s12"), fresh_input(1, 3, 224, 224), verify=False)
    picture = _check_layout(f)
    before = {b.label.split("\n")[-1] for b in picture.boxes if b.side == "before"}
    after = {b.label.split("\n")[-1] for b in picture.boxes if b.side == "after"}
    assert {"token_mixer.affine", "token_mixer"} <= before
    assert not {"token_mixer.affine", "token_mixer"} & after
