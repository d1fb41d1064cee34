"""Fuzz blocks whose trap is semantic: in-place ops, hooks, computed or random operands,
conv subclasses and parametrized weights.

Each section is one bug class: the modules, then ``@st.composite`` block generators, then the
class's ``KINDS`` dict. What each block computes in eager mode is the specification; a fold
that removes or rewrites one of these ops must preserve it exactly, or refuse.
"""

from __future__ import annotations

import functools
import operator
import warnings

import grammar
import torch
import torch.nn.functional as F
from fuzz_common import (
    BATCH_NORM,
    CONV,
    Block,
    BlockKind,
    ChannelScale,
    Seq,
    Shape,
    channel_view,
    common_groups,
    key_of,
    same_size_branch,
    spatial_dims,
)
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.utils._pytree import tree_map
from torchvision.ops import StochasticDepth

# ====================================================================== in-place ops


def _augmented_add(y: torch.Tensor, c: float) -> torch.Tensor:
    y += c  # in eager: in place; torch.fx traces it as an out-of-place add
    return y


def _augmented_mul(y: torch.Tensor, c: float) -> torch.Tensor:
    y *= c
    return y


MUTATIONS = {
    "y.relu_()": lambda m, y: y.relu_(),
    "torch.relu_(y)": lambda m, y: torch.relu_(y),
    "F.relu(y, inplace=True)": lambda m, y: F.relu(y, inplace=True),
    "nn.ReLU(inplace=True)": lambda m, y: m.relu_inplace(y),
    "nn.LeakyReLU(inplace=True)": lambda m, y: m.leaky_inplace(y),
    "y.add_(c)": lambda m, y: y.add_(m.constant),
    "y.mul_(c)": lambda m, y: y.mul_(m.constant),
    "y.sub_(c)": lambda m, y: y.sub_(m.constant),
    "y.clamp_(min=-0.25)": lambda m, y: y.clamp_(min=-0.25),
    "y.add_(per-channel t)": lambda m, y: y.add_(channel_view(m.shift, m.rank)),
    "y += c": lambda m, y: _augmented_add(y, m.constant),
    "y *= c": lambda m, y: _augmented_mul(y, m.constant),
}

# copies in eager (x * 1 is a new tensor) or aliases (Identity returns x itself)
NOOPS = {
    "x * 1": lambda m, x: x * 1,
    "1 * x": lambda m, x: 1 * x,
    "x + 0": lambda m, x: x + 0,
    "x - 0": lambda m, x: x - 0,
    "x / 1": lambda m, x: x / 1,
    "x * 1.0": lambda m, x: x * 1.0,
    "torch.mul(x, 1)": lambda m, x: torch.mul(x, 1),
    "x.add(0)": lambda m, x: x.add(0),
    "nn.Identity": lambda m, x: m.identity(x),
    "nn.Dropout (eval)": lambda m, x: m.dropout(x),
    "F.dropout(training=False)": lambda m, x: F.dropout(x, 0.5, training=False),
    "torchvision StochasticDepth (eval)": lambda m, x: m.stochastic_depth(x),
    "x.clone()": lambda m, x: x.clone(),
}

JOINS = {
    "a + b": operator.add,
    "torch.add(a, b)": torch.add,
    "a.add_(b)": lambda a, b: a.add_(b),
    "a += b": _augmented_add,
}


class Mutating(nn.Module):
    """Holds what the :data:`MUTATIONS` need; ``mutate(y)`` applies the drawn one and returns
    its result (``rebind``, as ``y = y.relu_()`` reads) or ``y`` itself (as a bare
    ``y.relu_()`` statement, or a helper ``def bump(t): t += 1``, reads)."""

    def __init__(self, shape: Shape, mutation: str, rebind: bool, constant: float):
        super().__init__()
        self.rank, self.mutation, self.rebind, self.constant = (
            shape.rank,
            mutation,
            rebind,
            constant,
        )
        self.shift = nn.Parameter(torch.zeros(shape.channels))
        self.relu_inplace = nn.ReLU(inplace=True)
        self.leaky_inplace = nn.LeakyReLU(0.2, inplace=True)

    def mutate(self, y: torch.Tensor) -> torch.Tensor:
        result = MUTATIONS[self.mutation](self, y)
        return result if self.rebind else y


class NoopThenMutate(Mutating):
    """``y = noop(x)``, mutate ``y`` in place, return ``f(y) + g(x)`` with ``g(x)`` read
    before or after the mutation. Removing a no-op that copies makes the mutation reach ``x``
    (and the model's input, when this block comes first)."""

    def __init__(self, shape, mutation, rebind, constant, noop, read_x_first, f, g):
        super().__init__(shape, mutation, rebind, constant)
        self.noop, self.read_x_first, self.f, self.g = noop, read_x_first, f, g
        self.identity, self.dropout = nn.Identity(), nn.Dropout(0.5)
        self.stochastic_depth = StochasticDepth(0.5, "row")  # returns x itself in eval mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        early = self.g(x) if self.read_x_first else None
        y = self.mutate(NOOPS[self.noop](self, x))
        late = early if self.read_x_first else self.g(x)
        return self.f(y) + late


class MutateBetweenBranches(Mutating):
    """RepVGG-style ``f(x) ⊕ g(x)`` with an in-place op between the branches: on the block
    input (so ``g`` reads the mutated ``x``) or on the first branch's result."""

    def __init__(self, shape, mutation, rebind, constant, target, join, f, g):
        super().__init__(shape, mutation, rebind, constant)
        self.target, self.join, self.f, self.g = target, join, f, g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.f(x)
        if self.target == "input":
            x = self.mutate(x)
        b = self.g(x)
        if self.target == "first branch":
            a = self.mutate(a)
        return JOINS[self.join](a, b)


@st.composite
def _mutation(draw, shape: Shape) -> dict:
    return dict(
        shape=shape,
        mutation=draw(key_of(MUTATIONS)),
        rebind=draw(st.booleans()),
        constant=draw(st.sampled_from([0.5, -1.5, 2.0])),
    )


@st.composite
def noop_then_mutate(draw, shape: Shape) -> Block:
    c = shape.channels
    m = NoopThenMutate(
        **draw(_mutation(shape)),
        noop=draw(key_of(NOOPS)),
        read_x_first=draw(st.booleans()),
        f=draw(same_size_branch(shape, c)),
        g=draw(same_size_branch(shape, c)),
    )
    return Block(m, f"noop then mutate: {m.noop}; {m.mutation} (rebind={m.rebind})")


@st.composite
def mutate_between_branches(draw, shape: Shape) -> Block:
    c = shape.channels
    m = MutateBetweenBranches(
        **draw(_mutation(shape)),
        target=draw(st.sampled_from(["input", "first branch"])),
        join=draw(key_of(JOINS)),
        f=draw(same_size_branch(shape, c)),
        g=draw(same_size_branch(shape, c)),
    )
    return Block(m, f"mutate between branches: {m.mutation} on {m.target}, join {m.join}")


INPLACE_KINDS = {
    "noop_then_mutate": BlockKind(noop_then_mutate, ranks=(1, 2, 3)),
    "mutate_between_branches": BlockKind(mutate_between_branches, ranks=(1, 2, 3)),
}

# ============================================================================= hooks


def _output_affine(a: float, b: float, module, args, output):
    return tree_map(lambda t: t * a + b, output)


def _output_observer(module, args, output):
    return None


def _output_mutator(a: float, module, args, output):
    tree_map(lambda t: t.mul_(a), output)


def _input_affine(a: float, module, args):
    return (args[0] * a, *args[1:])


def _input_mutator(a: float, module, args):
    args[0].add_(a)


def _kwargs_output(a: float, module, args, kwargs, output):
    return tree_map(lambda t: t + a, output)


def _kwargs_input(a: float, module, args, kwargs):
    return (args[0] * a, *args[1:]), kwargs


HOOKS = {
    "forward hook: out * a + b": lambda m, a, b: m.register_forward_hook(
        functools.partial(_output_affine, a, b)
    ),
    "forward hook: observe": lambda m, a, b: m.register_forward_hook(_output_observer),
    "forward hook: out.mul_(a)": lambda m, a, b: m.register_forward_hook(
        functools.partial(_output_mutator, a)
    ),
    "forward hook (always_call)": lambda m, a, b: m.register_forward_hook(
        functools.partial(_output_affine, a, b), always_call=True
    ),
    "forward hook (with_kwargs)": lambda m, a, b: m.register_forward_hook(
        functools.partial(_kwargs_output, a), with_kwargs=True
    ),
    "pre-hook: x * a": lambda m, a, b: m.register_forward_pre_hook(
        functools.partial(_input_affine, a)
    ),
    "pre-hook: x.add_(a)": lambda m, a, b: m.register_forward_pre_hook(
        functools.partial(_input_mutator, a)
    ),
    "pre-hook (with_kwargs)": lambda m, a, b: m.register_forward_pre_hook(
        functools.partial(_kwargs_input, a), with_kwargs=True
    ),
}


def attach_hook(module: nn.Module, hook: str, a: float = 1.5, b: float = -0.5) -> None:
    HOOKS[hook](module, a, b)


def _hook_targets(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every submodule that takes activations (the block itself included; not the
    parametrizations, whose input is a parameter)."""
    return [
        (name or "<block>", m)
        for name, m in module.named_modules()
        if "parametrizations" not in name.split(".")
    ]


@st.composite
def hooked(draw, shape: Shape) -> Block:
    """A well-behaved block (from ``grammar`` or the padding / conv-subclass / arithmetic
    classes) with one or two hooks on submodules a fold would remove or rewrite."""
    from fuzz_models import HOOK_TARGET_KINDS  # the registry imports this module

    kinds = {k: v for k, v in HOOK_TARGET_KINDS.items() if shape.rank in v.ranks}
    base = draw(kinds[draw(key_of(kinds))].strategy(shape))
    targets = _hook_targets(base.module)
    labels = []
    for _ in range(draw(st.integers(1, 2))):
        name, target = targets[draw(st.integers(0, len(targets) - 1))]
        hook = draw(key_of(HOOKS))
        attach_hook(target, hook, draw(st.sampled_from([1.5, -0.5])), 0.25)
        labels.append(f"{hook} on {name} ({type(target).__name__})")
    return Block(base.module, f"{base.label} + " + ", ".join(labels))


def _grammar_block(name: str):
    """A block of the well-behaved grammar (2-d only), as a fuzz block."""

    @st.composite
    def strategy(draw, shape: Shape) -> Block:
        state = grammar.State(shape.channels, *shape.spatial)
        module, _, _ = draw(grammar.BLOCKS[name](state))
        return Block(module, f"grammar.{name}")

    return strategy


GRAMMAR_KINDS = {
    f"grammar.{name}": BlockKind(_grammar_block(name)) for name in sorted(grammar.BLOCKS)
}
HOOK_KINDS = {"hooked": BlockKind(hooked, ranks=(1, 2, 3))}

# ============================================================== computed operands


def _gate(x: torch.Tensor, rank: int) -> torch.Tensor:
    """A per-channel vector computed from the activation (so not a constant)."""
    return torch.sigmoid(x.mean(dim=(0, *spatial_dims(rank))))


class FunctionalBatchNorm(nn.Module):
    """``conv`` then a batch norm spelled functionally, with some operands computed from the
    activation (conditional BN), in training mode, or with ``torch.batch_norm``'s argument
    order ``(input, weight, bias, mean, var, training, momentum, eps, cudnn)``."""

    def __init__(self, shape: Shape, spelling: str, conv: nn.Module):
        super().__init__()
        c, self.rank, self.spelling, self.conv = shape.channels, shape.rank, spelling, conv
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return BATCH_NORM_SPELLINGS[self.spelling](self, self.conv(x))


def _conditional(m: FunctionalBatchNorm, x: torch.Tensor, which: str) -> torch.Tensor:
    g = _gate(x, m.rank)
    w, b, mean, var = m.weight, m.bias, m.running_mean, m.running_var
    w = w * g if "weight" in which else w
    b = b + g if "bias" in which else b
    mean = mean + g if "mean" in which else mean
    var = var + g if "var" in which else var
    return F.batch_norm(x, mean, var, w, b, False, 0.1, 1e-5)


BATCH_NORM_SPELLINGS = {
    "F.batch_norm(weight=f(x))": lambda m, x: _conditional(m, x, "weight"),
    "F.batch_norm(bias=f(x))": lambda m, x: _conditional(m, x, "bias"),
    "F.batch_norm(mean=f(x), var=f(x))": lambda m, x: _conditional(m, x, "mean var"),
    "torch.batch_norm (positional)": lambda m, x: torch.batch_norm(
        x, m.weight, m.bias, m.running_mean, m.running_var, False, 0.1, 1e-5, False
    ),
    "torch.batch_norm (keywords)": lambda m, x: torch.batch_norm(
        x,
        weight=m.weight,
        bias=m.bias,
        running_mean=m.running_mean,
        running_var=m.running_var,
        training=False,
        momentum=0.1,
        eps=1e-5,
        cudnn_enabled=False,
    ),
    "F.batch_norm(training=True)": lambda m, x: F.batch_norm(
        x, m.running_mean, m.running_var, m.weight, m.bias, training=True
    ),
    "F.batch_norm(…, True) positional": lambda m, x: F.batch_norm(
        x, m.running_mean, m.running_var, m.weight, m.bias, True, 0.1, 1e-5
    ),
    "F.batch_norm(x, None, None, w, b, True)": lambda m, x: F.batch_norm(
        x, None, None, m.weight, m.bias, True
    ),
}


TRAIN_MODE_BATCH_NORMS = (
    "BatchNorm kept in training mode",
    "BatchNorm(track_running_stats=False)",
    "BatchNorm kept in training mode, + its running mean",
)


class TrainModeBatchNorm(nn.Module):
    """``conv`` then a BN module that uses batch statistics inside an eval-mode model: one
    kept in training mode (``train()`` cannot switch it off), one without running stats, or
    one kept in training mode whose running mean — updated on every call — is then added
    through a view (which torch.fx evaluates while tracing, into a tensor constant) before an
    eval-mode BN that a fold would absorb the addition into."""

    def __init__(self, shape: Shape, spelling: str, conv: nn.Module):
        super().__init__()
        track = spelling != "BatchNorm(track_running_stats=False)"
        self.spelling, self.conv, self.rank = spelling, conv, shape.rank
        self.bn = BATCH_NORM[shape.rank](shape.channels, track_running_stats=track)
        self.after = BATCH_NORM[shape.rank](shape.channels)

    def train(self, mode: bool = True) -> TrainModeBatchNorm:
        super().train(mode)
        if self.spelling.startswith("BatchNorm kept in training mode"):
            self.bn.train(True)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.spelling.endswith("+ its running mean"):
            y = self.after(y + channel_view(self.bn.running_mean, self.rank))
        return y


DROPOUTS = {
    "F.dropout(x, 0.3)": lambda m, x: F.dropout(x, 0.3),
    "F.dropout(x, p=0.3)": lambda m, x: F.dropout(x, p=0.3),
    "F.dropout(x, 0.3, True)": lambda m, x: F.dropout(x, 0.3, True),
    "F.dropout(x, 0.3, self.training)": lambda m, x: F.dropout(x, 0.3, m.training),
    "torch.dropout(x, 0.3, True)": lambda m, x: torch.dropout(x, 0.3, True),
    "F.dropout2d(x, 0.3)": lambda m, x: F.dropout2d(x, 0.3),
    "F.alpha_dropout(x, 0.3, True)": lambda m, x: F.alpha_dropout(x, 0.3, True),
    "nn.Dropout kept in training mode": lambda m, x: m.dropout(x),
}


class DropoutBetween(nn.Module):
    """``bn(dropout(conv(x)))`` with a dropout that is active in an eval-mode model."""

    def __init__(self, shape: Shape, spelling: str, conv: nn.Module):
        super().__init__()
        self.spelling, self.conv = spelling, conv
        self.bn = BATCH_NORM[shape.rank](shape.channels)
        self.dropout = nn.Dropout(0.3)

    def train(self, mode: bool = True) -> DropoutBetween:
        super().train(mode)
        self.dropout.train(True)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(DROPOUTS[self.spelling](self, self.conv(x)))


OPERANDS = {
    "x * rand_like(s)": lambda m, x: x * channel_view(torch.rand_like(m.scale), m.rank),
    "x + randn_like(t)": lambda m, x: x + channel_view(torch.randn_like(m.shift), m.rank),
    "x * bernoulli(full_like(s, 0.5))": lambda m, x: (
        x * channel_view(torch.bernoulli(torch.full_like(m.scale, 0.5)), m.rank)
    ),
    "x * (s + randn_like(s))": lambda m, x: (
        x * channel_view(m.scale + torch.randn_like(m.scale), m.rank)
    ),
    "x * sigmoid(mean(x)) (SE)": lambda m, x: x * channel_view(_gate(x, m.rank), m.rank),
    "x * x.mean()": lambda m, x: x * x.mean(),
    "x * s + mean(x)": lambda m, x: x * channel_view(m.scale, m.rank) + x.mean(),
    "addcmul(t, x, f(x))": lambda m, x: torch.addcmul(
        channel_view(m.shift, m.rank), x, channel_view(_gate(x, m.rank), m.rank)
    ),
    "group_norm(weight=f(x))": lambda m, x: F.group_norm(x, 1, m.scale * _gate(x, m.rank), m.shift),
    "conv(x, weight=W * f(x))": lambda m, x: m.conv_fn(x, m.kernel * _gate(x, m.rank).mean()),
}


class ComputedOperand(nn.Module):
    """``after(op(conv(x)))``: ``op`` looks like a per-channel affine or a conv, but an
    operand is random or computed from the activation."""

    def __init__(self, shape: Shape, spelling: str, conv: nn.Module, after: nn.Module):
        super().__init__()
        c, self.rank, self.spelling = shape.channels, shape.rank, spelling
        self.conv, self.after = conv, after
        self.scale = nn.Parameter(torch.ones(c))
        self.shift = nn.Parameter(torch.zeros(c))
        self.kernel = nn.Parameter(torch.zeros(c, c, *([1] * shape.rank)))

    def conv_fn(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        return {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[self.rank](x, kernel, self.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after(OPERANDS[self.spelling](self, self.conv(x)))


def _plain_conv(shape: Shape, k: int) -> nn.Module:
    return CONV[shape.rank](shape.channels, shape.channels, k, padding=k // 2)


@st.composite
def functional_batch_norm(draw, shape: Shape) -> Block:
    spelling = draw(key_of(BATCH_NORM_SPELLINGS))
    m = FunctionalBatchNorm(shape, spelling, _plain_conv(shape, draw(st.sampled_from([1, 3]))))
    return Block(m, f"conv → {spelling}")


@st.composite
def train_mode_batch_norm(draw, shape: Shape) -> Block:
    spelling = draw(st.sampled_from(TRAIN_MODE_BATCH_NORMS))
    return Block(TrainModeBatchNorm(shape, spelling, _plain_conv(shape, 1)), f"conv → {spelling}")


@st.composite
def dropout_between(draw, shape: Shape) -> Block:
    spelling = draw(key_of(DROPOUTS))
    m = DropoutBetween(shape, spelling, _plain_conv(shape, draw(st.sampled_from([1, 3]))))
    return Block(m, f"conv → {spelling} → BN")


@st.composite
def computed_operand(draw, shape: Shape) -> Block:
    spelling = draw(key_of(OPERANDS))
    after = draw(
        st.sampled_from(["identity", "bn", "conv"]).map(
            lambda kind: {
                "identity": nn.Identity(),
                "bn": BATCH_NORM[shape.rank](shape.channels),
                "conv": CONV[shape.rank](shape.channels, shape.channels, 1),
            }[kind]
        )
    )
    m = ComputedOperand(shape, spelling, _plain_conv(shape, 1), after)
    return Block(m, f"conv → {spelling} → {type(after).__name__}")


FUNCTIONAL_KINDS = {
    "functional_batch_norm": BlockKind(functional_batch_norm, ranks=(1, 2, 3)),
    "train_mode_batch_norm": BlockKind(train_mode_batch_norm, ranks=(1, 2, 3)),
    "dropout_between": BlockKind(dropout_between, ranks=(2,)),  # dropout2d needs 3-d/4-d
    "computed_operand": BlockKind(computed_operand, ranks=(1, 2, 3)),
}

# ================================================================ conv subclasses


def _standardised(w: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(1, w.dim()))
    mean = w.mean(dims, keepdim=True)
    var = w.var(dims, keepdim=True, unbiased=False)
    return (w - mean) / torch.sqrt(var + 1e-5)


CONV_FORWARDS = {
    "weight standardisation": lambda m, w, b: (_standardised(w), b),
    "per-filter gain": lambda m, w, b: (w * m.gain_scale.reshape(-1, *([1] * (w.dim() - 1))), b),
    "flipped kernel": lambda m, w, b: (w.flip(-1), b),
    "bias ignored": lambda m, w, b: (w, None),
}


class _ConvForwardOverride:
    """Overrides ``_conv_forward`` only: ``forward`` is inherited, the weight is not what the
    conv applies."""

    def _conv_forward(self, input, weight, bias):
        weight, bias = CONV_FORWARDS[self.variant](self, weight, bias)
        return super()._conv_forward(input, weight, bias)


class WSConv1d(_ConvForwardOverride, nn.Conv1d):
    pass


class WSConv2d(_ConvForwardOverride, nn.Conv2d):
    pass


class WSConv3d(_ConvForwardOverride, nn.Conv3d):
    pass


WS_CONV = {1: WSConv1d, 2: WSConv2d, 3: WSConv3d}


def ws_conv(rank: int, variant: str, cin: int, cout: int, k: int, **kwargs) -> nn.Module:
    conv = WS_CONV[rank](cin, cout, k, **kwargs)
    conv.variant = variant
    conv.gain_scale = nn.Parameter(torch.ones(cout))
    return conv


class SumOfTwo(nn.Module):
    """``a(x) + b(x)``."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def _arrangements(shape: Shape, special_conv, rank: int) -> dict:
    """Where a conv that is not a plain conv sits: every spot a fold looks at."""
    c = shape.channels
    bn = BATCH_NORM[rank]
    return {
        "conv → BN": lambda: Seq(special_conv(c, c, 3, 1), bn(c)),
        "conv → scale": lambda: Seq(special_conv(c, c, 3, 1), ChannelScale(c, rank, "addcmul")),
        "BN → conv (no padding)": lambda: Seq(bn(c), special_conv(c, c, 3, 0)),
        "conv + 1×1 conv": lambda: SumOfTwo(special_conv(c, c, 3, 1), CONV[rank](c, c, 1)),
        "1×1 conv → conv": lambda: Seq(CONV[rank](c, c, 1), special_conv(c, c, 3, 1)),
        "conv 1×1 → conv": lambda: Seq(special_conv(c, c, 1, 0), CONV[rank](c, c, 3, padding=1)),
        "conv + identity": lambda: SumOfTwo(special_conv(c, c, 3, 1), nn.Identity()),
    }


@st.composite
def conv_subclass(draw, shape: Shape) -> Block:
    variant = draw(key_of(CONV_FORWARDS))

    def special(cin, cout, k, p):
        return ws_conv(shape.rank, variant, cin, cout, k, padding=p)

    arrangements = _arrangements(shape, special, shape.rank)
    where = draw(key_of(arrangements))
    return Block(arrangements[where](), f"Conv subclass ({variant}): {where}")


CONV_SUBCLASS_KINDS = {"conv_subclass": BlockKind(conv_subclass, ranks=(1, 2, 3))}

# ================================================================= parametrizations


class Symmetrised(nn.Module):
    """A custom parametrization: the kernel made symmetric along its last axis."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return (w + w.flip(-1)) / 2


class Doubled(nn.Module):
    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return 2 * b


def _legacy_weight_norm(conv: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.nn.utils.weight_norm(conv)  # a forward pre-hook recomputes the weight


PARAMETRIZATIONS = {
    "weight_norm": lambda conv: parametrizations.weight_norm(conv),
    "weight_norm(dim=None)": lambda conv: parametrizations.weight_norm(conv, dim=None),
    "spectral_norm": lambda conv: parametrizations.spectral_norm(conv),
    "legacy weight_norm (pre-hook)": _legacy_weight_norm,
    "custom: symmetric kernel": lambda conv: parametrize.register_parametrization(
        conv, "weight", Symmetrised()
    ),
    "custom: bias doubled": lambda conv: parametrize.register_parametrization(
        conv, "bias", Doubled()
    ),
}


@st.composite
def parametrized_conv(draw, shape: Shape) -> Block:
    how = draw(key_of(PARAMETRIZATIONS))
    groups = draw(st.sampled_from(common_groups(shape.channels, shape.channels)))

    def special(cin, cout, k, p):
        return PARAMETRIZATIONS[how](CONV[shape.rank](cin, cout, k, padding=p, groups=groups))

    arrangements = _arrangements(shape, special, shape.rank)
    where = draw(key_of(arrangements))
    return Block(arrangements[where](), f"parametrized conv ({how}): {where}")


PARAMETRIZE_KINDS = {"parametrized_conv": BlockKind(parametrized_conv, ranks=(1, 2, 3))}
