"""The folded module returns what the original returns: the same container types (an
``OrderedDict``, a registered dataclass, nested named tuples and dicts, HuggingFace's
``ModelOutput``), whichever front end captured it, with or without example inputs."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple

import pytest
import torch
import torch.utils._pytree as pytree
from grammar import randomise_
from helpers import batch_norms, fresh_input
from torch import nn

import repfx
from repfx.testing import assert_close


@dataclasses.dataclass
class Features:
    fine: torch.Tensor
    coarse: torch.Tensor


pytree.register_dataclass(Features)
Pair = namedtuple("Pair", "main extra")


class Unregistered(dict):
    """A dict subclass torch's pytree does not know."""


class Heads(nn.Module):
    """A conv-BN trunk with two heads whose outputs come back in the container ``kind``."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.trunk = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.fine, self.coarse = nn.Conv2d(6, 4, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.trunk(x)
        fine, coarse = self.fine(y), self.coarse(y).mean((2, 3))
        if self.kind == "ordered_dict":
            return OrderedDict(out=fine, aux=coarse)
        if self.kind == "dataclass":
            return Features(fine, coarse)
        if self.kind == "nested":
            return Pair(fine, {"levels": OrderedDict(aux=[coarse, (fine,)])})
        if self.kind == "plain":
            return fine, {"aux": coarse}
        return (Unregistered(out=fine),)


def _model(kind: str) -> Heads:
    return randomise_(Heads(kind), torch.Generator().manual_seed(0)).eval()


def _assert_same_output(actual, expected) -> None:
    """Same containers (types, keys, fields) all the way down, and the same tensors."""
    assert pytree.tree_structure(actual) == pytree.tree_structure(expected)
    for got, want in zip(pytree.tree_leaves(actual), pytree.tree_leaves(expected), strict=True):
        assert_close(got, want)


@pytest.mark.parametrize("kind", ["ordered_dict", "dataclass", "nested", "plain"])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_the_folded_module_returns_the_originals_containers(kind, capture):
    model = _model(kind)
    folded = repfx.fold(model, (fresh_input(1, 3, 8, 8),), capture=capture)
    assert batch_norms(folded) == 0
    fresh = fresh_input(3, 3, 8, 8, seed=2)
    with torch.no_grad():
        _assert_same_output(folded(fresh), model(fresh))


@pytest.mark.parametrize("kind", ["ordered_dict", "dataclass", "nested"])
def test_without_example_inputs_the_containers_are_kept_too(kind):
    model = _model(kind)
    folded = repfx.fold(model)
    fresh = fresh_input(2, 3, 8, 8, seed=3)
    with torch.no_grad():
        _assert_same_output(folded(fresh), model(fresh))


def test_a_folded_module_keeps_its_containers_when_saved_and_loaded(tmp_path):
    model = _model("ordered_dict")
    folded = repfx.fold(model, (fresh_input(2, 3, 8, 8),))
    torch.save(folded, tmp_path / "folded.pt")
    loaded = torch.load(tmp_path / "folded.pt", weights_only=False)
    fresh = fresh_input(3, 3, 8, 8, seed=4)
    with torch.no_grad():
        _assert_same_output(loaded(fresh), model(fresh))


def test_a_container_pytree_does_not_know_is_refused_with_what_to_do():
    with pytest.raises(repfx.CaptureError, match=r"Unregistered.*register_pytree_node"):
        repfx.fold(_model("unregistered"))


def test_plain_containers_leave_the_graph_as_torch_fx_records_it():
    folded = repfx.fold(_model("plain"))
    assert "tree_unflatten" not in folded.code
