"""Op views, constants and rank inference treat a node as a conv / BN / affine / constant /
no-op only when it provably computes one.

Each class of trap is tested end to end (``repfx.fold`` compared with the original on a fresh
input of another batch size, parameters at O(1)) or, where the property is about one view,
through the view itself. Where a node must be refused, the test asserts that it is still in the
folded graph and that the output is exact.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from grammar import randomise_
from helpers import traced
from torch import fx, nn

import repfx
from repfx.ir.graph import (
    FLOAT_KEY,
    RANK_KEY,
    ConstantFolder,
    annotate_ranks,
    has_hooks,
    is_guard,
    is_plain,
    rank_of,
)
from repfx.ir.op_kinds import op_counts
from repfx.ir.ops import affine_op, identity_input, layout_source_axis, linear_op, norm_op
from repfx.testing import assert_close

C = 4


def _random(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomise_(model, torch.Generator().manual_seed(seed)).eval()


def _fresh(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _fold_matches(
    model: nn.Module, example: tuple, fresh: tuple, capture: str = "auto"
) -> fx.GraphModule:
    """Fold on ``example``, and check the fold on ``fresh`` (another batch size and values)."""
    folded = repfx.fold(model, example, capture=capture)
    with torch.no_grad():
        actual, expected = folded(*fresh), model(*fresh)
    assert torch.equal(actual.isnan(), expected.isnan())
    assert_close(actual, expected)
    return folded


def _node(gm: fx.GraphModule, predicate) -> fx.Node:
    found = [n for n in gm.graph.nodes if predicate(n)]
    assert len(found) == 1, found
    return found[0]


def _targets(gm: fx.GraphModule) -> list:
    """What the graph computes (its rank guards aside)."""
    return [n.target for n in gm.graph.nodes if n.op.startswith("call_") and not is_guard(n)]


# ================================================= 1. batch-norm argument order, training


class ConvThenFunctionalBatchNorm(nn.Module):
    """A conv, then a batch norm on this module's own tensors, in one of :data:`BN_SPELLINGS`."""

    def __init__(self, spelling: str, table: dict | None = None):
        super().__init__()
        self.spelling, self.table = spelling, BN_SPELLINGS if table is None else table
        self.conv = nn.Conv2d(3, C, 3, padding=1)
        self.weight = nn.Parameter(torch.ones(C))
        self.bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("running_mean", torch.zeros(C))
        self.register_buffer("running_var", torch.ones(C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[self.spelling](self, self.conv(x))


BN_SPELLINGS = {
    "torch.batch_norm positional": lambda m, x: torch.batch_norm(
        x, m.weight, m.bias, m.running_mean, m.running_var, False, 0.1, 1e-3, False
    ),
    "torch.batch_norm keywords": lambda m, x: torch.batch_norm(
        x,
        weight=m.weight,
        bias=m.bias,
        running_mean=m.running_mean,
        running_var=m.running_var,
        training=False,
        momentum=0.1,
        eps=1e-3,
        cudnn_enabled=False,
    ),
    "torch.batch_norm mixed": lambda m, x: torch.batch_norm(
        x,
        m.weight,
        m.bias,
        m.running_mean,
        m.running_var,
        False,
        0.1,
        eps=1e-3,
        cudnn_enabled=True,
    ),
    "F.batch_norm positional": lambda m, x: F.batch_norm(
        x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.1, 1e-3
    ),
    "F.batch_norm keywords out of order": lambda m, x: F.batch_norm(
        x, m.running_mean, m.running_var, bias=m.bias, eps=1e-3, weight=m.weight
    ),
    "torch.nn.functional.batch_norm all keywords": lambda m, x: torch.nn.functional.batch_norm(
        input=x,
        running_var=m.running_var,
        running_mean=m.running_mean,
        weight=m.weight,
        bias=m.bias,
        training=False,
        eps=1e-3,
    ),
}


@pytest.mark.parametrize("spelling", sorted(BN_SPELLINGS))
def test_functional_batch_norm_folds_with_its_own_argument_order(spelling):
    model = _random(ConvThenFunctionalBatchNorm(spelling))
    folded = _fold_matches(model, (_fresh(2, 3, 6, 6),), (_fresh(3, 3, 7, 5, seed=2),))
    assert op_counts(folded)["batch_norm"] == 0


TRAINING_BN = {
    "F.batch_norm(training=True)": lambda m, x: F.batch_norm(
        x, m.running_mean, m.running_var, m.weight, m.bias, training=True
    ),
    "F.batch_norm(..., True) positional": lambda m, x: F.batch_norm(
        x, m.running_mean, m.running_var, m.weight, m.bias, True, 0.1, 1e-5
    ),
    "F.batch_norm(x, None, None, w, b, True)": lambda m, x: F.batch_norm(
        x, None, None, m.weight, m.bias, True
    ),
    "torch.batch_norm(..., True, ...)": lambda m, x: torch.batch_norm(
        x, m.weight, m.bias, m.running_mean, m.running_var, True, 0.1, 1e-5, False
    ),
    "torch.batch_norm(training=True)": lambda m, x: torch.batch_norm(
        x,
        m.weight,
        m.bias,
        m.running_mean,
        m.running_var,
        training=True,
        momentum=0.1,
        eps=1e-5,
        cudnn_enabled=False,
    ),
}


@pytest.mark.parametrize("spelling", sorted(TRAINING_BN))
def test_training_mode_functional_batch_norm_is_kept(spelling):
    model = _random(ConvThenFunctionalBatchNorm(spelling, TRAINING_BN))
    reference = copy.deepcopy(model)  # the original updates its running statistics per call
    folded = repfx.fold(model)
    assert op_counts(folded)["batch_norm"] == 1
    x = _fresh(3, 3, 5, 5, seed=2)
    with torch.no_grad():
        assert torch.equal(folded(x), reference(x))  # batch statistics, as the original


class DropoutBetween(nn.Module):
    def __init__(self, dropout):
        super().__init__()
        self.conv, self.bn, self.dropout = nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), dropout

    def forward(self, x):
        return self.bn(self.dropout(self.conv(x)))


@pytest.mark.parametrize(
    "dropout",
    [
        lambda x: F.dropout(x, 0.5),
        lambda x: F.dropout(x, p=0.5),
        lambda x: F.dropout(input=x, p=0.5),
        lambda x: F.dropout(x, 0.5, True),
        lambda x: torch.dropout(x, 0.5, True),
        lambda x: F.dropout2d(x, 0.5),
    ],
    ids=["F.dropout(x, p)", "p=", "input=", "True", "torch.dropout", "dropout2d"],
)
def test_dropout_defaulting_to_training_is_kept(dropout):
    model = _random(DropoutBetween(dropout))
    folded = repfx.fold(model)
    x = _fresh(2, 3, 6, 6)
    with torch.no_grad():
        torch.manual_seed(7)
        expected = model(x)
        torch.manual_seed(7)
        actual = folded(x)
    assert torch.equal(actual, expected)  # the same random mask: the dropout is still there
    assert (expected == model.bn(torch.zeros_like(expected))).any()  # a mask was applied


@pytest.mark.parametrize(
    "dropout",
    [lambda x: F.dropout(x, 0.5, training=False), lambda x: F.dropout(input=x, training=False)],
    ids=["training=False", "input=, training=False"],
)
def test_dropout_with_training_false_is_removed(dropout):
    model = _random(DropoutBetween(dropout))
    folded = _fold_matches(model, (_fresh(2, 3, 6, 6),), (_fresh(3, 3, 5, 7, seed=3),))
    assert op_counts(folded)["batch_norm"] == 0 and op_counts(folded)["no_op"] == 0


# ================================================================ 2. computed operands


class ConditionalBatchNorm(nn.Module):
    """A batch norm whose weight or bias is computed from a second input (conditional BN)."""

    def __init__(self, which: str, spelling: str = "F"):
        super().__init__()
        self.which, self.spelling = which, spelling
        self.conv = nn.Conv2d(3, C, 3, padding=1)
        self.fc = nn.Linear(5, C)
        self.weight = nn.Parameter(torch.ones(C))
        self.bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("running_mean", torch.zeros(C))
        self.register_buffer("running_var", torch.ones(C))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        computed = self.fc(ctx)
        w = computed if self.which == "weight" else self.weight
        b = computed if self.which == "bias" else self.bias
        mean, var = self.running_mean, self.running_var
        if self.spelling == "torch":
            return torch.batch_norm(self.conv(x), w, b, mean, var, False, 0.1, 1e-5, False)
        return F.batch_norm(self.conv(x), mean, var, w, b)


@pytest.mark.parametrize("spelling", ["F", "torch"])
@pytest.mark.parametrize("which", ["weight", "bias"])
def test_conditional_batch_norm_is_not_folded(which, spelling):
    model = _random(ConditionalBatchNorm(which, spelling))
    example = (_fresh(2, 3, 6, 6), _fresh(5, seed=4))
    folded = _fold_matches(model, example, (_fresh(3, 3, 5, 5, seed=2), _fresh(5, seed=5)))
    assert op_counts(folded)["batch_norm"] == 1


class OperandsAsInputs(nn.Module):
    """Norms, convs and linears whose weight is a graph placeholder (as in torch.compile)."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(3, C, 1)
        self.register_buffer("running_mean", torch.zeros(C))
        self.register_buffer("running_var", torch.ones(C))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.op == "batch_norm":
            return F.batch_norm(y, self.running_mean, self.running_var, w, None)
        if self.op == "layer_norm":
            return F.layer_norm(y.permute(0, 2, 3, 1), (C,), w).permute(0, 3, 1, 2)
        if self.op == "group_norm":
            return F.group_norm(y, 2, w)
        return F.conv2d(y, w.reshape(C, 1, 1, 1), groups=C)


@pytest.mark.parametrize("op", ["batch_norm", "layer_norm", "group_norm", "conv"])
def test_operand_placeholder_is_not_a_constant(op):
    model = _random(OperandsAsInputs(op))
    example = (_fresh(2, 3, 5, 5), _fresh(C, seed=4) + 2)
    folded = _fold_matches(model, example, (_fresh(3, 3, 4, 6, seed=2), _fresh(C, seed=5) - 2))
    gm = traced(model, *example)
    consts = ConstantFolder(gm)
    last = [n for n in gm.graph.nodes if n.op.startswith("call_")][-1]
    if op == "layer_norm":
        last = last.args[0]
    viewed = [v(gm, last, consts) for v in (affine_op, norm_op, linear_op)]
    assert viewed == [None, None, None]
    assert len(_targets(folded)) == len(_targets(gm))  # nothing folded away


# ========================================================= 3. random and in-place constants


class Parametrised(nn.Module):
    def __init__(self, expression):
        super().__init__()
        self.expression = expression
        self.scale = nn.Parameter(torch.rand(C) + 0.5)
        self.other = nn.Parameter(torch.rand(C) + 0.5)

    def forward(self, x):
        return x * self.expression(self).reshape(-1, 1, 1)


RANDOM_OR_WRITING = {
    "rand_like": lambda m: torch.rand_like(m.scale),
    "randn_like": lambda m: torch.randn_like(m.scale),
    "randint_like": lambda m: torch.randint_like(m.scale, 1, 4),
    "bernoulli": lambda m: torch.bernoulli(torch.full_like(m.scale, 0.5)),
    "dropout (training default)": lambda m: F.dropout(m.scale, 0.5),
    "torch.normal": lambda m: torch.normal(m.scale, 1.0),
    "poisson": lambda m: torch.poisson(m.scale),
    "multinomial": lambda m: torch.multinomial(m.scale, C, replacement=True).float(),
    "rrelu (training)": lambda m: F.rrelu(m.scale - 1, training=True),
    "gumbel_softmax": lambda m: F.gumbel_softmax(m.scale),
    "empty_like": lambda m: torch.empty_like(m.scale),
    "scale + randn_like": lambda m: m.scale + torch.randn_like(m.scale),
    "normal_": lambda m: m.scale.detach().clone().normal_(),
    "uniform_": lambda m: m.scale.detach().clone().uniform_(),
    "exponential_": lambda m: m.scale.detach().clone().exponential_(),
    "add_": lambda m: m.scale.add_(1),
    "mul_": lambda m: m.scale.mul_(2),
    "clamp_": lambda m: m.scale.clamp_(max=0.75),
    "relu_": lambda m: torch.relu_(m.scale - 0.75),
    "zero_": lambda m: m.other.zero_(),
    "copy_": lambda m: m.scale.copy_(m.other),
    "F.relu(inplace=True)": lambda m: F.relu(m.scale, inplace=True),
    "out=": lambda m: torch.mul(m.scale, 2, out=m.other),
}


@pytest.mark.parametrize("spelling", sorted(RANDOM_OR_WRITING))
def test_constant_folder_evaluates_no_random_or_writing_op(spelling):
    model = Parametrised(RANDOM_OR_WRITING[spelling])
    gm = fx.symbolic_trace(model)  # no capture: the folder alone must refuse
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    rng = torch.random.get_rng_state()
    consts = ConstantFolder(gm)
    operand = _node(gm, lambda n: n.op == "call_method" and n.target == "reshape").args[0]
    assert consts.value(operand) is None
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())  # nothing written
    assert torch.equal(rng, torch.random.get_rng_state())  # nothing drawn


def test_constant_folder_still_evaluates_pure_expressions():
    model = Parametrised(lambda m: torch.exp(m.scale) * F.softplus(m.other)[None][0])
    gm = fx.symbolic_trace(model)
    operand = _node(gm, lambda n: n.op == "call_method" and n.target == "reshape").args[0]
    expected = torch.exp(model.scale) * F.softplus(model.other)
    assert torch.equal(ConstantFolder(gm).value(operand), expected.detach())


@pytest.mark.parametrize("spelling", ["rand_like", "scale + randn_like", "bernoulli"])
def test_random_operand_is_still_random_after_folding(spelling):
    model = nn.Sequential(nn.Conv2d(3, C, 1), Parametrised(RANDOM_OR_WRITING[spelling]))
    model = _random(model)
    folded = repfx.fold(model)
    x = _fresh(2, 3, 4, 4)
    with torch.no_grad():
        torch.manual_seed(3)
        expected = model(x)
        torch.manual_seed(3)
        actual = folded(x)
        torch.manual_seed(4)
        other = folded(x)
    assert torch.equal(actual, expected)
    assert not torch.equal(actual, other)  # a fresh draw per call, as in the original


# ======================================================== 4. subclasses that are not the base


def _standardised(w: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(1, w.dim()))
    return (w - w.mean(dims, keepdim=True)) / (w.std(dims, keepdim=True) + 1e-5)


class OpaqueWSConv(nn.Conv2d):
    """Weight standardisation behind a data-dependent check: untraceable, so a leaf whose
    ``forward`` is inherited but whose ``_conv_forward`` is not the base's."""

    def _conv_forward(self, input, weight, bias):
        if weight.abs().sum() > 0:  # data-dependent: fx cannot trace this
            weight = _standardised(weight)
        return super()._conv_forward(input, weight, bias)


class OpaqueWSConvTranspose(nn.ConvTranspose2d):
    """Applies its kernel flipped (a ``weight`` property), with an untraceable check."""

    @property
    def weight(self):
        if "weight" not in self._parameters:
            raise AttributeError("weight")
        return self._parameters["weight"].flip(-1)

    def _output_padding(self, input, output_size, *args):
        if input.abs().sum() < 0:  # data-dependent: fx cannot trace this
            raise ValueError("negative")
        return super()._output_padding(input, output_size, *args)


class ClampingBatchNorm(nn.BatchNorm2d):
    """``_check_input_dim`` clamps the input (and cannot be traced)."""

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError("expected 4-d input")
        input.clamp_(-0.5, 0.5)


class _ClampedWeight:
    """A ``weight`` property that clamps the stored weight (behind an untraceable check)."""

    @property
    def weight(self):
        if "weight" not in self._parameters:
            raise AttributeError("weight")
        w = self._parameters["weight"]
        return w.clamp(max=0.75) if self.bias.abs().sum() >= 0 else w  # bias: a proxy


class ClampedLayerNorm(_ClampedWeight, nn.LayerNorm):
    pass


class ClampedGroupNorm(_ClampedWeight, nn.GroupNorm):
    pass


class NoisyLinear(_ClampedWeight, nn.Linear):
    pass


class ScaledDropout(nn.Dropout):
    def forward(self, x):
        return x * 2 if x.abs().sum() >= 0 else x


class Tap(nn.Identity):
    def forward(self, x):
        return -x if x.sum() > 1e9 else x * 3


SUBCLASS_MODELS = {
    "conv (_conv_forward)": lambda: nn.Sequential(OpaqueWSConv(3, C, 3), nn.BatchNorm2d(C)),
    "conv transpose (weight property)": lambda: nn.Sequential(
        OpaqueWSConvTranspose(3, C, 3), nn.BatchNorm2d(C)
    ),
    "batch norm (_check_input_dim)": lambda: nn.Sequential(
        nn.Conv2d(3, C, 3), ClampingBatchNorm(C)
    ),
    "layer norm (weight property)": lambda: nn.Sequential(
        nn.Conv2d(3, C, 1), nn.Flatten(2), Transpose(), ClampedLayerNorm(C), Scale()
    ),
    "group norm (weight property)": lambda: nn.Sequential(
        nn.Conv2d(3, C, 1), ClampedGroupNorm(2, C), nn.BatchNorm2d(C)
    ),
    "linear (weight property)": lambda: nn.Sequential(
        nn.Flatten(), NoisyLinear(3 * 4 * 4, C), nn.BatchNorm1d(C)
    ),
    "dropout (forward)": lambda: nn.Sequential(
        nn.Conv2d(3, C, 3), ScaledDropout(0.5), nn.BatchNorm2d(C)
    ),
    "identity (forward)": lambda: nn.Sequential(nn.Conv2d(3, C, 3), Tap(), nn.BatchNorm2d(C)),
}


class Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(C) + 0.5)

    def forward(self, x):
        return x * self.scale


SPECIAL = (
    OpaqueWSConv,
    OpaqueWSConvTranspose,
    ClampingBatchNorm,
    ClampedLayerNorm,
    ClampedGroupNorm,
    NoisyLinear,
    ScaledDropout,
    Tap,
)


@pytest.mark.parametrize("name", sorted(SUBCLASS_MODELS))
def test_subclass_that_changes_behaviour_is_not_the_base_op(name):
    model = _random(SUBCLASS_MODELS[name]())
    example, fresh = (_fresh(2, 3, 4, 4),), (_fresh(3, 3, 4, 4, seed=2),)
    folded = _fold_matches(model, example, fresh, capture="fx")
    special = next(m for m in model.modules() if isinstance(m, SPECIAL))
    assert type(special) in {type(m) for m in folded.modules()}  # still there, as a module
    _fold_matches(model, example, fresh)  # (torch.export, where fx keeps it a leaf: its ATen ops)


def test_is_plain_accepts_only_inert_subclasses():
    class InitOnly(nn.Conv2d):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.note = "hi"

        def extra_repr(self):
            return "init only"

        def describe(self):  # a new method: the base never calls it
            return "x"

    class Mixin(nn.Module):
        def __call__(self, *args):
            return super().__call__(*args)

    class Mixed(nn.Conv2d, Mixin):
        pass

    rebound = nn.Conv2d(2, 2, 1)
    rebound.forward = lambda x: x
    parametrized = nn.utils.parametrizations.weight_norm(nn.Conv2d(2, 2, 1))
    quantizable = nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2)
    assert is_plain(nn.Conv2d(2, 2, 1), nn.Conv2d)
    assert is_plain(InitOnly(2, 2, 1), nn.Conv2d)
    assert is_plain(quantizable, nn.Linear)
    assert is_plain(nn.BatchNorm2d(2), (nn.BatchNorm1d, nn.BatchNorm2d))
    assert not is_plain(OpaqueWSConv(2, 2, 1), nn.Conv2d)
    assert not is_plain(Mixed(2, 2, 1), nn.Conv2d)
    assert not is_plain(rebound, nn.Conv2d)
    assert not is_plain(parametrized, nn.Conv2d)
    assert not is_plain(ClampingBatchNorm(2), nn.BatchNorm2d)
    assert not is_plain(nn.Conv2d(2, 2, 1), nn.Linear)


# ====================================================== 5. bitcasts and casts are not layout


class ViewAs(nn.Module):
    def __init__(self, view):
        super().__init__()
        self.view = view

    def forward(self, x):
        return self.view(x)


@pytest.mark.parametrize(
    "view",
    [
        lambda x: x.view(torch.int32),
        lambda x: x.view(dtype=torch.int32),
        lambda x: x.view(torch.float32),
        lambda x: x.view(x.dtype),
    ],
    ids=["view(int32)", "view(dtype=int32)", "view(float32)", "view(x.dtype)"],
)
def test_view_with_a_dtype_is_not_a_layout_op(view):
    x = _fresh(2, C, 3, 3)
    for gm in (traced(ViewAs(view)), traced(ViewAs(view), x)):
        node = _node(gm, lambda n: n.op == "call_method" and n.target == "view")
        assert layout_source_axis(node, -3) is None
        assert layout_source_axis(node, None) is None


def test_casts_keep_the_rank_and_set_the_float_flag():
    class Casts(nn.Module):
        def forward(self, x):
            y = nn.functional.relu(x).view(2, C, 3, 3)  # rank 4, dtype unknown
            return (y.view(torch.int32), y.long(), y.to(torch.int64), y.double(), y.half())

    gm = traced(Casts())
    annotate_ranks(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    names = ("view_1", "long", "to", "double", "half")
    assert [by_name[k].meta[RANK_KEY] for k in names] == [4] * 5
    assert [by_name[k].meta[FLOAT_KEY] for k in names] == [False, False, False, True, True]


def test_a_bitcast_between_same_width_floats_is_not_folded_through():
    class Bitcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, C, 1).to(torch.bfloat16)
            self.scale = nn.Parameter(torch.rand(C, dtype=torch.float16) + 0.5)

        def forward(self, x):
            return self.conv(x).view(torch.float16) * self.scale[:, None, None]

    model = _random(Bitcast())
    x = _fresh(2, 3, 4, 4).to(torch.bfloat16)
    folded = repfx.fold(model, (x,))
    fresh = _fresh(3, 3, 5, 5, seed=2).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(folded(fresh), model(fresh))


# ============================================================ 6. integer tensors


class IntegerChain(nn.Module):
    def __init__(self, cast: bool):
        super().__init__()
        self.cast = cast

    def forward(self, x):
        y = x.long() if self.cast else x
        return (y * 3 + 1) * 2 - 5


@pytest.mark.parametrize("cast", [True, False], ids=["x.long()", "int64 input"])
@pytest.mark.parametrize("with_example", [True, False])
def test_integer_arithmetic_is_not_an_affine(cast, with_example):
    model = IntegerChain(cast)
    example = _fresh(2, 3, 4) * 10
    example = example if cast else example.long()
    folded = repfx.fold(model, (example,) if with_example else None)
    fresh = _fresh(3, 3, 5, seed=2) * 10
    fresh = fresh if cast else fresh.long()
    actual, expected = folded(fresh), model(fresh)
    assert actual.dtype == torch.int64 and torch.equal(actual, expected)


def test_affine_needs_a_known_floating_input():
    gm = traced(IntegerChain(cast=False))  # no example: the input's dtype is unknown
    consts = ConstantFolder(gm)
    muls = [n for n in gm.graph.nodes if n.target is operator.mul]
    assert muls and all(affine_op(gm, n, consts) is None for n in muls)


# ============================================== 7. padding strings, alpha, drop paths


@pytest.mark.parametrize(
    ("kernel", "padding", "zero_padded", "geometry_padding"),
    [
        (3, "same", True, (1, 1)),
        (1, "same", False, (0, 0)),
        (4, "same", True, None),
        (3, "valid", False, (0, 0)),
        (3, 0, False, (0, 0)),
    ],
)
@pytest.mark.parametrize("spelling", ["module", "F.conv2d"])
def test_padding_strings(kernel, padding, zero_padded, geometry_padding, spelling):
    class FunctionalConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(C, 3, kernel, kernel))

        def forward(self, x):
            return F.conv2d(x, self.weight, padding=padding)

    if spelling == "module":
        model = nn.Sequential(nn.Conv2d(3, C, kernel, padding=padding))
    else:
        model = FunctionalConv()
    gm = traced(model, _fresh(1, 3, 6, 6))
    node = next(n for n in gm.graph.nodes if n.op.startswith("call_"))
    view = linear_op(gm, node, ConstantFolder(gm))
    assert view.zero_padded is zero_padded
    assert (view.geometry.padding if view.geometry else None) == geometry_padding


class SameBranches(nn.Module):
    """RepVGG-style branches spelled with ``padding="same"``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(C, C, 3, padding="same"), nn.BatchNorm2d(C))
        self.b = nn.Sequential(nn.Conv2d(C, C, 1, padding="same"), nn.BatchNorm2d(C))
        self.c = nn.BatchNorm2d(C)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.c(x)


def test_same_padding_branches_merge_exactly():
    model = _random(SameBranches())
    folded = _fold_matches(model, (_fresh(2, C, 6, 6),), (_fresh(3, C, 5, 7, seed=2),))
    assert op_counts(folded)["conv"] == 1 and op_counts(folded)["batch_norm"] == 0


class AddSubAlpha(nn.Module):
    def __init__(self, expression):
        super().__init__()
        self.expression = expression
        self.conv = nn.Conv2d(3, C, 1)
        self.shift = nn.Parameter(torch.randn(C))

    def forward(self, x):
        return self.expression(self.conv(x), self.shift.view(-1, 1, 1))


ALPHA = {
    "torch.sub(x, c, alpha=2)": lambda x, c: torch.sub(x, c, alpha=2),
    "torch.sub(c, x, alpha=2)": lambda x, c: torch.sub(c, x, alpha=2),
    "torch.add(c, x, alpha=-1.5)": lambda x, c: torch.add(c, x, alpha=-1.5),
    "torch.add(x, c, alpha=0.5)": lambda x, c: torch.add(x, c, alpha=0.5),
    "x.sub(c, alpha=3)": lambda x, c: x.sub(c, alpha=3),
    "c.sub(x, alpha=0.25)": lambda x, c: c.sub(x, alpha=0.25),
    "c.add(x, alpha=2)": lambda x, c: c.add(x, alpha=2),
    "0 - x": lambda x, c: 0 - x,
    "torch.sub(x, 0, alpha=4) - c": lambda x, c: torch.sub(x, 0, alpha=4) - c,
    "c - x": lambda x, c: c - x,
    "1.5 - x": lambda x, c: 1.5 - x,
}


@pytest.mark.parametrize("spelling", sorted(ALPHA))
def test_add_sub_alpha_in_both_operand_orders(spelling):
    model = _random(AddSubAlpha(ALPHA[spelling]))
    folded = _fold_matches(model, (_fresh(2, 3, 4, 4),), (_fresh(3, 3, 5, 3, seed=2),))
    assert op_counts(folded)["channel_affine"] == 0  # folded into the conv, and exactly


def test_zero_minus_x_is_not_a_no_op():
    gm = traced(AddSubAlpha(ALPHA["0 - x"]), _fresh(1, 3, 2, 2))
    node = _node(gm, lambda n: n.target is operator.sub)
    assert identity_input(gm, node) is None


class ResidualDropPath(nn.Module):
    def __init__(self, drop):
        super().__init__()
        self.conv, self.bn, self.drop = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C), drop

    def forward(self, x):
        return x + self.drop(self.bn(self.conv(x)))


def _drop_paths():
    from timm.layers import DropPath as TimmDropPath

    from repfx.models import DropPath

    return {"repfx DropPath": lambda: DropPath(0.5), "timm DropPath": lambda: TimmDropPath(0.5)}


@pytest.mark.parametrize("name", sorted(_drop_paths()))
def test_training_mode_drop_path_is_kept(name):
    model = _random(ResidualDropPath(_drop_paths()[name]()))
    model.drop.train()
    folded = repfx.fold(model)
    x = _fresh(8, C, 4, 4)
    with torch.no_grad():
        torch.manual_seed(5)
        expected = model(x)
        torch.manual_seed(5)
        actual = folded(x)
    assert_close(actual, expected)  # the same samples dropped: the drop path is still there
    dropped = (expected - x).flatten(1).abs().amax(1) == 0
    assert dropped.any() and not dropped.all()  # some samples' branches were dropped


@pytest.mark.parametrize("name", sorted(_drop_paths()))
def test_eval_mode_drop_path_is_removed(name):
    model = _random(ResidualDropPath(_drop_paths()[name]()))
    folded = _fold_matches(model, (_fresh(2, C, 4, 4),), (_fresh(3, C, 5, 5, seed=2),))
    assert op_counts(folded)["batch_norm"] == 0


# ====================================================================== 8. hooks (views)


def test_has_hooks_sees_every_forward_hook_kind():
    def hook(*args):
        return None

    kinds = {
        "forward": lambda m: m.register_forward_hook(hook),
        "pre": lambda m: m.register_forward_pre_hook(hook),
        "forward with kwargs": lambda m: m.register_forward_hook(hook, with_kwargs=True),
        "pre with kwargs": lambda m: m.register_forward_pre_hook(hook, with_kwargs=True),
        "always_call": lambda m: m.register_forward_hook(hook, always_call=True),
    }
    for register in kinds.values():
        module = nn.Conv2d(2, 2, 1)
        handle = register(module)
        assert has_hooks(module)
        handle.remove()
        assert not has_hooks(module)
    module = nn.Conv2d(2, 2, 1)
    module.register_full_backward_hook(hook)
    module.register_state_dict_pre_hook(hook)
    assert not has_hooks(module)  # irrelevant to inference
    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        assert has_hooks(module)
    finally:
        handle.remove()


# ================================================================ rank inference


class Scalarised(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3)

    def forward(self, x):
        return self.conv(x).mean().flatten() * 2 + self.conv(x).sum((2, 3), keepdim=True).flatten(1)


def test_rank_inference_of_shape_ops_without_example_inputs():
    class Shapes(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, C, 1)

        def forward(self, x):
            y = self.conv(x)
            return y.mean((2, 3)), y.flatten(1), y.reshape(2, -1), y.sum(1, keepdim=True), y.relu()

    gm = traced(Shapes())
    ranks = {n.name: n.meta[RANK_KEY] for n in gm.graph.nodes}
    assert [ranks[k] for k in ("mean", "flatten", "reshape", "sum_1", "relu")] == [2, 2, 2, 4, 4]
    assert all(
        gm.graph.find_nodes(op="call_method", target=t)[0].meta[FLOAT_KEY] for t in ("mean", "relu")
    )


def test_rank_inference_of_a_zero_dim_tensor():
    model = _random(Scalarised())
    _fold_matches(model, (_fresh(2, 3, 5, 5),), (_fresh(3, 3, 6, 4, seed=2),))


def test_rank_inference_never_fails_on_symbolic_shapes():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x):
        n, c = x.shape[0], x.shape[1]
        y = x.reshape(n * c, -1).flatten(0) * 2
        return y.view(n, c, -1).mean(-1).flatten() + x.sum()

    gm = make_fx(f, tracing_mode="symbolic")(torch.randn(2, 3, 4))
    annotate_ranks(gm)
    ranks = {n.name: n.meta[RANK_KEY] for n in gm.graph.nodes}
    assert all(r is None or type(r) is int for r in ranks.values())
    assert rank_of(_node(gm, lambda n: n.op == "placeholder")) == 3  # from the fake tensor
    result = _node(gm, lambda n: n.op == "output").args[0]
    assert rank_of(result[0] if isinstance(result, (list, tuple)) else result) == 1
