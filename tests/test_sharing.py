"""repfx's working copies share the parameters they do not change with the user's model
(``repfx.proof.sharing``): nothing ever writes through them to the user's model, and the fold
handed back shares nothing with it."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import fresh_input
from torch import nn

import repfx
from repfx.proof.inputs import copy_model, run
from repfx.proof.redraw import redraw_foldable_parameters_
from repfx.proof.sharing import SharedParameters, run_sharing, share_parameters


def _storages(module: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}


def _values(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_values(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)
        self.tied = nn.Linear(4, 4, bias=False)

    def forward(self, x):
        y = self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))
        return self.tied(y) + y @ self.tied.weight


def test_a_shared_copy_uses_the_same_storage_and_its_own_parameter_objects():
    model = _Net().eval()
    copy, shared = share_parameters(model)
    for (name, mine), theirs in zip(copy.named_parameters(), model.parameters(), strict=True):
        assert mine is not theirs, name
        assert mine.untyped_storage().data_ptr() == theirs.untyped_storage().data_ptr(), name
        assert shared.shares(mine)
    assert not any(shared.shares(b) for b in copy.buffers())  # buffers are copied
    copy.double()  # converting the copy installs new data in its own parameter objects
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_release_copies_only_what_it_is_asked_to_and_keeps_ties():
    model = _Net().eval()
    model.other = nn.Linear(4, 4, bias=False)
    model.other.weight = model.tied.weight  # one parameter, two modules
    copy, shared = share_parameters(model)
    assert shared.release(copy, only=[copy.head.weight]) == 1
    assert not shared.shares(copy.head.weight) and shared.shares(copy.head.bias)
    distinct = len(list(copy.parameters()))  # (each tied parameter once)
    assert shared.release(copy) == distinct - 1
    assert copy.other.weight is copy.tied.weight
    assert not any(shared.shares(p) for p in copy.parameters())
    assert not SharedParameters(model).shares(copy.other.weight)


def test_the_fold_handed_back_shares_no_tensor_with_the_model():
    model = redraw_foldable_parameters_(_Net(), seed=3).eval()  # (not the verification's seed)
    x = fresh_input(2, 3, 6, 6)
    before = _values(model)
    folded = repfx.fold(model, (x,))
    assert not _storages(folded) & _storages(model)
    with torch.no_grad():
        for p in folded.parameters():
            p.mul_(2)
    assert _same_values(_values(model), before)


class _WritesItsScale(nn.Module):
    """A forward that writes one of its parameters in place (capture records the write)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.scale = nn.Parameter(torch.full((4,), 1.5))

    def forward(self, x):
        with torch.no_grad():
            self.scale.add_(0.25)
        return self.conv(x) * self.scale.view(1, -1, 1, 1)


class _Gate(nn.Module):
    """Untraceable (a branch on a value), and writes its weight through ``.data``."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, x):
        self.weight.data.mul_(1.5)
        if x.sum() > 0:
            return x * self.weight.view(1, -1, 1, 1)
        return x


class _HoldsGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.gate = _Gate()

    def forward(self, x):
        return self.gate(self.bn(self.conv(x)))


def _hooked() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)).eval()

    def hook(module, args, output):
        module.weight.data.add_(0.5)

    model[2].register_forward_hook(hook)
    return model


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("kind", ["recorded write", "untraced module", "hook"])
@pytest.mark.parametrize("capture", ["fx", "auto"])
def test_a_model_that_writes_its_own_parameters_is_left_as_it_was(kind, capture, verify):
    model = {"recorded write": _WritesItsScale, "untraced module": _HoldsGate}.get(kind, _hooked)()
    model = redraw_foldable_parameters_(model.eval(), seed=2)
    before = _values(model)
    with contextlib.suppress(repfx.Error):  # refusing is fine; changing the model is not
        repfx.fold(model, (fresh_input(2, 3, 5, 5),), capture=capture, verify=verify)
    assert _same_values(_values(model), before)


class _SwallowsErrors(nn.Module):
    """Writes its weight inside a ``try`` that swallows every ``Exception``: the write must not
    be skipped silently when running on a shared copy stops it."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.full((4,), 2.0))

    def forward(self, x):
        with contextlib.suppress(Exception):
            self.weight.data[:2] += 1.0
        return x * self.weight.view(1, -1, 1, 1)


@pytest.mark.parametrize(
    ("build", "channels"), [(_WritesItsScale, 3), (_Gate, 4), (_hooked, 3), (_SwallowsErrors, 4)]
)
def test_a_run_sharing_the_parameters_computes_what_a_run_on_a_full_copy_does(build, channels):
    model = redraw_foldable_parameters_(build().eval(), seed=3)
    inputs = (fresh_input(2, channels, 5, 5),)
    before = _values(model)
    full_copy = copy_model(model)
    want = [run(full_copy, inputs), run(full_copy, inputs)]
    got = run_sharing(model, inputs, calls=2)
    assert len(got) == 2 and all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert _same_values(_values(model), before)


def test_a_run_sharing_the_parameters_copies_none_of_them():
    model = _Net().eval()
    seen: list[set[int]] = []
    model.head.register_forward_hook(lambda m, a, o: seen.append(_storages(m)))
    run_sharing(model, (fresh_input(2, 3, 6, 6),))
    assert seen and seen[0] <= _storages(model)


def test_release_reaches_plain_tensor_attributes_too():
    model = _Net().eval()
    copy, shared = share_parameters(model)
    copy.alias = copy.head.weight.detach()  # a plain attribute over the model's storage
    assert shared.shares(copy.alias)
    shared.release(copy)
    assert not shared.shares(copy.alias) and torch.equal(copy.alias, model.head.weight)
