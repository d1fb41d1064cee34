"""``repfx.export``: checked, atomic writers, and the ONNX of a folded RIFormer."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import onnxscript  # noqa: F401  the torch.export-based exporter (name scopes in metadata)
import pytest
import torch
from grammar import randomise_
from torch import nn

import repfx
from repfx import export
from repfx.export import ExportError, ExportMismatchError, save_pt2
from repfx.models import create
from repfx.testing import assert_close

SCOPES = "pkg.torch.onnx.name_scopes"  # module paths the dynamo exporter records per node


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(("riformer_tiny", 4, 32), id="riformer_tiny"),
        pytest.param(("riformer_s12", 12, 64), id="riformer_s12", marks=pytest.mark.slow),
    ],
)
def riformer(request):
    """A RIFormer with O(1) parameters (its LayerScale init of 1e-5 would hide a bad fold), its
    number of blocks, and an input."""
    name, blocks, size = request.param
    model = randomise_(create(name), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model, repfx.fold(model, (x,)), x, blocks


def scopes(path) -> list[str]:
    proto = onnx.load(str(path))
    return [p.value for n in proto.graph.node for p in n.metadata_props if p.key == SCOPES]


def test_onnx_of_folded_riformer_has_no_token_mixer_and_runs(tmp_path, riformer):
    model, folded, x, blocks = riformer
    path = tmp_path / "folded.onnx"
    result = repfx.export_onnx(folded, (x,), path)
    assert result.exporter == "dynamo" and result.files == [path]
    assert result.check.runner == "onnxruntime" and result.check.passed
    assert result.nodes == sum(result.ops.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded.onnx"]  # one file, no temps

    # onnxruntime against the *original* model, within repfx.proof.tolerances.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert_close(torch.from_numpy(got), model(x))

    # No node comes from a token mixer; the unfolded model's ONNX (the control) has them.
    folded_scopes = scopes(path)
    assert folded_scopes and not any("token_mixer" in s for s in folded_scopes)
    unfolded = repfx.export_onnx(model, (x,), tmp_path / "unfolded.onnx", verify=False)
    assert sum("token_mixer" in s for s in scopes(unfolded.path)) >= 2 * blocks  # conv, sub
    # Per block: the mixer's depthwise 1×1 conv and its subtraction, and both LayerScale
    # multiplies, are gone; everything else is unchanged.
    assert unfolded.ops["Sub"] == blocks and "Sub" not in result.ops
    assert unfolded.ops["Conv"] - result.ops["Conv"] == blocks
    assert unfolded.ops["Mul"] - result.ops["Mul"] == 2 * blocks
    assert unfolded.nodes - result.nodes == 4 * blocks
    others = set(unfolded.ops) - {"Sub", "Conv", "Mul"}
    assert {op: result.ops[op] for op in others} == {op: unfolded.ops[op] for op in others}


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).relu()


def test_onnx_mismatch_raises_and_writes_nothing(tmp_path, monkeypatch):
    model, x = _Small().eval(), torch.randn(1, 3, 8, 8)
    path = tmp_path / "small.onnx"
    run = export._run_onnxruntime
    monkeypatch.setattr(export, "_run_onnxruntime", lambda p, i: [t + 0.1 for t in run(p, i)])
    with pytest.raises(ExportMismatchError, match="differs from the PyTorch model") as info:
        repfx.export_onnx(model, x, path)
    assert not info.value.check.passed and info.value.check.max_abs_error == pytest.approx(
        0.1, abs=1e-6
    )
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary directory


class _NumpyDetour(nn.Module):
    def forward(self, x):
        return torch.from_numpy(x.numpy() * 2)  # torch.export cannot trace through numpy


def test_pt2_export_failure_writes_nothing(tmp_path):
    with pytest.raises(ExportError, match=r"torch\.export failed"):
        save_pt2(_NumpyDetour(), (torch.randn(2, 3),), tmp_path / "x.pt2")
    assert list(tmp_path.iterdir()) == []


def test_pt2_and_existing_onnx_are_replaced_atomically(tmp_path):
    model, x = _Small().eval(), torch.randn(1, 3, 8, 8)
    pt2, onnx_path = tmp_path / "m.pt2", tmp_path / "m.onnx"
    onnx_path.write_bytes(b"old")
    check = save_pt2(model, (x,), pt2)
    assert check.runner == "torch.export.load" and check.passed
    result = repfx.export_onnx(model, x, onnx_path)  # the API replaces, the CLI asks --force
    assert onnx_path.read_bytes() != b"old" and result.ops == {"Conv": 1, "Relu": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.pt2"]
    with torch.no_grad():
        assert_close(torch.export.load(pt2).module()(x), model(x))


class _FixedBatch(nn.Module):
    """Flattens to a vector of one image's size: its code fixes the batch size to 1."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x).reshape(4 * 4 * 4)


def test_pt2_and_onnx_take_a_dynamic_batch_checked_at_two_sizes(tmp_path):
    model, x = _Small().eval(), torch.randn(1, 3, 8, 8)
    check = save_pt2(model, (x,), tmp_path / "m.pt2")
    assert check.batch_sizes == (1, 2)
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    onnx_result = repfx.export_onnx(model, x, tmp_path / "m.onnx")
    assert onnx_result.check.batch_sizes == (1, 2)
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    fresh = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = model(fresh)
        assert_close(loaded(fresh), expected)
    (actual,) = session.run(None, {session.get_inputs()[0].name: fresh.numpy()})
    assert_close(torch.from_numpy(actual), expected)


def test_a_model_that_fixes_its_batch_says_to_use_static_shapes(tmp_path):
    model, x = _FixedBatch().eval(), torch.randn(1, 3, 4, 4)
    with pytest.raises(ExportError, match="static shapes"):
        save_pt2(model, (x,), tmp_path / "m.pt2")
    check = save_pt2(model, (x,), tmp_path / "m.pt2", dynamic_batch=False)
    assert check.passed and check.batch_sizes == (1,)
    assert not (tmp_path / "m.onnx").exists()
