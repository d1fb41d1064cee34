"""Fuzz blocks whose trap is geometric or numeric: padding and window alignment, arithmetic
spellings, dtypes, and layouts.

Each section is one bug class: modules, ``@st.composite`` generators, then the class's
``KINDS``. Geometry is drawn freely — even kernels, dilation, strides against odd and even
sizes, ``padding='same'``, padding modes, crops, transposed convs, 1-d and 3-d — so that many
drawn blocks are *not* foldable: a fold must check, not assume, that windows align.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fuzz_common import (
    AVG_POOL,
    BATCH_NORM,
    CONV,
    CONV_T,
    MAX_POOL,
    Block,
    BlockKind,
    ChannelScale,
    Seq,
    Shape,
    channel_view,
    common_groups,
    key_of,
    paddings_for,
    probe_spatial,
    same_size_branch,
)
from hypothesis import assume
from hypothesis import strategies as st
from torch import nn

# ========================================================================== padding

PADDING_MODES = ["zeros", "zeros", "reflect", "replicate", "circular"]


@st.composite
def free_conv(draw, shape: Shape, cout: int, stride: int | None = None) -> nn.Module:
    """A conv with any geometry: kernel 1–5 (per dim), dilation, stride, int / per-dim /
    ``'same'`` / ``'valid'`` padding, any padding mode, groups, bias."""
    rank = shape.rank
    k = tuple(draw(st.integers(1, 5)) for _ in range(rank))
    k = k if draw(st.booleans()) else (k[0],) * rank
    dilation = draw(st.sampled_from([1, 1, 2]))
    stride = draw(st.sampled_from([1, 1, 2])) if stride is None else stride
    options: list = [draw(st.integers(0, 2)), tuple(draw(st.integers(0, 2)) for _ in k), "valid"]
    if stride == 1:
        options.append("same")
    padding = draw(st.sampled_from(options))
    numeric = (0,) * rank if padding == "valid" else padding
    if isinstance(numeric, int):
        numeric = (numeric,) * rank
    if isinstance(numeric, tuple):  # no window may be wider than the padded input
        k = tuple(min(kk, n + 2 * p) for kk, n, p in zip(k, shape.spatial, numeric, strict=True))
        if any(
            dilation * (kk - 1) + 1 > n + 2 * p
            for kk, n, p in zip(k, shape.spatial, numeric, strict=True)
        ):
            dilation = 1
    return CONV[rank](
        shape.channels,
        cout,
        k,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=draw(st.sampled_from(common_groups(shape.channels, cout))),
        bias=draw(st.booleans()),
        padding_mode=draw(st.sampled_from(PADDING_MODES)),
    )


@st.composite
def conv_then_affine(draw, shape: Shape) -> Block:
    """Any conv (or transposed conv), with a BN / per-channel scale before or after it."""
    cout = draw(st.integers(1, 4))
    conv = draw(st.one_of(free_conv(shape, cout), free_conv_transpose(shape, cout)))
    before = draw(st.booleans())
    c = shape.channels if before else cout
    affine = draw(
        st.sampled_from(["BatchNorm", "addcmul", "x * s.view", "(x - t) / s"]).map(
            lambda s: ChannelScale(c, shape.rank, s)
        )
    )
    module = Seq(affine, conv) if before else Seq(conv, affine)
    order = f"{affine.spelling} → {conv}" if before else f"{conv} → {affine.spelling}"
    return Block(module, f"conv/affine: {order}")


@st.composite
def free_conv_transpose(draw, shape: Shape, cout: int) -> nn.Module:
    k = draw(st.integers(1, 4))
    stride, dilation = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 1, 2]))
    return CONV_T[shape.rank](
        shape.channels,
        cout,
        k,
        stride=stride,
        padding=draw(st.integers(0, dilation * (k - 1))),
        output_padding=draw(st.integers(0, max(stride, dilation) - 1)),
        dilation=dilation,
        groups=draw(st.sampled_from(common_groups(shape.channels, cout))),
        bias=draw(st.booleans()),
    )


class Crop(nn.Module):
    """``x[..., lo:n-hi, …]`` on every spatial dim (ACNet reads a symmetric crop)."""

    def __init__(self, lo: tuple[int, ...], hi: tuple[int, ...]):
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = tuple(
            slice(lo, -hi if hi else None) for lo, hi in zip(self.lo, self.hi, strict=True)
        )
        return x[(..., *index)]


class WeightedSum(nn.Module):
    """``Σ wᵢ · branchᵢ(x)`` spelled ``+``, ``-`` or ``w *``."""

    def __init__(self, branches: list[nn.Module], weights: list[float]):
        super().__init__()
        self.branches, self.weights = nn.ModuleList(branches), weights

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
def matching_conv(draw, shape: Shape, sizes: tuple[int, ...], target: tuple[int, ...], cout, s):
    """A conv from ``sizes`` to ``target`` (padding solved per dim; any of the solutions), or
    ``None`` when the drawn kernel cannot reach it."""
    k, d = draw(st.sampled_from([1, 2, 3, 4, 5])), draw(st.sampled_from([1, 1, 2]))
    choices = [paddings_for(n, t, k, s, d) for n, t in zip(sizes, target, strict=True)]
    if not all(choices):
        return None
    padding = tuple(draw(st.sampled_from(c)) for c in choices)
    mode = draw(st.sampled_from(PADDING_MODES))
    if mode != "zeros" and any(p >= n for p, n in zip(padding, sizes, strict=True)):
        mode = "zeros"
    return CONV[shape.rank](
        shape.channels, cout, k, s, padding, d,
        groups=draw(st.sampled_from(common_groups(shape.channels, cout))),
        bias=draw(st.booleans()), padding_mode=mode,
    )  # fmt: skip


BRANCH_KINDS = ["conv", "conv_bn", "crop_conv", "avg_pool", "max_pool", "identity", "bn"]


@st.composite
def _branch(draw, shape: Shape, target: tuple[int, ...], cout: int, s: int):
    """One more branch whose output has spatial size ``target`` (or ``None``)."""
    kind = draw(st.sampled_from(BRANCH_KINDS))
    same = shape.channels == cout
    if kind in ("identity", "bn"):
        ok = same and s == 1 and target == shape.spatial
        return (
            (nn.Identity() if kind == "identity" else BATCH_NORM[shape.rank](cout)) if ok else None
        )
    if kind in ("avg_pool", "max_pool"):
        return draw(_pool_branch(shape, target, s, kind)) if same else None
    sizes = shape.spatial
    crop = None
    if kind == "crop_conv":
        lo = tuple(draw(st.integers(0, 2)) for _ in sizes)
        hi = lo if draw(st.booleans()) else tuple(draw(st.integers(0, 2)) for _ in sizes)
        sizes = tuple(n - a - b for n, a, b in zip(sizes, lo, hi, strict=True))
        if min(sizes) < 1:
            return None
        crop = Crop(lo, hi)
    conv = draw(matching_conv(shape, sizes, target, cout, s))
    if conv is None:
        return None
    if kind == "conv_bn":
        return Seq(conv, BATCH_NORM[shape.rank](cout))
    return Seq(crop, conv) if crop is not None else conv


@st.composite
def _pool_branch(draw, shape: Shape, target: tuple[int, ...], s: int, kind: str):
    k = draw(st.sampled_from([2, 3]))
    ceil = draw(st.booleans())
    for p in range(k // 2 + 1):
        pool = (
            AVG_POOL[shape.rank](k, s, p, ceil_mode=ceil, count_include_pad=draw(st.booleans()))
            if kind == "avg_pool"
            else MAX_POOL[shape.rank](k, s, p, ceil_mode=ceil)
        )
        if probe_spatial(pool, shape) == target:
            return pool
    return None


@st.composite
def branch_sum(draw, shape: Shape) -> Block:
    """ACNet / RepVGG / DBB-like sums of 2–4 branches of any geometry with equal output
    shapes: convs of different kernels, dilations and paddings (even kernels, two paddings
    that give the same size at stride 2), convs of crops, pools, BN, identity."""
    cout = draw(st.sampled_from([shape.channels, shape.channels, draw(st.integers(1, 4))]))
    s = draw(st.sampled_from([1, 1, 2]))
    first = draw(free_conv(shape, cout, stride=s))
    target = probe_spatial(first, shape)
    assume(target is not None)
    branches = [first]
    wanted = draw(st.integers(1, 3))
    for _ in range(3 * wanted):  # a drawn branch may not reach the target size: draw again
        branch = draw(_branch(shape, target, cout, s))
        if branch is not None:
            branches.append(branch)
        if len(branches) > wanted:
            break
    if len(branches) == 1:  # none reached the target: a 1×1 conv with solved padding does
        paddings = [paddings_for(n, t, 1, s, 1) for n, t in zip(shape.spatial, target, strict=True)]
        assume(all(paddings))
        branches.append(CONV[shape.rank](shape.channels, cout, 1, s, tuple(p[0] for p in paddings)))
    weights = [1.0] + [draw(st.sampled_from([1.0, -1.0, 0.5])) for _ in branches[1:]]
    label = " + ".join(repr(b).replace("\n", "") for b in branches)
    return Block(WeightedSum(branches, weights), f"branch sum: {label}")


@st.composite
def crop_branch_sum(draw, shape: Shape) -> Block:
    """``conv_a(x) + conv_b(x[..., lo:n-hi])`` where ``conv_b``'s padding is ``(lo + hi) / 2``
    larger: aligned when the crop is symmetric (ACNet), shifted by one pixel when not."""
    c = shape.channels
    k_a, p_a = draw(st.sampled_from([(3, 1), (1, 0), (3, 0), (5, 2)]))
    crop = draw(st.integers(1, max(1, (min(shape.spatial) - 1) // 2)))
    lo = draw(st.sampled_from([crop, crop, crop - 1, crop + 1]))
    k_b = draw(st.sampled_from([k for k in (1, 3, 5) if (k - k_a) % 2 == 0]))
    p_b = p_a + crop - (k_a - k_b) // 2
    assume(p_b >= 0)
    a = CONV[shape.rank](c, c, k_a, padding=p_a)
    cropped = Crop((lo,) * shape.rank, (2 * crop - lo,) * shape.rank)
    b = Seq(cropped, CONV[shape.rank](c, c, k_b, padding=p_b))
    if draw(st.booleans()):
        a, b = Seq(a, BATCH_NORM[shape.rank](c)), Seq(b, BATCH_NORM[shape.rank](c))
    label = f"crop sum: k{k_a} p{p_a} + crop [{lo}:-{2 * crop - lo}] k{k_b} p{p_b}"
    return Block(WeightedSum([a, b], [1.0, 1.0]), label)


@st.composite
def dilated_even_sum(draw, shape: Shape) -> Block:
    """An even kernel with dilation 2 (k=2 → 3 wide, k=4 → 7 wide) summed with a 1×1."""
    c = shape.channels
    k = draw(st.sampled_from([2, 4]))
    padding = draw(st.sampled_from([k - 1, "same"]))
    big = CONV[shape.rank](c, c, k, padding=padding, dilation=2, bias=draw(st.booleans()))
    small = draw(same_size_branch(shape, c))
    return Block(WeightedSum([big, small], [1.0, 1.0]), f"k{k} d2 p{padding} + {small}")


PAD_FUNCTIONS = {
    "F.pad(constant 0)": lambda m, y: F.pad(y, m.pads),
    "F.pad(constant v)": lambda m, y: F.pad(y, m.pads, value=m.value),
    "F.pad(reflect)": lambda m, y: F.pad(y, m.pads, mode="reflect"),
    "F.pad(replicate)": lambda m, y: F.pad(y, m.pads, mode="replicate"),
    "F.pad(circular)": lambda m, y: F.pad(y, m.pads, mode="circular"),
}


class PadBetween(nn.Module):
    """DBB / BNAndPad: ``second(pad(first(x)))`` with an explicit pad of any mode."""

    def __init__(self, first: nn.Module, pad: str, pads: tuple[int, ...], value, second):
        super().__init__()
        self.first, self.pad, self.pads, self.value, self.second = first, pad, pads, value, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(PAD_FUNCTIONS[self.pad](self, self.first(x)))


@st.composite
def pointwise_then_padded(draw, shape: Shape) -> Block:
    """A 1×1 conv (zero padding of its own, bias or BN: its border is not zero) followed by an
    explicit pad or a padded conv of any padding mode."""
    rank, c = shape.rank, shape.channels
    mid = draw(st.integers(1, 4))
    first: nn.Module = CONV[rank](
        c, mid, 1, padding=draw(st.integers(0, 1)), bias=draw(st.booleans())
    )
    if draw(st.booleans()):
        first = Seq(first, BATCH_NORM[rank](mid))
    k = draw(st.sampled_from([1, 3]))
    if draw(st.booleans()):
        mode = draw(st.sampled_from(PADDING_MODES))
        second = CONV[rank](mid, c, k, padding=draw(st.integers(0, 1)), padding_mode=mode)
        return Block(Seq(first, second), f"pointwise → {second}")
    pads = tuple(draw(st.integers(0, 1)) for _ in range(2 * rank))
    pad = draw(key_of(PAD_FUNCTIONS))
    block = PadBetween(first, pad, pads, 0.5, CONV[rank](mid, c, k))
    return Block(block, f"pointwise → {pad} {pads} → conv k{k}")


PADDING_KINDS = {
    "conv_then_affine": BlockKind(conv_then_affine, ranks=(1, 2, 3)),
    "branch_sum": BlockKind(branch_sum, ranks=(1, 2, 3)),
    "crop_branch_sum": BlockKind(crop_branch_sum, ranks=(1, 2, 3)),
    "dilated_even_sum": BlockKind(dilated_even_sum, ranks=(1, 2, 3)),
    "pointwise_then_padded": BlockKind(pointwise_then_padded, ranks=(1, 2, 3)),
}

# ======================================================================= arithmetic


def _c(m, x):  # per-channel constant
    return channel_view(m.scale, m.rank)


def _t(m, x):  # per-channel shift
    return channel_view(m.shift, m.rank)


ARITHMETIC = {
    "c - x": lambda m, x: _c(m, x) - x,
    "0 - x": lambda m, x: 0 - x,
    "-x": lambda m, x: -x,
    "x - c": lambda m, x: x - _t(m, x),
    "torch.add(x, c, alpha=a)": lambda m, x: torch.add(x, _t(m, x), alpha=m.alpha),
    "torch.add(c, x, alpha=a)": lambda m, x: torch.add(_t(m, x), x, alpha=m.alpha),
    "torch.sub(c, x, alpha=a)": lambda m, x: torch.sub(_t(m, x), x, alpha=m.alpha),
    "torch.sub(x, c, alpha=a)": lambda m, x: torch.sub(x, _t(m, x), alpha=m.alpha),
    "x.sub(c, alpha=a)": lambda m, x: x.sub(_t(m, x), alpha=m.alpha),
    "x.add(c, alpha=a)": lambda m, x: x.add(_t(m, x), alpha=m.alpha),
    "torch.rsub(x, c)": lambda m, x: torch.rsub(x, _t(m, x)),
    "x / c": lambda m, x: x / _c(m, x),
    "c / x": lambda m, x: _c(m, x) / x,
    "x.div(c)": lambda m, x: x.div(_c(m, x)),
    "torch.true_divide(x, c)": lambda m, x: torch.true_divide(x, _c(m, x)),
    "torch.div(x, c, rounding_mode='floor')": lambda m, x: torch.div(
        x, 0.25, rounding_mode="floor"
    ),
    "x // 0.25": lambda m, x: x // 0.25,
    "addcmul(t, x, c, value=v)": lambda m, x: torch.addcmul(_t(m, x), x, _c(m, x), value=m.alpha),
    "addcmul(t, c, x, value=v)": lambda m, x: torch.addcmul(_t(m, x), _c(m, x), x, value=m.alpha),
    "t.addcmul(x, c)": lambda m, x: _t(m, x).addcmul(x, _c(m, x)),
    "x.addcmul(t, c)": lambda m, x: x.addcmul(_t(m, x), _c(m, x)),
    "addcdiv(t, x, c, value=v)": lambda m, x: torch.addcdiv(_t(m, x), x, _c(m, x), value=m.alpha),
    "x * 2.5": lambda m, x: x * 2.5,
    "x * 3 (int)": lambda m, x: x * 3,
    "x * 0": lambda m, x: x * 0,
    "x * s (0-d tensor)": lambda m, x: x * m.scalar_scale,
    "x * row (along the first spatial axis)": lambda m, x: (
        x * m.row_scale.reshape(-1, *[1] * (m.rank - 1))
    ),
    "x * col (along the last axis)": lambda m, x: x * m.col_scale,
    "x * c (1, C, 1…)": lambda m, x: x * _c(m, x).unsqueeze(0),
    "x * arange(C) (int64)": lambda m, x: x * channel_view(m.int_scale, m.rank),
    "c * x": lambda m, x: _c(m, x) * x,
    "torch.mul(c, x)": lambda m, x: torch.mul(_c(m, x), x),
    "x ** 1": lambda m, x: x**1,
    "x.pow(2)": lambda m, x: x.pow(2),
    "torch.lerp(x, c, 0.25)": lambda m, x: torch.lerp(x, _c(m, x), 0.25),
}


class ArithmeticChain(nn.Module):
    """``after(opₖ(…op₁(before(x))))`` with ops from :data:`ARITHMETIC`."""

    def __init__(self, shape: Shape, ops: list[str], alpha: float, before, after):
        super().__init__()
        c, self.rank, self.ops, self.alpha = shape.channels, shape.rank, ops, alpha
        self.before, self.after = before, after
        self.scale = nn.Parameter(torch.ones(c))
        self.shift = nn.Parameter(torch.zeros(c))
        self.scalar_scale = nn.Parameter(torch.ones(()))
        self.row_scale = nn.Parameter(torch.ones(shape.spatial[0]))
        self.col_scale = nn.Parameter(torch.ones(shape.spatial[-1]))
        self.register_buffer("int_scale", torch.arange(1, c + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.before(x)
        for op in self.ops:
            y = ARITHMETIC[op](self, y)
        return self.after(y)


@st.composite
def arithmetic_chain(draw, shape: Shape) -> Block:
    rank, c = shape.rank, shape.channels
    ops = draw(st.lists(key_of(ARITHMETIC), min_size=1, max_size=3))
    k = draw(st.sampled_from([1, 3]))
    before = draw(
        st.sampled_from(["conv", "conv+BN", "none"]).map(
            lambda kind: {
                "conv": CONV[rank](c, c, k, padding=k // 2),
                "conv+BN": Seq(CONV[rank](c, c, k, padding=k // 2), BATCH_NORM[rank](c)),
                "none": nn.Identity(),
            }[kind]
        )
    )
    after_k, after_p = draw(st.sampled_from([(1, 0), (3, 0), (3, 1)]))
    after = draw(
        st.sampled_from(
            [nn.Identity(), CONV[rank](c, c, after_k, padding=after_p), BATCH_NORM[rank](c)]
        )
    )
    alpha = draw(st.sampled_from([0.5, -2.0, 3]))
    m = ArithmeticChain(shape, ops, alpha, before, after)
    return Block(m, f"arithmetic: {type(before).__name__} → {' → '.join(ops)} → {after}")


ARITHMETIC_KINDS = {"arithmetic_chain": BlockKind(arithmetic_chain, ranks=(1, 2, 3))}

# =========================================================================== dtypes


class KeepsDtype:
    """A module whose listed parameters keep their own dtype when the model is converted
    (``fuzz_models.convert``): a float32 scale next to float16 convs."""

    kept_dtypes: dict[str, torch.dtype]


class MixedPrecisionScale(nn.Module, KeepsDtype):
    """``conv(x) * s`` with ``s`` kept in float32 (or float64): type promotion makes the
    product float32 in a float16 model, unless cast back to the input's dtype."""

    def __init__(self, shape: Shape, kept: torch.dtype, cast_back: bool, before_conv: bool):
        super().__init__()
        c, self.rank, self.cast_back, self.before_conv = (
            shape.channels,
            shape.rank,
            cast_back,
            before_conv,
        )
        self.conv = CONV[shape.rank](c, c, 1)
        self.scale = nn.Parameter(torch.ones(c))
        self.shift = nn.Parameter(torch.zeros(c))
        self.kept_dtypes = {"scale": kept, "shift": kept}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.before_conv:  # cast back before the conv: the conv's dtype rules
            y = x * channel_view(self.scale, self.rank) + channel_view(self.shift, self.rank)
            return self.conv(y.to(x.dtype))
        y = self.conv(x)
        z = torch.addcmul(
            channel_view(self.shift, self.rank), y, channel_view(self.scale, self.rank)
        )
        return z.to(y.dtype) if self.cast_back else z


@st.composite
def mixed_precision(draw, shape: Shape, cast_back: bool) -> Block:
    kept = draw(st.sampled_from([torch.float32, torch.float64]))
    before = cast_back and draw(st.booleans())
    m = MixedPrecisionScale(shape, kept, cast_back, before)
    where = "scale → conv" if before else "conv → scale"
    return Block(m, f"{where} with the scale in {kept} (cast back: {cast_back})")


INT_OPS = {
    "k * 1": lambda k: k * 1,
    "k + 0": lambda k: k + 0,
    "k - 0": lambda k: k - 0,
    "k // 1": lambda k: k // 1,
    "k * 1.0": lambda k: k * 1.0,
    "k / 1": lambda k: k / 1,
    "k + 0.0": lambda k: k + 0.0,
    "torch.mul(k, 1)": lambda k: torch.mul(k, 1),
    "k * 3 + 1": lambda k: k * 3 + 1,
    "k.float()": lambda k: k.float(),
}


class IntegerChain(nn.Module):
    """``x * chain((x > 0).long())``: integer arithmetic whose no-ops change the dtype
    (``k * 1.0`` and ``k / 1`` are float32, ``k * 1`` stays int64, and type promotion of the
    product with ``x`` follows)."""

    def __init__(self, ops: list[str], conv: nn.Module):
        super().__init__()
        self.ops, self.conv = ops, conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = (x > 0).long()
        for op in self.ops:
            k = INT_OPS[op](k)
        return self.conv(x) * k


@st.composite
def integer_chain(draw, shape: Shape) -> Block:
    ops = draw(st.lists(key_of(INT_OPS), min_size=1, max_size=3))
    conv = CONV[shape.rank](shape.channels, shape.channels, 1)
    return Block(IntegerChain(ops, conv), f"x * ({' → '.join(ops)} of (x > 0).long())")


INT_VIEWS = {
    "+ 1": lambda m, z: z + 1,
    "- 1": lambda m, z: z - 1,
    "* 1": lambda m, z: z * 1,
    "^ sign bit": lambda m, z: z ^ m.sign_bit,
    "& ~sign bit (abs)": lambda m, z: z & m.magnitude_bits,
}
_SAME_SIZE_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16}
_SAME_SIZE_INT |= {torch.float32: torch.int32, torch.float64: torch.int64}


class ViewAsInteger(nn.Module):
    """``(conv(x) · s).view(intN) ∘ op .view(dtype)``: arithmetic on the bits. ``view(dtype)``
    is not a layout op, and an integer ``+ 1`` on bits is not an affine of the values. The
    integer type follows the model's dtype (same element size, so the float64 copy computes
    the same bit operations: each changes a value by at most one ulp, or not at all)."""

    def __init__(self, shape: Shape, op: str, scale_first: bool):
        super().__init__()
        self.op, self.rank, self.scale_first = op, shape.rank, scale_first
        self.conv = CONV[shape.rank](shape.channels, shape.channels, 1)
        self.scale = nn.Parameter(torch.ones(shape.channels))
        self._follow_dtype(torch.float32)

    def _follow_dtype(self, dtype: torch.dtype) -> None:
        self.float_dtype = dtype
        self.int_dtype = _SAME_SIZE_INT[self.float_dtype]
        self.sign_bit = torch.iinfo(self.int_dtype).min
        self.magnitude_bits = torch.iinfo(self.int_dtype).max

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._follow_dtype(self.conv.weight.dtype)
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.scale_first:
            y = y * channel_view(self.scale, self.rank)
        out = INT_VIEWS[self.op](self, y.view(self.int_dtype)).view(self.float_dtype)
        return out if self.scale_first else out * channel_view(self.scale, self.rank)


@st.composite
def view_as_integer(draw, shape: Shape) -> Block:
    op, first = draw(key_of(INT_VIEWS)), draw(st.booleans())
    m = ViewAsInteger(shape, op, first)
    return Block(m, f"view as int, {op}, view back (scale {'before' if first else 'after'})")


DTYPE_KINDS = {
    "mixed_precision": BlockKind(lambda s: mixed_precision(s, True), ranks=(1, 2, 3)),
    "mixed_precision_output": BlockKind(
        lambda s: mixed_precision(s, False), ranks=(1, 2, 3), final=True
    ),
    "integer_chain": BlockKind(integer_chain, ranks=(1, 2, 3)),
    "view_as_integer": BlockKind(view_as_integer, ranks=(1, 2, 3)),
}

# =========================================================================== layouts

LAYOUTS = {
    "BN(Linear over W)": lambda m, x: m.bn(m.width_linear(m.conv(x))),
    "Linear over W(BN)": lambda m, x: m.width_linear(m.bn(m.conv(x))),
    "Linear over W * s[:, None, None]": lambda m, x: (
        m.width_linear(m.conv(x)) * m.scale[:, None, None]
    ),
    "Linear over W * s_W": lambda m, x: m.width_linear(m.conv(x)) * m.width_scale,
    "permute to NHWC, * s, back": lambda m, x: (m.conv(x).permute(0, 2, 3, 1) * m.scale).permute(
        0, 3, 1, 2
    ),
    "transpose(1, -1), * s, back": lambda m, x: (m.conv(x).transpose(1, -1) * m.scale).transpose(
        1, -1
    ),
    "transpose(-1, -2) then * s[:, None, None]": lambda m, x: (
        m.conv(x).transpose(-1, -2) * m.scale[:, None, None]
    ),
    "flatten(2) * s[:, None], view back": lambda m, x: (
        m.conv(x).flatten(2) * m.scale[:, None]
    ).view(x.shape[0], -1, *x.shape[2:]),
    "reshape (N, C·H, W) * s_CH, back": lambda m, x: (
        m.conv(x).reshape(x.shape[0], -1, x.shape[-1]) * m.channel_rows[:, None]
    ).reshape(x.shape[0], -1, *x.shape[2:]),
    "unsqueeze(2) * s[:, None, None, None], squeeze": lambda m, x: (
        m.conv(x).unsqueeze(2) * m.scale[:, None, None, None]
    ).squeeze(2),
    "conv(x.contiguous(channels_last)) * s": lambda m, x: (
        m.conv(x.contiguous(memory_format=torch.channels_last)) * m.scale[:, None, None]
    ),
}


class Layout(nn.Module):
    """A conv to ``C'`` channels (``C'`` may equal the width, so that a fold along the wrong
    axis still fits the shapes), then per-channel constants met through permutes / views, or a
    linear over the width axis next to a BN over the channels."""

    def __init__(self, shape: Shape, layout: str, out_channels: int):
        super().__init__()
        c, (h, w) = shape.channels, shape.spatial
        self.layout = layout
        self.conv = nn.Conv2d(c, out_channels, 3, padding=1)
        self.width_linear = nn.Linear(w, w)
        self.bn = nn.BatchNorm2d(out_channels)
        self.scale = nn.Parameter(torch.ones(out_channels))
        self.width_scale = nn.Parameter(torch.ones(w))
        self.channel_rows = nn.Parameter(torch.ones(out_channels * h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return LAYOUTS[self.layout](self, x)


@st.composite
def layout(draw, shape: Shape) -> Block:
    name = draw(key_of(LAYOUTS))
    out_channels = draw(st.sampled_from([shape.channels, shape.spatial[-1]]))
    return Block(Layout(shape, name, out_channels), f"layout: {name} ({out_channels} channels)")


LAYOUT_KINDS = {"layout": BlockKind(layout, ranks=(2,))}
