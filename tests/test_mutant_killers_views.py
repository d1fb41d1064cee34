"""Op views, plain modules and constants read exactly what the node says (found by
``tools/mutants.py``).

``repfx.capture`` writes every argument of a functional call out, traces through
stochastic-depth modules and marks values written in place, so through ``repfx.fold`` some view
rules are backed up by capture or by the commit point. The views also serve graphs capture did
not make (dynamo's, a hand-built one), so their own contract is tested on such graphs: a default
argument of a functional call, a stochastic-depth module kept as a module. The other tests fold
a model with O(1) parameters and compare with the original on a fresh input of another size.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from grammar import randomise_
from helpers import fold_matches, fresh_input
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from repfx.capture import capture, copy_model
from repfx.ir.graph import ConstantFolder, annotate_ranks, is_plain
from repfx.ir.match import Fail
from repfx.ir.op_kinds import op_counts
from repfx.ir.ops import affine_op, batch_norm_reason, identity_input
from repfx.testing import assert_close

C = 4


def _random(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomise_(model, torch.Generator().manual_seed(seed)).eval()


def _plain_trace(model: nn.Module, leaves: tuple[type, ...] = ()) -> fx.GraphModule:
    """``symbolic_trace`` with the modules of type ``leaves`` kept as call_module nodes; shapes
    propagated on a batch of 2 × C × 5 × 5."""

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

    tracer = Tracer()
    gm = fx.GraphModule(model, tracer.trace(model))
    ShapeProp(gm).propagate(torch.randn(2, C, 5, 5, generator=torch.Generator().manual_seed(1)))
    annotate_ranks(gm)
    return gm


def _only(gm: fx.GraphModule, predicate) -> fx.Node:
    found = [n for n in gm.graph.nodes if predicate(n)]
    assert len(found) == 1, found
    return found[0]


# ------------------------------------------------- training flags, on graphs capture did not make


class Functional(nn.Module):
    """``call(self, x)`` on this module's batch-norm tensors."""

    def __init__(self, call):
        super().__init__()
        self.call = call
        gen = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(1 + 0.5 * torch.randn(C, generator=gen))
        self.bias = nn.Parameter(0.5 * torch.randn(C, generator=gen))
        self.register_buffer("running_mean", 0.5 * torch.randn(C, generator=gen))
        self.register_buffer("running_var", 0.5 + torch.rand(C, generator=gen))

    def forward(self, x):
        return self.call(self, x)


TRAINING_BATCH_NORMS = {
    "F.batch_norm(..., True)": lambda m, x: F.batch_norm(
        x, m.running_mean, m.running_var, m.weight, m.bias, True
    ),
    "F.batch_norm(training=True)": lambda m, x: F.batch_norm(
        x, m.running_mean, m.running_var, m.weight, m.bias, training=True
    ),
    "torch.batch_norm(..., True, ...)": lambda m, x: torch.batch_norm(
        x, m.weight, m.bias, m.running_mean, m.running_var, True, 0.1, 1e-5, False
    ),
}


@pytest.mark.parametrize("spelling", sorted(TRAINING_BATCH_NORMS))
def test_training_mode_functional_batch_norm_is_no_affine(spelling):
    """Batch statistics: not ``s ⊙ x + t`` with constants, even where nothing marked the
    running statistics as written."""
    gm = _plain_trace(Functional(TRAINING_BATCH_NORMS[spelling]))
    node = _only(gm, lambda n: n.op == "call_function" and "batch_norm" in str(n.target))
    consts = ConstantFolder(gm)
    fail = batch_norm_reason(gm, node, consts)
    assert isinstance(fail, Fail) and "training mode" in fail.reason
    assert affine_op(gm, node, consts) is None


def test_eval_mode_functional_batch_norm_is_an_affine():
    """The positive case: ``F.batch_norm`` defaults to ``training=False``."""
    gm = _plain_trace(
        Functional(lambda m, x: F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias))
    )
    node = _only(gm, lambda n: n.op == "call_function" and "batch_norm" in str(n.target))
    consts = ConstantFolder(gm)
    assert batch_norm_reason(gm, node, consts) is None
    assert affine_op(gm, node, consts) is not None


DROPOUTS_IN_TRAINING = {
    "F.dropout(x, 0.5)": (F.dropout, (0.5,), {}),
    "F.dropout(x, p=0.5)": (F.dropout, (), {"p": 0.5}),
    "F.dropout2d(x, 0.5)": (F.dropout2d, (0.5,), {}),
}


@pytest.mark.parametrize("spelling", sorted(DROPOUTS_IN_TRAINING))
def test_functional_dropout_without_training_false_is_kept(spelling):
    """``F.dropout`` defaults to ``training=True``: it drops, whatever mode the module is in.
    The call is built by hand, as written: tracing would spell the default out."""
    target, args, kwargs = DROPOUTS_IN_TRAINING[spelling]
    graph = fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_function(target, (x, *args), kwargs)
    graph.output(node)
    gm = fx.GraphModule(nn.Module().eval(), graph)
    assert identity_input(gm, node) == Fail("dropout in training mode")
    node.kwargs = {**kwargs, "training": False}
    assert identity_input(gm, node) is x


def _drop_paths() -> dict:
    from timm.layers import DropPath as TimmDropPath

    from repfx.models import DropPath

    return {"repfx DropPath": DropPath, "timm DropPath": TimmDropPath}


class Residual(nn.Module):
    def __init__(self, drop: nn.Module):
        super().__init__()
        self.conv, self.drop = nn.Conv2d(C, C, 3, padding=1), drop

    def forward(self, x):
        return x + self.drop(self.conv(x))


@pytest.mark.parametrize("name", sorted(_drop_paths()))
def test_drop_path_module_is_the_identity_only_in_eval_mode_or_at_rate_0(name):
    kind = _drop_paths()[name]

    def view(rate: float, training: bool):
        model = Residual(kind(rate)).train(training)
        gm = _plain_trace(model, leaves=(kind,))
        node = _only(gm, lambda n: n.op == "call_module" and n.target == "drop")
        return identity_input(gm, node), node.args[0]

    found, _ = view(0.5, training=True)
    assert found == Fail("DropPath in training mode")
    for rate, training in ((0.5, False), (0.0, True)):
        found, x = view(rate, training)
        assert found is x


# -------------------------------------------------------- arithmetic and layout views, end to end


class ConvThen(nn.Module):
    """``expression(conv(x), c)`` with ``c`` a per-channel parameter of shape (C, 1, 1)."""

    def __init__(self, expression):
        super().__init__()
        self.expression = expression
        self.conv = nn.Conv2d(3, C, 1)
        self.c = nn.Parameter(torch.randn(C, 1, 1))

    def forward(self, x):
        return self.expression(self.conv(x), self.c)


NOT_AFFINE = {
    "c / y": lambda y, c: c / (y.abs() + 1),
    "torch.div(c, y)": lambda y, c: torch.div(c, y.abs() + 1),
    "1 / y": lambda y, c: 1 / (y.abs() + 1),
}


@pytest.mark.parametrize("spelling", sorted(NOT_AFFINE))
def test_a_constant_divided_by_a_tensor_is_not_an_affine(spelling):
    """``c / y`` is not ``y / c`` (nor, for ``c = 1``, a no-op)."""
    model = _random(ConvThen(NOT_AFFINE[spelling]))
    fold_matches(model, fresh_input(2, 3, 4, 4), fresh_input(3, 3, 5, 3, seed=2))


ADDCMUL = {
    "addcmul(t, y, s, value=0.5)": lambda y, c: torch.addcmul(c, y, c + 1, value=0.5),
    "addcmul(t, s, y, value=-2)": lambda y, c: torch.addcmul(c, c + 1, y, value=-2),
    "c.addcmul(y, 2c, value=3)": lambda y, c: c.addcmul(y, c * 2, value=3),
}


@pytest.mark.parametrize("spelling", sorted(ADDCMUL))
def test_addcmul_value_scales_the_product(spelling):
    model = _random(ConvThen(ADDCMUL[spelling]))
    folded = fold_matches(model, fresh_input(2, 3, 4, 4), fresh_input(3, 3, 5, 3, seed=2))
    assert op_counts(folded)["channel_affine"] == 0  # folded into the conv, exactly


class AlphaJoin(nn.Module):
    """``join(a(x), b(x))`` of two per-channel affines (``affines``) or two convs of ``x``."""

    def __init__(self, join, convs: bool):
        super().__init__()
        self.join, self.convs = join, convs
        self.a, self.b = nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 1)
        self.s = nn.Parameter(torch.rand(C, 1, 1) + 0.5)
        self.t = nn.Parameter(torch.randn(C, 1, 1))

    def forward(self, x):
        if self.convs:
            return self.join(self.a(x), self.b(x))
        return self.join(x * self.s, x + self.t)


JOINS = {
    "torch.add(u, v, alpha=2)": lambda u, v: torch.add(u, v, alpha=2),
    "torch.sub(u, v, alpha=0.5)": lambda u, v: torch.sub(u, v, alpha=0.5),
    "u.sub(v, alpha=-3)": lambda u, v: u.sub(v, alpha=-3),
}


@pytest.mark.parametrize("convs", [False, True], ids=["affine_branches", "conv_branches"])
@pytest.mark.parametrize("spelling", sorted(JOINS))
def test_alpha_of_a_join_weighs_the_second_branch(spelling, convs):
    model = _random(AlphaJoin(JOINS[spelling], convs))
    folded = fold_matches(model, fresh_input(2, C, 5, 5), fresh_input(1, C, 4, 6, seed=2))
    counts = op_counts(folded)
    assert counts["conv"] == (1 if convs else 0) and counts["channel_affine"] <= 1


class TransposedScale(nn.Module):
    """``linear(x).transpose(1, 2) * g``: a per-channel scale after a transpose, on the axis
    the transpose moved the linear's channels to."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, C)
        self.g = nn.Parameter(torch.randn(C, 1))

    def forward(self, x):
        return self.linear(x).transpose(1, 2) * self.g


def test_a_scale_after_a_transpose_folds_into_the_linear_before_it():
    model = _random(TransposedScale())
    folded = fold_matches(model, fresh_input(2, 5, 3), fresh_input(3, 6, 3, seed=2))
    assert op_counts(folded)["channel_affine"] == 0


class PoolBranch(nn.Module):
    """A 3×3 conv branch plus a 3×3 average pool that divides by ``divisor`` taps."""

    def __init__(self, divisor: int | None):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, divisor_override=divisor)

    def forward(self, x):
        return self.conv(x) + self.pool(x)


@pytest.mark.parametrize("divisor", [None, 4])
def test_average_pool_branch_merges_only_as_the_kernel_it_is(divisor):
    """Without ``divisor_override`` the pool is a uniform 1/9 kernel and merges; with it, it
    divides by 4 and must not be merged as 1/9."""
    model = _random(PoolBranch(divisor))
    folded = fold_matches(model, fresh_input(2, C, 5, 5), fresh_input(3, C, 4, 6, seed=2))
    assert op_counts(folded)["conv"] == 1 if divisor is None else 2


# ---------------------------------------------------------------------------------- plain modules


class Doubling(nn.Conv2d):
    """A conv whose ``forward`` doubles the plain conv's output."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_a_subclass_overriding_forward_is_not_the_plain_conv():
    assert not is_plain(Doubling(3, C, 3), nn.Conv2d)


class Gained(nn.Conv2d):
    """A conv whose ``forward`` reads ``weight`` through a property: twice the stored one."""

    gain = 2.0

    @property
    def weight(self) -> torch.Tensor:
        return self.__getattr__("weight") * self.gain  # the registered parameter, doubled


def test_a_subclass_whose_weight_is_a_property_is_not_the_plain_conv():
    conv, plain = Gained(3, C, 3), nn.Conv2d(3, C, 3)
    with torch.no_grad():
        conv._parameters["weight"].copy_(torch.randn(C, 3, 3, 3))
        plain.load_state_dict(conv.state_dict())
        x = fresh_input(1, 3, 5, 5)
        bias = conv.bias[:, None, None]
        assert_close(conv(x) - bias, 2 * (plain(x) - bias))
    assert not is_plain(conv, nn.Conv2d)
    assert is_plain(plain, nn.Conv2d)


# -------------------------------------------------------------------------------------- constants


class Counter(nn.Module):
    """Counts its calls in a buffer, written in place, and scales the conv by the count."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, C, 1)
        self.register_buffer("calls", torch.ones(C, 1, 1))

    def forward(self, x):
        self.calls.add_(1)
        return self.conv(x) * self.calls


def test_a_buffer_written_in_place_is_no_constant():
    gm, _ = capture(copy_model(Counter()))
    reads = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "calls"]
    consts = ConstantFolder(gm)
    assert reads and all(consts.value(n) is None for n in reads)


OBSERVED: list[int] = []


@fx.wrap
def observed_gain(gamma: torch.Tensor) -> torch.Tensor:
    """A user function (kept as a call by ``torch.fx.wrap``) with a side effect."""
    OBSERVED.append(1)
    return 2 * gamma


class UserFunctionScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, C, 1)
        self.gamma = nn.Parameter(torch.rand(C, 1, 1) + 0.5)

    def forward(self, x):
        return self.conv(x) * observed_gain(self.gamma)


def test_a_user_function_of_constants_is_called_at_run_time_not_folded():
    """Only torch and operator callables are evaluated at fold time: a user function may have
    side effects (here: it records its calls), which must still happen on every call."""
    model = _random(UserFunctionScale())
    folded = fold_matches(model, fresh_input(2, 3, 4, 4), fresh_input(1, 3, 5, 3, seed=2))
    OBSERVED.clear()
    with torch.no_grad():
        folded(fresh_input(1, 3, 4, 4))
    assert OBSERVED == [1]
