"""Folding inside a module that runs opaque, when its code reads a child as a value: the child
(an ``nn.ModuleList``, ``ModuleDict``, indexed ``Sequential``, an element read for ``m.f``) is
kept, its children are replaced whole, or kept in turn and theirs replaced, and only where a
float64 run of the opaque module shows the replacements change nothing."""

import pytest
import torch
from grammar import randomise_
from helpers import batch_norms, fresh_input
from torch import nn

import repfx
from repfx.report.fold_report import Skipped
from repfx.testing import assert_close

C = 4


class ConvBN(nn.Module):
    """ultralytics' ``Conv``: conv → BN → SiLU, each only called."""

    def __init__(self, c_in: int = C, c_out: int = C, k: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self):
        super().__init__()
        self.cv1, self.cv2 = ConvBN(), ConvBN()
        self.f, self.i = -1, 0  # read by the parent, as ultralytics' model loop reads them

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


def _data_dependent(x: torch.Tensor) -> torch.Tensor:
    """A branch on a tensor's value: stops torch.fx and torch.export alike."""
    return x if x.sum() > float("-inf") else -x


class Blocks(nn.Module):
    """Two bottlenecks in ``self.m``, read by the subclasses' forwards in various spellings."""

    def __init__(self, container: str = "list"):
        super().__init__()
        blocks = [Bottleneck(), Bottleneck()]
        if container == "dict":
            self.m = nn.ModuleDict({"first": blocks[0], "second": blocks[1]})
        elif container == "sequential":
            self.m = nn.Sequential(*blocks)
        else:
            self.m = nn.ModuleList(blocks)
        self.head = ConvBN(2 * C, C, 1)


class C2fLike(Blocks):
    """ultralytics' ``C2f``: elements called in a generator expression."""

    def forward(self, x):
        y = [_data_dependent(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.head(torch.cat(y[1:], 1))


class LoopReadsAttributes(Blocks):
    """ultralytics' model loop: each element's ``f`` and ``i`` read, then the element called."""

    def forward(self, x):
        outputs = []
        for m in self.m:
            x = m(_data_dependent(x)) if m.f == -1 else x
            outputs.append(x * (m.i + 1))
        return self.head(torch.cat(outputs, 1))


class Indexes(Blocks):
    def __init__(self):
        super().__init__("sequential")

    def forward(self, x):
        x = self.m[1](self.m[0](_data_dependent(x)))
        return self.head(torch.cat([x, x], 1))


class DictItems(Blocks):
    def __init__(self):
        super().__init__("dict")

    def forward(self, x):
        y = [block(_data_dependent(x)) for _, block in self.m.items()]
        return self.head(torch.cat(y, 1))


class Nested(nn.Module):
    """A ``ModuleList`` of ``ModuleList`` s, iterated twice over."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([nn.ModuleList([Bottleneck()]), nn.ModuleList([Bottleneck()])])

    def forward(self, x):
        for stage in self.stages:
            for block in stage:
                x = block(_data_dependent(x))
        return x


SPELLINGS = [C2fLike, LoopReadsAttributes, Indexes, DictItems, Nested]


def _model(parent: nn.Module, seed: int = 0) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, C, 1), parent)
    return randomise_(model, torch.Generator().manual_seed(seed)).eval()


def _capture_skips(folded: nn.Module) -> list[Skipped]:
    return [s for s in folded.meta["repfx_report"].skipped if s.rule == "capture"]


def _assert_exact_on_fresh_input(folded: nn.Module, model: nn.Module) -> None:
    x = fresh_input(3, 3, 6, 6, seed=7)
    with torch.no_grad():
        assert_close(folded(x), model(x))


@pytest.mark.parametrize("parent", SPELLINGS, ids=lambda c: c.__name__)
def test_children_of_a_container_read_as_a_value_fold(parent):
    model = _model(parent())
    folded = repfx.fold(model, fresh_input(2, 3, 6, 6))
    assert batch_norms(model) > 0
    assert batch_norms(folded) == 0
    _assert_exact_on_fresh_input(folded, model)


def test_elements_whose_attributes_the_parent_reads_are_kept_and_folded_inside():
    model = _model(LoopReadsAttributes())
    folded = repfx.fold(model, fresh_input(2, 3, 6, 6))
    assert batch_norms(folded) == 0
    _assert_exact_on_fresh_input(folded, model)
    kept = [m for m in folded.modules() if isinstance(m, Bottleneck)]
    assert len(kept) == 2  # replaced whole, they would lose the f and i the parent reads
    assert all((m.f, m.i) == (-1, 0) for m in kept)
    assert not any(isinstance(m, ConvBN) for m in folded.modules())  # folded inside them


def test_the_user_model_keeps_its_modules():
    model = _model(C2fLike())
    before = {name: type(m) for name, m in model.named_modules()}
    repfx.fold(model, fresh_input(2, 3, 6, 6))
    assert {name: type(m) for name, m in model.named_modules()} == before


class ReadsAWeightInside(C2fLike):
    def forward(self, x):
        return super().forward(x) * self.m[0].cv1.conv.weight.mean()


class ChecksATypeInside(C2fLike):
    def forward(self, x):
        out = super().forward(x)
        return out if isinstance(self.m[1].cv2, ConvBN) else 2 * out


class ReadsAnAttributeInside(C2fLike):
    def forward(self, x):
        return super().forward(x) * self.m[0].cv2.bn.eps * 1e5


READS_INSIDE = {  # parent → the replacement its code can tell apart
    ReadsAWeightInside: "m.0.cv1",
    ChecksATypeInside: "m.1.cv2",
    ReadsAnAttributeInside: "m.0.cv2",
}


@pytest.mark.parametrize("parent", list(READS_INSIDE), ids=lambda c: c.__name__)
def test_a_replacement_the_parent_can_tell_apart_is_refused(parent):
    model = _model(parent())
    folded = repfx.fold(model, fresh_input(2, 3, 6, 6))
    _assert_exact_on_fresh_input(folded, model)
    assert batch_norms(folded) == 1  # everything else is replaced
    told_apart = READS_INSIDE[parent]
    kept = [s.where.removeprefix("1.") for s in _capture_skips(folded) if "folded" in s.reason]
    assert kept and all(where.startswith(told_apart) for where in kept)
    assert any(told_apart in s.reason for s in _capture_skips(folded))


def test_without_example_inputs_nothing_under_a_kept_child_is_replaced():
    model = _model(C2fLike())
    folded = repfx.fold(model)
    _assert_exact_on_fresh_input(folded, model)
    assert batch_norms(folded) == 4  # the bottlenecks' four; the head's folded
    reasons = [s.reason for s in _capture_skips(folded) if s.where == "1.m"]
    assert len(reasons) == 1 and "example inputs" in reasons[0]


class HeldElsewhere(C2fLike):
    def __init__(self):
        super().__init__()
        self.head.peers = [self.m]  # another module holds the container


def test_a_kept_child_held_elsewhere_is_not_gone_into():
    model = _model(HeldElsewhere())
    folded = repfx.fold(model, fresh_input(2, 3, 6, 6))
    _assert_exact_on_fresh_input(folded, model)
    assert batch_norms(folded) == 4
    assert any("holds a reference" in s.reason for s in _capture_skips(folded))


def test_an_element_at_two_call_sites_is_not_replaced():
    parent = C2fLike()
    parent.m[1] = parent.m[0]  # one bottleneck called twice
    model = _model(parent)
    folded = repfx.fold(model, fresh_input(2, 3, 6, 6))
    _assert_exact_on_fresh_input(folded, model)
    assert any(s.reason == "module is shared" for s in _capture_skips(folded))
    assert batch_norms(folded) == 2


def test_re_drawn_parameters_fold_the_same():
    for seed in range(3):
        model = _model(LoopReadsAttributes(), seed=seed)
        folded = repfx.fold(model, fresh_input(2, 3, 6, 6, seed=seed))
        assert batch_norms(folded) == 0
        _assert_exact_on_fresh_input(folded, model)


class ReadsAWeightOnOtherInputs(C2fLike):
    """Reads inside ``m[0].cv1`` only where the input's mean is negative: a branch the example
    inputs (all positive) do not take."""

    def forward(self, x):
        if x.mean() > 0:
            return super().forward(x)
        return nn.functional.conv2d(x, self.m[0].cv1.conv.weight, padding=1)


class ReadsAWeightOnLargeInputs(C2fLike):
    """The same, on inputs of another magnitude."""

    def forward(self, x):
        out = super().forward(x)
        if x.abs().max() > 10:
            return out * self.m[1].cv2.conv.weight.sum()
        return out


class ReadsAWeightOnNegativeInputs(C2fLike):
    """Reads inside ``m[0].cv1`` only where every input value is negative: a branch neither
    the example inputs (all positive) nor inputs re-drawn around 0 take, only their negation."""

    def forward(self, x):
        if x.max() < 0:
            return nn.functional.conv2d(x, self.m[0].cv1.conv.weight, padding=1)
        return super().forward(x)


@pytest.mark.parametrize(
    "parent",
    [ReadsAWeightOnOtherInputs, ReadsAWeightOnLargeInputs, ReadsAWeightOnNegativeInputs],
    ids=lambda c: c.__name__,
)
def test_a_parent_reading_inside_on_other_inputs_than_the_examples_keeps_it(parent):
    model = randomise_(parent(), torch.Generator().manual_seed(0)).eval()
    example = fresh_input(2, C, 6, 6).abs() + 0.1  # positive, at most a few units
    folded = repfx.fold(model, (example,))
    for x in (example, -example, 20 * fresh_input(3, C, 6, 6, seed=5)):
        with torch.no_grad():
            assert_close(folded(x), model(x))
    notes = " ".join(folded.meta[repfx.REPORT_KEY].notes)
    assert "proven on the example inputs, their negation" in notes
