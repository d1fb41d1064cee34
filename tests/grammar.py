"""A Hypothesis grammar of random models covering every fold, with the structure each must
fold to.

A model is a stem conv followed by blocks separated by activations (which stop folds from
crossing block boundaries, so each block's outcome is independent). Each block states the op
counts (``repfx.ir.op_kinds.op_kind``) it must have after folding; the model's expectation is
their sum. All parameters — BN statistics, affine values, LayerScale — are drawn at O(1): a
near-identity BN or a 1e-5 LayerScale would hide a wrong fold.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import assume
from hypothesis import strategies as st
from torch import nn


@dataclass
class State:
    """Shape of the activation flowing between blocks (NCHW, batch excluded)."""

    channels: int
    height: int
    width: int


@dataclass
class Model:
    module: nn.Module
    input_shape: tuple[int, ...]
    expected: Counter  # op kind -> count after folding
    blocks: list[str]


def randomise_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-draw every parameter and BN statistic at O(1) scale, deterministically."""

    def normal(t: torch.Tensor, mean: float, std: float) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator, dtype=t.dtype) * std + mean

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() <= 1:
                p.copy_(normal(p, 1.0 if name.endswith(("weight", "gamma", "scale")) else 0.0, 0.5))
            else:
                fan_in = max(1, p[0].numel())
                p.copy_(normal(p, 0.0, 1.0 / math.sqrt(fan_in)))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(normal(b, 0.0, 0.5))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=generator, dtype=b.dtype) + 0.5)
    return module


# ------------------------------------------------------------------------ BN spellings


class FunctionalBatchNorm(nn.Module):
    """BN written with F.batch_norm on its own buffers (as timm's BatchNormAct2d does)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, 1e-5
        )


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm2d subclass with its own forward and identity act/drop (timm's pattern)."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )
        return self.act(self.drop(x))


BN_SPELLINGS: dict[str, Callable[[int], nn.Module]] = {
    "module": nn.BatchNorm2d,
    "functional": FunctionalBatchNorm,
    "subclass": BatchNormAct,
}


# ------------------------------------------------------------------------ affine spellings


class Scale(nn.Module):
    """A per-channel affine on NCHW in one of many spellings."""

    def __init__(self, channels: int, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        if spelling == "dwconv":
            self.conv = nn.Conv2d(channels, channels, 1, groups=channels)
        if spelling == "bn":
            self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, b = self.gamma, self.beta
        match self.spelling:
            case "index":
                return x * g[:, None, None]
            case "unsqueeze":
                return g.unsqueeze(-1).unsqueeze(-1) * x
            case "view_method":
                return x.mul(g.view(1, -1, 1, 1))
            case "torch_mul":
                return torch.mul(x, g.reshape(-1, 1, 1))
            case "mul_add":
                return x * g.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
            case "sub_div":
                return (x - b[:, None, None]) / g[:, None, None]
            case "addcmul":
                return torch.addcmul(b[:, None, None], x, g[:, None, None])
            case "scalar":
                return x * 0.75 + 0.25
            case "dwconv":
                return self.conv(x)
            case "bn":
                return self.bn(x)
        raise AssertionError(self.spelling)


SCALE_SPELLINGS = [
    "index",
    "unsqueeze",
    "view_method",
    "torch_mul",
    "mul_add",
    "sub_div",
    "addcmul",
    "scalar",
    "dwconv",
    "bn",
]


# ------------------------------------------------------------------------ blocks


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@st.composite
def conv_params(draw, cin: int, state: State, allow_stride: bool = True) -> dict:
    cout = draw(st.integers(1, 8))
    common = [g for g in range(1, min(cin, cout) + 1) if cin % g == 0 and cout % g == 0]
    groups = draw(st.sampled_from(common))
    k = draw(st.sampled_from([1, 2, 3, 5]))
    stride = draw(st.sampled_from([1, 2])) if allow_stride else 1
    dilation = draw(st.sampled_from([1, 2]))
    padding = draw(st.integers(0, 2))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    h = _conv_out(state.height, k, stride, padding, dilation)
    w = _conv_out(state.width, k, stride, padding, dilation)
    assume(h >= 1 and w >= 1 and (mode == "zeros" or padding < min(state.height, state.width)))
    return dict(
        in_channels=cin,
        out_channels=cout,
        kernel_size=k,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=mode,
        out_hw=(h, w),
    )


def _conv(params: dict) -> nn.Conv2d:
    return nn.Conv2d(**{k: v for k, v in params.items() if k != "out_hw"})


class Seq(nn.Sequential):
    pass


@st.composite
def conv_bn(draw, state: State):
    p = draw(conv_params(state.channels, state))
    bn = BN_SPELLINGS[draw(st.sampled_from(list(BN_SPELLINGS)))](p["out_channels"])
    block = Seq(_conv(p), bn)
    return block, State(p["out_channels"], *p["out_hw"]), Counter(conv=1)


@st.composite
def bn_conv(draw, state: State):
    bn = BN_SPELLINGS[draw(st.sampled_from(list(BN_SPELLINGS)))](state.channels)
    p = draw(conv_params(state.channels, state))
    exact = p["padding"] == 0 or p["padding_mode"] != "zeros"
    expected = Counter(conv=1) if exact else Counter(conv=1, batch_norm=1)
    return Seq(bn, _conv(p)), State(p["out_channels"], *p["out_hw"]), expected


@st.composite
def conv_scale(draw, state: State):
    p = draw(conv_params(state.channels, state))
    scale = Scale(p["out_channels"], draw(st.sampled_from(SCALE_SPELLINGS)))
    return Seq(_conv(p), scale), State(p["out_channels"], *p["out_hw"]), Counter(conv=1)


@st.composite
def conv_transpose_bn(draw, state: State):
    cout = draw(st.integers(1, 6))
    common = [g for g in range(1, min(state.channels, cout) + 1) if state.channels % g == 0]
    groups = draw(st.sampled_from([g for g in common if cout % g == 0]))
    stride = draw(st.sampled_from([1, 2]))
    conv = nn.ConvTranspose2d(state.channels, cout, 2, stride=stride, groups=groups)
    new = State(cout, (state.height - 1) * stride + 2, (state.width - 1) * stride + 2)
    return Seq(conv, nn.BatchNorm2d(cout)), new, Counter(conv_transpose=1)


@st.composite
def lone_affines(draw, state: State):
    """BN then a scale with no conv / norm next to them: they compose into one affine."""
    spelling = draw(st.sampled_from([s for s in SCALE_SPELLINGS if s not in ("dwconv", "bn")]))
    block = Seq(nn.BatchNorm2d(state.channels), Scale(state.channels, spelling))
    return block, state, Counter(channel_affine=1)


class RIFormerBlock(nn.Module):
    """``x + ls1·(A(N1(x)) − N1(x))`` then ``x + ls2·MLP(N2(x))``."""

    def __init__(self, channels: int, groups: int, affine: str, ls: str):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.affine = Scale(channels, affine)
        self.ls1 = Scale(channels, ls)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.fc1 = nn.Conv2d(channels, 2 * channels, 1)
        self.fc2 = nn.Conv2d(2 * channels, channels, 1)
        self.ls2 = Scale(channels, ls)
        self.drop_path = nn.Identity()
        self.dropout = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm1(x)
        x = x + self.drop_path(self.ls1(self.affine(n) - n))
        y = self.fc2(self.dropout(F.gelu(self.fc1(self.norm2(x)))))
        return x + self.drop_path(self.ls2(y))


@st.composite
def riformer_block(draw, state: State):
    c = state.channels
    groups = draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
    affine = draw(st.sampled_from(["dwconv", "mul_add", "addcmul", "index", "bn"]))
    ls = draw(st.sampled_from(["index", "unsqueeze", "view_method", "torch_mul"]))
    block = RIFormerBlock(c, groups, affine, ls)
    return block, state, Counter(group_norm=2, conv=2)


class ChannelsLastMlp(nn.Module):
    """ConvFormer-style: permute to NHWC, LayerNorm + Linear MLP + LayerScale, permute back."""

    def __init__(self, channels: int, scale_after_permute: bool, norm_bias: bool):
        super().__init__()
        self.norm = nn.LayerNorm(channels, bias=norm_bias)
        self.fc1 = nn.Linear(channels, 2 * channels)
        self.fc2 = nn.Linear(2 * channels, channels)
        self.gamma = nn.Parameter(torch.ones(channels))
        self.res_scale = nn.Parameter(torch.ones(channels))
        self.scale_after_permute = scale_after_permute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(x))))
        if self.scale_after_permute:
            y = y.permute(0, 3, 1, 2) * self.gamma.view(1, -1, 1, 1)
            return x.permute(0, 3, 1, 2) + y
        return (x * self.res_scale + y * self.gamma).permute(0, 3, 1, 2)


@st.composite
def channels_last_mlp(draw, state: State):
    after = draw(st.booleans())
    block = ChannelsLastMlp(state.channels, after, norm_bias=draw(st.booleans()))
    # the residual scale (x * res_scale) has no conv/linear/norm neighbour: it stays
    expected = Counter(layer_norm=1, linear=2, channel_affine=0 if after else 1)
    return block, state, expected


class TokenLinearBn(nn.Module):
    """LeViT-style: tokens (N, HW, C) → Linear → BatchNorm1d over flattened tokens."""

    def __init__(self, channels: int, out: int):
        super().__init__()
        self.linear = nn.Linear(channels, out, bias=False)
        self.bn = nn.BatchNorm1d(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        t = self.linear(x.flatten(2).transpose(1, 2))
        t = self.bn(t.flatten(0, 1)).reshape_as(t)
        return t.transpose(1, 2).reshape(n, -1, h, w)


@st.composite
def token_linear_bn(draw, state: State):
    out = draw(st.integers(1, 8))
    return (
        TokenLinearBn(state.channels, out),
        State(out, state.height, state.width),
        Counter(linear=1),
    )


class ParallelBranches(nn.Module):
    """RepVGG / ACNet / MobileOne-style: branches of one input summed with weights."""

    def __init__(self, branches: list[nn.Module], weights: list[float]):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.weights = weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branches[0](x)
        for branch, w in zip(self.branches[1:], self.weights[1:], strict=True):
            if w == 1.0:
                y = y + branch(x)
            elif w == -1.0:
                y = y - branch(x)
            else:
                y = y + w * branch(x)
        return y


@st.composite
def parallel_branches(
    draw, state: State, shape: tuple[int, int] | None = None, nested: bool = True
):
    """2–4 branches that all read the input through aligned windows: centred convs (square,
    1×k, k×1) with or without BN, average pools, a nested sum of such branches, and — at
    stride 1 with as many outputs as inputs — BN or identity branches. They must merge into
    one conv. ``shape`` fixes ``(out_channels, stride)`` for a nested sum."""
    cin = state.channels
    if shape is None:
        shape = (
            draw(st.sampled_from([cin, cin, draw(st.integers(1, 8))])),
            draw(st.sampled_from([1, 1, 2])),
        )
    cout, stride = shape
    common = [g for g in range(1, min(cin, cout) + 1) if cin % g == 0 and cout % g == 0]
    kinds = ["conv", "conv_bn", "conv_1xk", "conv_kx1"]
    if cin == cout:
        kinds += ["avg_pool"]
    if nested:
        kinds += ["nested"]
    if stride == 1 and cin == cout:
        kinds += ["bn", "identity"]
    branches = []
    for i in range(draw(st.integers(2, 4))):
        kind = draw(st.sampled_from(kinds if i else kinds[:4]))  # at least one conv
        if kind in ("bn", "identity"):
            branches.append(nn.BatchNorm2d(cin) if kind == "bn" else nn.Identity())
            continue
        if kind == "avg_pool":
            k = draw(st.sampled_from([3, 5]))
            branches.append(nn.AvgPool2d(k, stride, k // 2))  # zeros count: a uniform conv
            continue
        if kind == "nested":
            branches.append(draw(parallel_branches(state, shape, nested=False))[0])
            continue
        k = draw(st.sampled_from([1, 3, 5]))
        dilation = draw(st.sampled_from([1, 1, 2]))
        size = {"conv_1xk": (1, k), "conv_kx1": (k, 1)}.get(kind, (k, k))
        pad = tuple(dilation * (d - 1) // 2 for d in size)
        conv = nn.Conv2d(
            cin, cout, size, stride, pad, dilation, groups=draw(st.sampled_from(common)),
            bias=draw(st.booleans()),
        )  # fmt: skip
        branches.append(Seq(conv, nn.BatchNorm2d(cout)) if kind == "conv_bn" else conv)
    weights = [1.0] + [draw(st.sampled_from([1.0, -1.0, 0.5])) for _ in branches[1:]]
    h, w = (state.height - 1) // stride + 1, (state.width - 1) // stride + 1
    # branches that are all per-channel (BN, identity, depthwise 1×1 at stride 1) sum to one
    # per-channel affine, cheaper than a conv
    per_channel = all(_is_per_channel(b) for b in branches)
    expected = Counter(channel_affine=1) if per_channel else Counter(conv=1)
    return ParallelBranches(branches, weights), State(cout, h, w), expected


def _is_per_channel(branch: nn.Module) -> bool:
    if isinstance(branch, ParallelBranches):
        return all(_is_per_channel(b) for b in branch.branches)
    conv = branch[0] if isinstance(branch, Seq) else branch
    if isinstance(conv, nn.AvgPool2d):
        return False
    if not isinstance(conv, nn.Conv2d):
        return True  # BatchNorm2d or Identity
    return (
        conv.groups == conv.in_channels == conv.out_channels
        and conv.kernel_size == (1, 1)
        and (conv.stride == (1, 1))
    )


class ConcatBranches(nn.Module):
    def __init__(self, branches: list[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


@st.composite
def concat_branches(draw, state: State):
    """Inception-style: dense convs (and identity / BN at stride 1) of one input, concatenated
    along the channels: one conv."""
    cin, stride = state.channels, draw(st.sampled_from([1, 1, 2]))
    branches: list[nn.Module] = []
    for i in range(draw(st.integers(2, 3))):
        kind = draw(
            st.sampled_from(
                ["conv", "conv_bn", "identity"] if i and stride == 1 else ["conv", "conv_bn"]
            )
        )
        if kind == "identity":
            branches.append(draw(st.sampled_from([nn.Identity(), nn.BatchNorm2d(cin)])))
            continue
        k, dilation = draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([1, 2]))
        conv = nn.Conv2d(cin, draw(st.integers(1, 4)), k, stride, dilation * (k - 1) // 2, dilation)
        branches.append(Seq(conv, nn.BatchNorm2d(conv.out_channels)) if kind == "conv_bn" else conv)
    channels = sum(
        b[0].out_channels if isinstance(b, Seq) else getattr(b, "out_channels", cin)
        for b in branches
    )
    h, w = (state.height - 1) // stride + 1, (state.width - 1) // stride + 1
    return ConcatBranches(branches), State(channels, h, w), Counter(conv=1)


@st.composite
def sequential_convs(draw, state: State):
    """DBB-style 1×1 (maybe + BN) → K×K. Composed into one conv when exact (no shift meets
    zero padding) and no more expensive (the 1×1 does not reduce channels)."""
    cin = state.channels
    mid = draw(st.integers(cin, max(cin, 8)))
    groups = draw(st.sampled_from([g for g in range(1, cin + 1) if cin % g == 0 and mid % g == 0]))
    with_bn, bias = draw(st.booleans()), draw(st.booleans())
    first: list[nn.Module] = [nn.Conv2d(cin, mid, 1, groups=groups, bias=bias)]
    if with_bn:
        first.append(nn.BatchNorm2d(mid))
    p = draw(conv_params(mid, state))
    p["groups"] = groups
    assume(p["out_channels"] % groups == 0)
    second = _conv(p)
    shifted = with_bn or bias
    padded = p["padding"] > 0 and p["padding_mode"] == "zeros"
    expected = Counter(conv=2) if shifted and padded else Counter(conv=1)
    return Seq(*first, second), State(p["out_channels"], *p["out_hw"]), expected


PURE_SCALES = ["index", "unsqueeze", "view_method", "torch_mul"]


class PoolMixer(nn.Module):
    """PoolFormer's token mixer ``x + ls·(M(n) − n)``, ``n = GroupNorm(x)``, with ``M`` an
    average pool (zero padding counted or not) or a depthwise conv."""

    def __init__(self, channels: int, groups: int, mixer: str, ls: str):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        if mixer == "dwconv":
            self.mixer = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        else:
            self.mixer = nn.AvgPool2d(3, 1, 1, count_include_pad=mixer == "avg_pool_incl")
        self.ls = Scale(channels, ls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm(x)
        return x + self.ls(self.mixer(n) - n)


@st.composite
def pool_mixer(draw, state: State):
    """The scale goes back through the mixer into the norm; a zero-counting pool or a
    depthwise conv minus its input also merges into one conv."""
    c = state.channels
    groups = draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
    mixer = draw(st.sampled_from(["avg_pool_excl", "avg_pool_incl", "dwconv"]))
    block = PoolMixer(c, groups, mixer, draw(st.sampled_from(PURE_SCALES)))
    return block, state, Counter(group_norm=1, conv=0 if mixer == "avg_pool_excl" else 1)


class TokenMixer(nn.Module):
    """ResMLP / MLP-Mixer: ``x + ls·T(n)`` with ``T`` a linear over the positions."""

    def __init__(self, channels: int, positions: int, bias: bool):
        super().__init__()
        self.norm = nn.GroupNorm(1, channels)
        self.tokens = nn.Linear(positions, positions, bias=bias)
        self.gamma = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tokens(self.norm(x).flatten(2)) * self.gamma[:, None]
        return x + y.reshape(x.shape)


@st.composite
def token_mixer(draw, state: State):
    """Bias-free, the scale goes back through ``T`` into the norm; with a bias it cannot (the
    bias would need scaling per channel and per position) and stays, unless it is a scalar."""
    bias = draw(st.booleans())
    block = TokenMixer(state.channels, state.height * state.width, bias)
    stays = bias and state.channels > 1  # one channel: a scalar, which the linear takes
    return block, state, Counter(group_norm=1, linear=1, channel_affine=int(stays))


class ScaledResidual(nn.Module):
    """``a = conv(x)``, then ``s·a + tanh(conv(a))`` (``shortcut``), ``s·(a + conv(a))``
    (``sum``) or ``s·a + conv(GroupNorm(a))`` (``norm_reads``)."""

    def __init__(self, channels: int, kind: str, spelling: str):
        super().__init__()
        self.first = nn.Conv2d(channels, channels, 3, padding=1)
        self.branch = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(1, channels)
        self.scale = Scale(channels, spelling)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.first(x)
        if self.kind == "shortcut":
            return self.scale(a) + torch.tanh(self.branch(a))
        if self.kind == "sum":
            return self.scale(a + self.branch(a))
        return self.scale(a) + self.branch(self.norm(a))


@st.composite
def scaled_residual(draw, state: State):
    """A scale on a shortcut or on a residual sum goes back into the convs computing it and is
    undone by the conv that reads the scaled value; beside a norm reading it, it stays."""
    kind = draw(st.sampled_from(["shortcut", "sum", "norm_reads"]))
    block = ScaledResidual(state.channels, kind, draw(st.sampled_from(PURE_SCALES)))
    if kind == "norm_reads":
        return block, state, Counter(conv=2, group_norm=1, channel_affine=1)
    return block, state, Counter(conv=2)


class LastAxisNorm(nn.Module):
    """Channels-last: ``permute → norm → s ⊙ n (+ t) → GELU → Linear → permute`` with a
    LayerNorm or an RMSNorm, with or without its own affine."""

    def __init__(self, channels: int, norm: str, affine: bool, shift: bool):
        super().__init__()
        kind = nn.LayerNorm if norm == "layer_norm" else nn.RMSNorm
        self.norm = kind(channels, elementwise_affine=affine)
        self.s = nn.Parameter(torch.ones(channels))
        self.t = nn.Parameter(torch.zeros(channels)) if shift else None
        self.fc = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x.permute(0, 2, 3, 1)) * self.s
        y = y if self.t is None else y + self.t
        return self.fc(F.gelu(y)).permute(0, 3, 1, 2)


@st.composite
def last_axis_norm(draw, state: State):
    """The affine goes into the norm, but for a shift into an RMSNorm (it has no β)."""
    norm = draw(st.sampled_from(["layer_norm", "rms_norm"]))
    shift = draw(st.booleans())
    block = LastAxisNorm(state.channels, norm, draw(st.booleans()), shift)
    stays = norm == "rms_norm" and shift
    return block, state, Counter({norm: 1, "linear": 1, "channel_affine": int(stays)})


class FlattenLinear(nn.Module):
    """``fc(flatten(a(pool(x)), 1)).view(x.shape)``: a per-channel affine ``a`` read only
    through a flatten by a linear (a VGG-style classifier head, kept the shape of a block)."""

    def __init__(self, channels: int, height: int, width: int, spelling: str):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.scale = Scale(channels, spelling)
        self.fc = nn.Linear(channels * 4, channels * height * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.scale(self.pool(x)), 1)).view(x.shape)


@st.composite
def flatten_linear(draw, state: State):
    """The affine (any spelling, a BN or a depthwise 1×1 conv too) goes into the linear."""
    spelling = draw(st.sampled_from(SCALE_SPELLINGS))
    block = FlattenLinear(state.channels, state.height, state.width, spelling)
    return block, state, Counter(linear=1)


BLOCKS = {
    "conv_bn": conv_bn,
    "bn_conv": bn_conv,
    "conv_scale": conv_scale,
    "conv_transpose_bn": conv_transpose_bn,
    "lone_affines": lone_affines,
    "riformer": riformer_block,
    "channels_last_mlp": channels_last_mlp,
    "token_linear_bn": token_linear_bn,
    "parallel_branches": parallel_branches,
    "sequential_convs": sequential_convs,
    "concat_branches": concat_branches,
    "pool_mixer": pool_mixer,
    "token_mixer": token_mixer,
    "scaled_residual": scaled_residual,
    "last_axis_norm": last_axis_norm,
    "flatten_linear": flatten_linear,
}
# Smooth barriers: a ReLU can zero a whole channel, and a GroupNorm over a constant channel
# amplifies rounding noise by 1/sqrt(eps) — an ill-conditioned model, not a wrong fold.
ACTIVATIONS = [nn.GELU, nn.SiLU, nn.Tanh, nn.Mish]


class Head(nn.Module):
    """Global pool → Linear → BatchNorm1d, then BatchNorm1d → Linear (LeViT's NormLinear)."""

    def __init__(self, channels: int, hidden: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.act = nn.ReLU()
        self.norm = nn.BatchNorm1d(hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.fc(x.mean((2, 3)))))
        return self.out(self.norm(x))


@st.composite
def models(draw, max_blocks: int = 4) -> Model:
    in_channels = draw(st.integers(1, 4))
    state = State(draw(st.integers(2, 6)), draw(st.integers(8, 14)), draw(st.integers(8, 14)))
    input_hw = (state.height, state.width)
    layers: list[nn.Module] = [nn.Conv2d(in_channels, state.channels, 3, padding=1)]
    expected = Counter(conv=1)
    names = []
    for name in draw(st.lists(st.sampled_from(list(BLOCKS)), min_size=1, max_size=max_blocks)):
        layers.append(draw(st.sampled_from(ACTIVATIONS))())
        block, state, block_expected = draw(BLOCKS[name](state))
        layers.append(block)
        expected += block_expected
        names.append(name)
    layers.append(nn.GELU())
    with_head = draw(st.booleans())
    if with_head:
        layers.append(Head(state.channels, draw(st.integers(1, 6)), draw(st.integers(1, 5))))
        expected += Counter(linear=2)
    module = nn.Sequential(*layers).eval()
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    randomise_(module, generator)
    batch = draw(st.integers(1, 3)) if not with_head else draw(st.integers(2, 3))
    shape = (batch, in_channels, *input_hw)
    return Model(module, shape, expected, names)
