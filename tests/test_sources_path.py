"""Building a model from ``module:factory`` leaves ``sys.path`` as it found it."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
from torch import nn

from repfx.sources import SourceError, build_model

FACTORY_MODULE = """
from torch import nn

import factory_helper


def build():
    return nn.Sequential(nn.Linear(2, factory_helper.WIDTH), nn.ReLU())
"""


@pytest.fixture
def factory_dir(tmp_path, monkeypatch):
    """A temporary current directory with a factory module (importing a sibling module), and
    a ``sys.path`` on which that directory is not importable yet."""
    (tmp_path / "path_factory.py").write_text(textwrap.dedent(FACTORY_MODULE))
    (tmp_path / "factory_helper.py").write_text("WIDTH = 3\n")
    monkeypatch.chdir(tmp_path)
    outside = [p for p in sys.path if p not in ("", os.getcwd(), str(tmp_path))]
    monkeypatch.setattr(sys, "path", outside)
    for name in ("path_factory", "factory_helper"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield tmp_path
    for name in ("path_factory", "factory_helper"):
        sys.modules.pop(name, None)


def test_factory_leaves_sys_path_unchanged(factory_dir):
    before = list(sys.path)
    loaded = build_model("path_factory:build")
    assert sys.path == before
    assert str(factory_dir) not in sys.path
    # The module was importable (with its sibling) while it was imported, and keeps working.
    assert loaded.kind == "factory"
    assert isinstance(loaded.model, nn.Sequential)
    assert loaded.model[0].out_features == 3
    assert sys.modules["path_factory"].build()[0].out_features == 3


def test_failed_factory_import_leaves_sys_path_unchanged(factory_dir):
    (factory_dir / "broken_factory.py").write_text("raise RuntimeError('boom')\n")
    before = list(sys.path)
    try:
        with pytest.raises(SourceError, match="importing 'broken_factory' failed"):
            build_model("broken_factory:build")
    finally:
        sys.modules.pop("broken_factory", None)
    assert sys.path == before


def test_a_factory_may_import_its_siblings_when_called(factory_dir):
    (factory_dir / "lazy_factory.py").write_text(
        "def build():\n    import factory_helper\n\n"
        "    from torch import nn\n\n    return nn.Linear(2, factory_helper.WIDTH)\n"
    )
    before = list(sys.path)
    try:
        assert build_model("lazy_factory:build").model.out_features == 3
    finally:
        sys.modules.pop("lazy_factory", None)
    assert sys.path == before
