"""Detectors nobody on the team wrote: torchvision's (a forward over a list of images, NMS that
no front end captures) and ultralytics YOLO (``forward(x, *args)``, ``C2f`` blocks that loop
over a ``ModuleList``). Random weights re-drawn at O(1), no downloads; every BatchNorm that
``model.fuse()`` removes is folded, and the raw outputs (before NMS) match in float64 on a
fresh input of another batch size."""

import pytest
import torch
from grammar import randomise_
from helpers import batch_norms
from torch import nn

import repfx
from repfx.capture import AS_IS

pytestmark = pytest.mark.slow


def float64_model(model: nn.Module) -> nn.Module:
    return randomise_(model, torch.Generator().manual_seed(0)).eval().double()


def assert_same_leaves(actual: object, expected: object) -> None:
    got, want = torch.utils._pytree.tree_leaves(actual), torch.utils._pytree.tree_leaves(expected)
    assert len(got) == len(want) > 0
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9 * e.abs().max().item())


@pytest.mark.parametrize("config", ["yolov8n.yaml", "yolo11n.yaml"])
def test_ultralytics_yolo_folds_every_batch_norm_exactly(config):
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = float64_model(DetectionModel(config, verbose=False))
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    folded = repfx.fold(model, x)
    assert batch_norms(folded) == 0  # model.fuse() leaves none either
    g = torch.Generator().manual_seed(1)
    fresh = torch.rand(3, 3, 64, 64, dtype=torch.float64, generator=g)
    with torch.no_grad():
        assert_same_leaves(folded(fresh), model(fresh))


@pytest.mark.parametrize("config", ["yolov8n.yaml", "yolo11n.yaml"])
def test_ultralytics_yolo_captured_by_fx_leaves_no_batch_norm(config):
    """``forward(x, *args, **kwargs)`` called with ``x`` is traced with empty ``*args`` /
    ``**kwargs``, and ``C2f`` / ``C3k2``'s ``list(x.chunk(2, 1))`` as two parts: only the
    ``Detect`` head (control flow on its input's shape) stays opaque, folded inside."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = float64_model(DetectionModel(config, verbose=False))
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    folded = repfx.fold(model, x, capture="fx")
    opaque = folded.meta[repfx.REPORT_KEY].opaque_modules
    assert [type(folded.get_submodule(path)).__name__ for path in opaque] == ["Detect"]
    assert batch_norms(folded) == 0
    g = torch.Generator().manual_seed(1)
    fresh = torch.rand(3, 3, 64, 64, dtype=torch.float64, generator=g)
    with torch.no_grad():
        assert_same_leaves(folded(fresh), model(fresh))
    with pytest.raises(TypeError):  # the fold is of forward(x): an extra argument is refused
        folded(fresh, True)


class _PredictOnce(nn.Module):
    """ultralytics' model loop as a plain ``forward(x)``: torch.fx traces the loop, and the
    ``C2f`` / ``C3k2`` / ``Detect`` layers run opaque (they read their ``ModuleList`` s as
    values)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model._predict_once(x)


@pytest.mark.parametrize("config", ["yolov8n.yaml", "yolo11n.yaml"])
def test_ultralytics_layers_fx_runs_opaque_are_folded_inside(config):
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = _PredictOnce(float64_model(DetectionModel(config, verbose=False)))
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    folded = repfx.fold(model, x, capture="fx")
    opaque = folded.meta["repfx_report"].opaque_modules
    assert opaque and all(batch_norms(folded.get_submodule(path)) == 0 for path in opaque)
    g = torch.Generator().manual_seed(1)
    fresh = torch.rand(3, 3, 96, 96, dtype=torch.float64, generator=g)
    with torch.no_grad():
        assert_same_leaves(folded(fresh), model(fresh))


def _torchvision_detector(name: str) -> nn.Module:
    from torchvision.models import detection

    torch.manual_seed(0)
    return float64_model(getattr(detection, name)(weights=None, weights_backbone=None))


def _images(count: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 160, 160, dtype=torch.float64, generator=g) for _ in range(count)]


def _features(detector: nn.Module, images: list[torch.Tensor]) -> list[torch.Tensor]:
    batch = detector.transform(images)[0].tensors
    features = detector.backbone(batch)
    return list(features.values()) if isinstance(features, dict) else [features]


def test_ssdlite_folds_backbone_and_head_and_matches_before_nms():
    model = _torchvision_detector("ssdlite320_mobilenet_v3_large")
    folded = repfx.fold(model, (_images(2, 0),))
    assert batch_norms(folded) == 0
    inner = folded.get_submodule(AS_IS)  # the top-level forward (NMS) runs as it is
    images = _images(3, 1)
    with torch.no_grad():
        expected = model.head(_features(model, images))
        actual = inner.head(_features(inner, images))
    assert_same_leaves(actual, expected)


def test_fasterrcnn_folds_its_backbone_and_matches_before_nms():
    model = _torchvision_detector("fasterrcnn_mobilenet_v3_large_320_fpn")
    folded = repfx.fold(model, (_images(2, 0),))
    assert batch_norms(folded) == 0
    inner = folded.get_submodule(AS_IS)
    images = _images(3, 1)
    with torch.no_grad():
        expected_features = _features(model, images)
        actual_features = _features(inner, images)
        assert_same_leaves(actual_features, expected_features)
        assert_same_leaves(inner.rpn.head(actual_features), model.rpn.head(expected_features))
