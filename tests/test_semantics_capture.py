"""Capture keeps the model's semantics: hooks, in-place ops, parametrized weights, and which
children of an untraceable module may be swapped for their folded form.

End-to-end tests compare ``repfx.fold`` with the original on a fresh input (another batch size
and values, parameters at O(1)), and check that the folded model writes to the caller's inputs
exactly where the original does.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from grammar import randomise_
from helpers import traced
from torch import fx, nn
from torch.nn.utils import parametrizations, parametrize

import repfx
from repfx.capture import CaptureError, capture, child_reason, copy_model, functionalize
from repfx.ir.graph import MUTATED_KEY, ConstantFolder
from repfx.ir.match import Fail
from repfx.ir.op_kinds import op_counts
from repfx.testing import assert_close

C = 4


def _random(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomise_(model, torch.Generator().manual_seed(seed)).eval()


def _fresh(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _run_both(model: nn.Module, folded: nn.Module, x: torch.Tensor):
    """Outputs of both on copies of ``x``, and the copies afterwards (what each wrote to)."""
    x_model, x_folded = x.clone(), x.clone()
    with torch.no_grad():
        expected, actual = model(x_model), folded(x_folded)
    assert torch.equal(actual.isnan(), expected.isnan())
    return actual, expected, x_folded, x_model


def _fold_matches(model: nn.Module, example: torch.Tensor, fresh: torch.Tensor) -> fx.GraphModule:
    """Fold on ``example``; on ``fresh``, same output and same writes to the input."""
    kept = example.clone()
    folded = repfx.fold(model, (example,))
    assert torch.equal(example, kept)  # folding writes nothing to the example
    actual, expected, x_folded, x_model = _run_both(model, folded, fresh)
    assert_close(actual, expected)
    assert torch.equal(x_folded, x_model)
    return folded


# ============================================================================ 8. hooks


def _scale_output(module, args, output):
    return output * 1.5 - 0.25


def test_global_forward_hooks_refuse_capture():
    model = nn.Sequential(nn.Conv2d(3, C, 1), nn.BatchNorm2d(C)).eval()
    for register in (
        nn.modules.module.register_module_forward_hook,
        nn.modules.module.register_module_forward_pre_hook,
    ):
        handle = register(lambda *args: None)
        try:
            with pytest.raises(CaptureError, match="global forward"):
                repfx.fold(model)
        finally:
            handle.remove()
    assert op_counts(repfx.fold(model))["batch_norm"] == 0  # and folds once they are gone


@pytest.mark.parametrize(
    "register",
    [
        lambda m: m.register_forward_hook(_scale_output),
        lambda m: m.register_forward_pre_hook(lambda module, args: (args[0] * 2,)),
        lambda m: m.register_forward_hook(
            lambda module, args, kwargs, out: out + 1, with_kwargs=True
        ),
    ],
    ids=["forward hook", "pre-hook", "hook with kwargs"],
)
def test_top_level_hooks_refuse_capture(register):
    model = _random(nn.Sequential(nn.Conv2d(3, C, 1), nn.BatchNorm2d(C)))
    register(model)
    with pytest.raises(CaptureError, match="remove the hooks or fold a submodule"):
        repfx.fold(model)
    folded = repfx.fold(model[0])  # a submodule without hooks folds
    assert isinstance(folded, fx.GraphModule)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)

    def forward(self, x):
        return self.bn(self.conv(x))


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.first, self.second = nn.Conv2d(3, C, 1), Block(), Block()

    def forward(self, x):
        return self.second(torch.relu(self.first(self.stem(x))))


def test_hooks_on_a_traced_submodule_run_in_the_folded_model():
    model = _random(TwoBlocks())
    seen: list[torch.Tensor] = []
    model.first.register_forward_hook(lambda m, args, out: seen.append(out.detach().clone()))
    model.second.register_forward_hook(_scale_output)
    model.second.register_forward_pre_hook(lambda m, args: (args[0] - 0.5,))
    folded = _fold_matches(model, _fresh(2, 3, 5, 5), _fresh(3, 3, 6, 4, seed=2))
    seen.clear()
    x = _fresh(3, 3, 4, 4, seed=3)
    with torch.no_grad():
        folded(x)
        model(x)
    assert len(seen) == 2  # the recording hook ran in the folded model too, on the same value
    assert_close(seen[0], seen[1])
    assert op_counts(folded)["batch_norm"] == 0  # folded inside the hooked blocks


def _add_to_input(module, args):
    args[0].add_(0.5)


class HookWritesItsInput(nn.Module):
    """A pre-hook of a ``torch.nn`` leaf writes to the leaf's input, a copy of ``x``."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, C, 1), nn.BatchNorm2d(C)
        self.bn.register_forward_pre_hook(_add_to_input)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y * 1) + y


def test_a_hook_that_writes_its_input_is_honoured():
    model = _random(HookWritesItsInput())
    _fold_matches(model, _fresh(2, 3, 4, 4), _fresh(3, 3, 5, 5, seed=2))


# ==================================================================== 9. in-place ops


class ConvBnMutateConvBn(nn.Module):
    """conv → BN → (in-place op) → conv → BN."""

    def __init__(self, mutate):
        super().__init__()
        self.mutate = mutate
        self.conv1, self.bn1 = nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C)
        self.conv2, self.bn2 = nn.Conv2d(C, C, 1), nn.BatchNorm2d(C)
        self.relu = nn.ReLU(inplace=True)
        self.leaky = nn.LeakyReLU(0.1, inplace=True)
        self.shift = nn.Parameter(torch.zeros(C))

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        y = self.mutate(self, y)
        return self.bn2(self.conv2(y))


def _augmented_add(m, y):
    y += 0.5
    return y


def _augmented_mul(m, y):
    y *= m.shift.view(-1, 1, 1)
    return y


def _statement(m, y):
    y.relu_()  # a statement: the result is unused, y is read afterwards
    return y


MUTATIONS = {
    "y.relu_()": lambda m, y: y.relu_(),
    "y.relu_() (statement)": _statement,
    "torch.relu_(y)": lambda m, y: torch.relu_(y),
    "F.relu(y, inplace=True)": lambda m, y: F.relu(y, inplace=True),
    "F.leaky_relu(y, 0.2, True)": lambda m, y: F.leaky_relu(y, 0.2, True),
    "F.hardtanh_(y)": lambda m, y: F.hardtanh_(y),
    "nn.ReLU(inplace=True)": lambda m, y: m.relu(y),
    "nn.LeakyReLU(inplace=True)": lambda m, y: m.leaky(y),
    "y.clamp_(min=-0.25)": lambda m, y: y.clamp_(min=-0.25),
    "y.add_(c)": lambda m, y: y.add_(0.75),
    "y.mul_(c)": lambda m, y: y.mul_(-1.5),
    "y.sub_(t)": lambda m, y: y.sub_(m.shift.view(-1, 1, 1)),
    "y += c": _augmented_add,
    "y *= t": _augmented_mul,
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_in_place_op_between_foldable_ops(mutation):
    model = _random(ConvBnMutateConvBn(MUTATIONS[mutation]))
    folded = _fold_matches(model, _fresh(2, 3, 5, 5), _fresh(3, 3, 4, 6, seed=2))
    assert op_counts(folded)["batch_norm"] == 0


class NoOpThenMutate(nn.Module):
    """``y = noop(x)``, then ``y`` written in place: ``x`` is the model's input."""

    def __init__(self, noop, mutation):
        super().__init__()
        self.noop, self.mutation = noop, mutation
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = NOOPS[self.noop](x)
        MUTATIONS[self.mutation](self, y)
        return self.conv(y) + x


NOOPS = {
    "x * 1": lambda x: x * 1,
    "x + 0": lambda x: x + 0,
    "x / 1": lambda x: x / 1,
    "1 * x": lambda x: 1 * x,
    "x - 0": lambda x: x - 0,
}


@pytest.mark.parametrize("mutation", ["y += c", "y.mul_(c)", "y.relu_()", "y.add_(c)"])
@pytest.mark.parametrize("noop", sorted(NOOPS))
def test_the_callers_input_is_not_written_by_a_removed_no_op(noop, mutation):
    model = _random(NoOpThenMutate(noop, mutation))
    folded = _fold_matches(model, _fresh(2, 3, 4, 4), _fresh(3, 3, 5, 5, seed=2))
    x = _fresh(2, 3, 4, 4, seed=3)
    kept = x.clone()
    with torch.no_grad():
        folded(x)
    assert torch.equal(x, kept)
    assert op_counts(folded)["no_op"] == 0  # the copy is gone: its write became out of place


class WritesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, C, 1), nn.BatchNorm2d(C)

    def forward(self, x):
        x.relu_()
        return self.bn(self.conv(x))


def test_a_write_to_the_callers_input_is_kept():
    model = _random(WritesItsInput())
    x = _fresh(3, 3, 4, 4, seed=2)
    folded = repfx.fold(model, (_fresh(2, 3, 4, 4),))
    actual, expected, x_folded, x_model = _run_both(model, folded, x)
    assert_close(actual, expected)
    assert torch.equal(x_folded, x_model) and not torch.equal(x_folded, x)  # both wrote to it
    gm, _ = capture(copy_model(model))
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    writer = next(n for n in gm.graph.nodes if n.target == "relu_")
    assert placeholder.meta.get(MUTATED_KEY) and writer.meta.get(MUTATED_KEY)


class WriteThroughAView(nn.Module):
    """``y`` is written while a view of it is alive: not private, so it stays and is marked."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, C, 1), nn.BatchNorm2d(C)
        self.conv2 = nn.Conv2d(C, C, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        flat = y.flatten(2)
        y.mul_(2)
        return self.conv2(y) + flat.sum(-1)[..., None, None]


def test_a_write_with_a_live_alias_is_marked_not_rewritten():
    model = _random(WriteThroughAView())
    gm, _ = capture(copy_model(model))
    marked = {n.name for n in gm.graph.nodes if n.meta.get(MUTATED_KEY)}
    assert {"bn", "flatten", "mul_"} <= marked
    assert "conv" not in marked  # bn allocates its result: the write cannot reach conv's
    assert ConstantFolder(gm).value(next(n for n in gm.graph.nodes if n.name == "bn")) is None
    _fold_matches(model, _fresh(2, 3, 4, 4), _fresh(3, 3, 5, 5, seed=2))


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, C, 1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.conv(x) * self.calls


def test_a_written_buffer_is_not_a_constant():
    model = _random(Counter())
    folded = repfx.fold(model)
    x = _fresh(2, 3, 3, 3)
    with torch.no_grad():
        for _ in range(3):
            assert_close(folded(x), model(x))  # the counter advances in both


def test_functionalize_rewrites_private_writes_and_redirects_later_readers():
    class Chain(nn.Module):
        def forward(self, x):
            y = torch.relu(x) * 2
            y.add_(1)
            y.relu_()
            return y + y

    gm = fx.symbolic_trace(Chain())
    functionalize(gm)
    targets = [n.target for n in gm.graph.nodes if n.op.startswith("call_")]
    assert "add_" not in targets and "relu_" not in targets
    assert not any(n.meta.get(MUTATED_KEY) for n in gm.graph.nodes)
    x = _fresh(3, 4)
    assert torch.equal(gm(x), Chain()(x))


def test_a_join_spelled_in_place_still_merges():
    class RepVGGInPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C))
            self.b = nn.Sequential(nn.Conv2d(C, C, 1), nn.BatchNorm2d(C))

        def forward(self, x):
            y = self.a(x)
            y += self.b(x)
            return y

    model = _random(RepVGGInPlace())
    folded = _fold_matches(model, _fresh(2, C, 5, 5), _fresh(3, C, 4, 6, seed=2))
    assert op_counts(folded)["conv"] == 1
    unknown_dtypes = repfx.fold(model)  # y + b(x) keeps a cast back to y's dtype: still exact
    actual, expected, _, _ = _run_both(model, unknown_dtypes, _fresh(3, C, 4, 6, seed=2))
    assert_close(actual, expected)


# ============================================================== 10. parametrizations


class Symmetrised(nn.Module):
    def forward(self, w):
        return (w + w.flip(-1)) / 2


def _legacy_weight_norm(conv: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.nn.utils.weight_norm(conv)


PARAMETRIZATIONS = {
    "weight_norm": lambda conv: parametrizations.weight_norm(conv),
    "weight_norm(dim=None)": lambda conv: parametrizations.weight_norm(conv, dim=None),
    "spectral_norm": lambda conv: parametrizations.spectral_norm(conv),
    "orthogonal": lambda conv: parametrizations.orthogonal(conv),
    "custom: symmetric kernel": lambda conv: parametrize.register_parametrization(
        conv, "weight", Symmetrised()
    ),
    "legacy weight_norm (pre-hook)": _legacy_weight_norm,
}
FOLDS = {
    "weight_norm",
    "weight_norm(dim=None)",
    "spectral_norm",
    "orthogonal",
    "custom: symmetric kernel",
}


@pytest.mark.parametrize("how", sorted(PARAMETRIZATIONS))
def test_parametrized_conv_next_to_a_batch_norm(how):
    conv = PARAMETRIZATIONS[how](nn.Conv2d(C, C, 3, padding=1))
    model = _random(nn.Sequential(nn.Conv2d(3, C, 1), conv, nn.BatchNorm2d(C)))
    with torch.no_grad():
        model(_fresh(2, 3, 4, 4))  # spectral norm: a first call sets its u, v
    model.eval()
    folded = _fold_matches(model, _fresh(2, 3, 5, 5), _fresh(3, 3, 4, 6, seed=2))
    assert op_counts(folded)["batch_norm"] == (0 if how in FOLDS else 1)


@pytest.mark.parametrize("how", ["weight_norm", "spectral_norm", "orthogonal"])
def test_baked_parametrizations_are_bit_identical(how):
    conv = _random(nn.Sequential(PARAMETRIZATIONS[how](nn.Conv2d(C, C, 3))))[0]
    with torch.no_grad():
        expected = conv.weight.clone()
    gm, _ = capture(copy_model(nn.Sequential(conv)))
    baked = gm.get_submodule("0").weight
    assert type(gm.get_submodule("0")) is nn.Conv2d and torch.equal(baked, expected)
    assert parametrize.is_parametrized(conv)  # the original keeps its parametrization
    with torch.no_grad():
        assert torch.equal(conv.weight, expected)  # and still computes it


def test_training_mode_spectral_norm_is_not_baked():
    conv = parametrizations.spectral_norm(nn.Conv2d(C, C, 3, padding=1))
    model = _random(nn.Sequential(conv, nn.BatchNorm2d(C)))
    conv.parametrizations.weight[0].train()  # power iteration on every call
    folded = repfx.fold(model)
    x = _fresh(2, C, 4, 4)
    with torch.no_grad():
        for _ in range(2):
            assert_close(folded(x), model(x))  # both iterate from the same u, v


# ====================================================== 11. children of an opaque parent


class Parent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 2, 1)
        self.block = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
        self.b = nn.Conv2d(2, 2, 1)


class DirectCalls(Parent):
    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return self.b(self.block(x))


class FirstParameterS(Parent):
    def forward(s, x):
        return s.a(s.block(x)) if x.sum() > 0 else s.b(x)


class Indexes(Parent):
    def forward(self, x):
        return self.block[0](x) + self.a(x)


class Iterates(Parent):
    def forward(self, x):
        for m in self.block:
            x = m(x)
        return self.a(x)


class GetAttr(Parent):
    def forward(self, x):
        name = "a"
        return getattr(self, name)(x)


class Children(Parent):
    def forward(self, x):
        for m in self.children():
            x = m(x) if isinstance(m, nn.Conv2d) else x
        return x


class ModulesDict(Parent):
    def forward(self, x):
        return self._modules["a"](x) + self.b(x)


class Length(Parent):
    def forward(self, x):
        return self.a(x) * len(self.block)


def _helper(module, x):
    return module.a(x)


class PassesSelf(Parent):
    def forward(self, x):
        return _helper(self, x) + self.b(x)


class OtherMethod(Parent):
    def forward(self, x):
        return self.scaled(x) + self.b(x)

    def scaled(self, x):
        return x * self.a.weight.sum()


class Property(Parent):
    @property
    def gain(self):
        return self.a.weight.mean()

    def forward(self, x):
        return self.b(x) * self.gain


class AttributeDict(Parent):
    def forward(self, x):
        return self.__dict__["_modules"]["a"](x)


class PlainList(Parent):
    def __init__(self):
        super().__init__()
        self.layers = [self.a]

    def forward(self, x):
        return self.layers[0](x) + self.b(x)


class SuperForward(DirectCalls):
    def forward(self, x):
        return super().forward(x) + self.a(x)


class Comprehension(Parent):
    def forward(self, x):
        return sum(self.a(t) for t in (x, -x)) + self.block(x)


class ReadsWeight(Parent):
    def forward(self, x):
        return self.a(x) + self.block(x) * self.b.weight.mean()


class Locals(Parent):
    def forward(self, x):
        return locals()["self"].a(x)


EXPECTED_ALLOWED = {  # class → the children it may have replaced
    DirectCalls: {"a", "block", "b"},
    FirstParameterS: {"a", "block", "b"},
    Indexes: {"a", "b"},
    Iterates: {"a", "b"},
    GetAttr: set(),
    Children: set(),
    ModulesDict: set(),
    Length: {"a", "b"},
    PassesSelf: set(),
    OtherMethod: {"block", "b"},
    Property: {"block", "b"},
    AttributeDict: set(),
    PlainList: {"block", "b"},
    SuperForward: {"a", "block", "b"},
    Comprehension: {"a", "block", "b"},
    ReadsWeight: {"a", "block"},
    Locals: set(),
}


@pytest.mark.parametrize("parent", list(EXPECTED_ALLOWED), ids=lambda c: c.__name__)
def test_child_reason_reads_what_the_parent_can_reach(parent):
    module = parent()
    allowed = {name for name in ("a", "block", "b") if child_reason(module, name) is None}
    assert allowed == EXPECTED_ALLOWED[parent]
    for name in {"a", "block", "b"} - allowed:
        assert isinstance(child_reason(module, name), Fail)


def test_child_reason_sees_hooks_and_shared_children():
    observing = DirectCalls()
    observing.register_forward_hook(lambda module, args, out: None)
    assert child_reason(observing, "a") is None  # the hook never reads the module
    reading = DirectCalls()
    reading.register_forward_hook(lambda module, args, out: out * module.a.weight.sum())
    assert "hook" in child_reason(reading, "a").reason
    partial_hook = DirectCalls()
    partial_hook.register_forward_hook(functools.partial(_scaled_hook, 2.0))
    assert child_reason(partial_hook, "a") is None
    shared = DirectCalls()
    shared.alias = shared.a  # the same conv under two names
    assert "also reachable" in child_reason(shared, "a").reason
    assert child_reason(DirectCalls(), "missing") is not None


def _scaled_hook(factor, module, args, out):
    return out * factor


def test_untraceable_module_folds_inside_and_stays_exact():
    model = _random(nn.Sequential(nn.Conv2d(3, 2, 1), Comprehension()))
    _fold_matches(model, _fresh(2, 3, 4, 4), _fresh(3, 3, 5, 5, seed=2))
    gm = traced(nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)))
    assert isinstance(gm, fx.GraphModule)
