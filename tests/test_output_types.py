"""The folded module returns what the original returns: the same container types (an
``OrderedDict``, a registered dataclass, nested named tuples and dicts, HuggingFace's
``ModelOutput``), whichever front end captured it, with or without example inputs."""

from __future__ import annotations

import dataclasses
import io
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


class Layer:
    def __init__(self, keys: torch.Tensor, owner: object = None) -> None:
        self.keys, self.ready, self.owner = keys, True, owner


class Cache:
    """An object torch's pytree does not know, shaped like a decoder's key / value cache:
    tensors in a list of objects, next to plain attributes."""

    def __init__(self) -> None:
        self.layers: list[Layer] = []
        self.seen = 0


class CachingHeads(Heads):
    """Returns its heads' outputs in a :class:`Cache` too (``owner``: a layer refers to a
    module; ``sized``: the cache counts the batch)."""

    def __init__(self, owner: bool = False, sized: bool = False):
        super().__init__("plain")
        self.owner, self.sized = owner, sized

    def forward(self, x):
        y = self.trunk(x)
        fine, coarse = self.fine(y), self.coarse(y).mean((2, 3))
        cache = Cache()
        cache.layers = [Layer(fine, self.fine if self.owner else None), Layer(coarse)]
        cache.seen = x.shape[0] if self.sized else 2
        return {"logits": coarse * 2, "cache": cache}


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


@pytest.mark.parametrize("kind", ["ordered_dict", "dataclass", "nested"])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_folded_module_keeps_its_containers_when_saved_and_loaded(tmp_path, kind, capture):
    model = _model(kind)
    folded = repfx.fold(model, (fresh_input(2, 3, 8, 8),), capture=capture)
    torch.save(folded, tmp_path / "folded.pt")
    fresh = fresh_input(3, 3, 8, 8, seed=4)
    for _ in range(2):
        loaded = torch.load(tmp_path / "folded.pt", weights_only=False)
        with torch.no_grad():
            _assert_same_output(loaded(fresh), model(fresh))


def test_a_container_pytree_does_not_know_is_refused_with_what_to_do():
    with pytest.raises(repfx.CaptureError, match=r"Unregistered.*register_pytree_node"):
        repfx.fold(_model("unregistered"))


def test_an_object_pytree_does_not_know_comes_back_as_that_object():
    """A cache object in the output: export captures its tensors, and every call of the folded
    module returns a new object of the same type with that call's tensors in it."""
    model = randomise_(CachingHeads(), torch.Generator().manual_seed(0)).eval()
    folded = repfx.fold(model, (fresh_input(1, 3, 8, 8),), capture="export")
    assert batch_norms(folded) == 0
    fresh = fresh_input(3, 3, 8, 8, seed=2)
    with torch.no_grad():
        got, want = folded(fresh), model(fresh)
        again = folded(fresh_input(2, 3, 8, 8, seed=3))
    assert_close(got["logits"], want["logits"])
    cache = got["cache"]
    assert type(cache) is Cache and cache.seen == 2
    assert [type(layer) for layer in cache.layers] == [Layer, Layer]
    for layer, expected in zip(cache.layers, want["cache"].layers, strict=True):
        assert layer.ready and layer.owner is None
        assert_close(layer.keys, expected.keys)
    assert again["cache"] is not cache and again["cache"].layers[0].keys.shape[0] == 2
    buffer = io.BytesIO()
    torch.save(folded, buffer)
    buffer.seek(0)
    with torch.no_grad():
        loaded = torch.load(buffer, weights_only=False)(fresh)
    assert type(loaded["cache"]) is Cache
    assert_close(loaded["cache"].layers[1].keys, want["cache"].layers[1].keys)


def test_an_output_object_that_holds_a_module_is_refused_with_what_to_do():
    model = randomise_(CachingHeads(owner=True), torch.Generator().manual_seed(0)).eval()
    with pytest.raises(
        repfx.CaptureError, match=r"^the model returns a Cache that holds a module.*tensors instead"
    ):
        repfx.fold(model, (fresh_input(1, 3, 8, 8),), capture="export")


def test_an_output_object_that_stores_a_size_keeps_the_example_shapes_and_says_why():
    model = randomise_(CachingHeads(sized=True), torch.Generator().manual_seed(0)).eval()
    folded = repfx.fold(model, (fresh_input(1, 3, 8, 8),), capture="export")
    notes = " ".join(folded.meta[repfx.REPORT_KEY].notes)
    assert "static shapes" in notes and "stores a size of its inputs" in notes, notes
    with torch.no_grad():
        assert folded(fresh_input(1, 3, 8, 8, seed=2))["cache"].seen == 1
    with pytest.raises(repfx.GuardError, match=r"x\.size\(\)\[0\] == 1"):
        folded(fresh_input(2, 3, 8, 8, seed=2))


def test_plain_containers_leave_the_graph_as_torch_fx_records_it():
    folded = repfx.fold(_model("plain"))
    assert "tree_unflatten" not in folded.code
