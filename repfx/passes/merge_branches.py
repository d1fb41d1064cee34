"""merge_branches: parallel conv branches of one tensor, summed, become one conv.

A join ``u ± α·v`` where each operand is, walking back through single-use ops, a conv of the
same tensor ``x`` followed by per-channel affines (BN folded or not), or per-channel affines of
``x`` alone (an identity or BN branch), is linear in ``x``:

    Σᵢ cᵢ·(sᵢ ⊙ (Wᵢ ∗ x + bᵢ) + tᵢ) = W ∗ x + b,

with ``W`` the sum of the branch kernels (each scaled by its affine, zero-padded around its
centre to the largest kernel, regrouped to the gcd of the groups; an identity or affine branch
is a delta kernel) and ``b`` the sum of the biases. Exact when the branches read aligned
windows: the same stride, the same dilation wherever a kernel is wider than 1, the same centre
offset ``padding − dilation·(k − 1)/2``, and zero padding. RepVGG, ACNet, MobileOne and
RepMixer-style blocks collapse this way; sums of more than two branches collapse pairwise,
inside out, over the fixpoint.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from torch import fx, nn

from ..algebra import (
    ChannelAffine,
    ConvKernel,
    affine_as_kernel,
    compose_pointwise_then_conv,
    concat_kernels,
    fold_affine_into_conv_output,
    sum_kernels,
    undilate,
)
from ..ir.graph import (
    RANK_KEY,
    has_hooks,
    module_of,
    op_name,
    rank_of,
    shape_users,
    value_users,
    where,
)
from ..ir.match import Fail
from ..ir.ops import AffineOp, LinearOp, affine_op, avg_pool_op, linear_op, merge_axes
from ..ir.regions import Regions
from ..report.fold_report import Skipped
from ._common import composition_reason, has_bias, join_operands, kernel_of
from .base import FoldContext, NodeRule, PassResult, PipelineState, Region, apply_rule
from .rewrite import new_conv, replace_join

_MERGEABLE = ("conv", "avg_pool", "linear")


@dataclass
class _Branch:
    root: fx.Node
    conv: LinearOp | None  # the branch's conv, if it has one
    affine: ChannelAffine  # applied after the conv (or to the root)
    axis: int | Fail | None  # the affine's channel axis; a Fail when its ops disagree
    ops: list[fx.Node]
    prefix: list[LinearOp] = field(default_factory=list)  # pointwise convs before the conv
    crop: tuple[int, ...] = ()  # symmetric crop of the root before the convs, per spatial dim

    @property
    def in_channels(self) -> int:
        return (self.prefix[-1] if self.prefix else self.conv).in_channels


def _pointwise_prefix(ctx: FoldContext, conv: LinearOp) -> list[LinearOp]:
    """Pointwise convs feeding only ``conv`` (and each other) that compose into it exactly:
    DBB's 1×1 → BN → K×K and 1×1 → BN → avg-pool branches. A bias may precede zero padding
    only where the padding is the pointwise conv's own (its border is the bias)."""
    prefix: list[LinearOp] = []
    if conv.kind != "linear" and conv.geometry is None:
        return prefix  # no symmetric explicit padding: the branch is refused by _check
    head, padded = conv, conv.kind != "linear" and any(conv.geometry.padding)
    if padded and conv.geometry.padding_mode != "zeros":
        return prefix
    while value_users(head.input) == [head.node]:
        first = linear_op(ctx.gm, head.input, ctx.consts)
        if first is None or first.kind != "conv" or composition_reason(first, head) is not None:
            break
        if padded and has_bias(first):  # padding so far would meet this conv's bias
            break
        prefix.append(first)
        head, padded = first, padded or any(first.geometry.padding)
    return prefix


def _branch(
    ctx: FoldContext,
    start: fx.Node,
    join: fx.Node,
    *,
    past_other_users: bool = False,
    convs_first: bool = False,
) -> _Branch:
    """Walk back from ``start`` through single-use affines and at most one conv
    (``past_other_users``: through ops whose result is also used elsewhere too; ``convs_first``:
    a conv that is also a per-channel affine, like a depthwise 1×1, counts as the conv)."""
    affine, axis, ops = ChannelAffine.of(None, None, 1), None, []
    node, consumer = start, join
    while past_other_users or value_users(node) == [consumer]:
        op = _affine_at(ctx, node, convs_first=convs_first)
        if op is None:
            affines = _Branch(node, None, affine, axis, ops)
            conv = _mergeable_op(ctx, node)
            if conv is None:
                return affines
            return _through_conv(ctx, affines, conv, past_other_users=past_other_users)
        if not _composes(affine, axis, op):
            break  # another axis or channel count: the branch ends here (not a candidate)
        affine, axis = op.affine.then(affine), merge_axes(axis, op.axis)
        ops.append(node)
        node, consumer = op.input, node
    return _Branch(node, None, affine, axis, ops)


def _affine_at(ctx: FoldContext, node: fx.Node, *, convs_first: bool) -> AffineOp | None:
    """The per-channel affine ``node`` computes, if any (``convs_first``: none for a conv, even
    one that is also a per-channel affine)."""
    if convs_first and linear_op(ctx.gm, node, ctx.consts) is not None:
        return None
    return affine_op(ctx.gm, node, ctx.consts)


def _mergeable_op(ctx: FoldContext, node: fx.Node) -> LinearOp | None:
    """The conv, average pool or linear ``node`` computes, if it is one a merge can absorb."""
    lin = linear_op(ctx.gm, node, ctx.consts) or avg_pool_op(ctx.gm, node)
    return lin if lin is not None and lin.kind in _MERGEABLE else None


def _through_conv(
    ctx: FoldContext, affines: _Branch, conv: LinearOp, *, past_other_users: bool
) -> _Branch:
    """``affines`` (the affines walked so far, rooted at ``conv``'s node) continued through
    ``conv``, then (unless ``past_other_users``) through the pointwise convs composing into it
    and the symmetric crops of its input."""
    if past_other_users:
        ops = [*affines.ops, affines.root]
        return replace(affines, root=conv.input, conv=conv, ops=ops, crop=(0,) * conv.spatial_dims)
    prefix = _pointwise_prefix(ctx, conv)
    root, crop, crops = _uncropped((prefix[-1] if prefix else conv).input, conv.spatial_dims)
    ops = [*affines.ops, affines.root, *(p.node for p in prefix), *crops]
    return replace(affines, root=root, conv=conv, ops=ops, prefix=prefix, crop=crop)


def _uncropped(node: fx.Node, dims: int) -> tuple[fx.Node, tuple[int, ...], list[fx.Node]]:
    """Walk back from ``node`` through symmetric crops of its spatial dims: (the uncropped
    tensor, the total crop per spatial dim, the crop nodes walked through)."""
    crop, crops = (0,) * dims, []
    while (found := _crop(node, dims)) is not None:
        crops.append(node)
        node, crop = found[0], tuple(a + b for a, b in zip(crop, found[1], strict=True))
    return node, crop, crops


def _composes(affine: ChannelAffine, axis: int | Fail | None, op: AffineOp) -> bool:
    """Can ``op`` be composed with the affine walked so far (one axis, one channel count)?"""
    same_axis = not isinstance(axis, Fail) and not isinstance(merge_axes(axis, op.axis), Fail)
    return same_axis and len({affine.channels, op.channels} - {1}) <= 1


def _crop(node: fx.Node, dims: int) -> tuple[fx.Node, tuple[int, ...]] | None:
    """``x[:, :, c:-c, :]``-style symmetric crops of the spatial dims (ACNet), read by one op:
    ``(x, crop per spatial dim)``. A crop before a conv is that conv with less padding."""
    if node.op != "call_function" or node.target is not operator.getitem or len(node.users) != 1:
        return None
    source, index = node.args
    full = _full_slices(source, index, dims)
    if full is None:
        return None
    if any(i != slice(None) for i in full[:2]):
        return None
    crops = [_symmetric_crop(i) for i in full[2:]]
    if None in crops:
        return None
    return source, tuple(crops)


def _full_slices(source: object, index: object, dims: int) -> list[slice] | None:
    """``index`` as one step-less slice per dim of ``source`` (the dims it leaves out: ``:``),
    if ``source`` is a tensor with ``dims`` spatial dims and ``index`` is only such slices."""
    rank = rank_of(source)
    if not isinstance(source, fx.Node) or not isinstance(index, tuple) or rank != dims + 2:
        return None
    if len(index) > rank or not all(isinstance(i, slice) and i.step is None for i in index):
        return None
    return [*index, *[slice(None)] * (rank - len(index))]


def _symmetric_crop(cut: slice) -> int | None:
    """How much ``cut`` crops from each side of its dim: ``0`` for ``:``, ``c`` for ``c:-c``;
    ``None`` for any other slice."""
    if cut == slice(None):
        return 0
    if isinstance(cut.start, int) and cut.start > 0 and cut.stop == -cut.start:
        return cut.start
    return None


def _may_sit_in_a_merge(ctx: FoldContext, node: fx.Node) -> bool:
    """Could ``node`` be part of a merged region (constants count: they are not branch ops)?"""
    if not node.op.startswith("call_") or ctx.consts.is_constant(node):
        return True
    return _mergeable_op(ctx, node) is not None or affine_op(ctx.gm, node, ctx.consts) is not None


def _conv_kernel(branch: _Branch) -> ConvKernel:
    """The branch as one kernel: its conv with the affine after it folded in, composed with
    the pointwise convs before it, its padding less the crop of its input."""
    conv = branch.conv
    plain = kernel_of(conv)
    affine = ChannelAffine(
        branch.affine.scale.expand(conv.out_channels), branch.affine.shift.expand(conv.out_channels)
    )
    weight, bias = fold_affine_into_conv_output(plain.weight, plain.bias, affine)
    kernel = replace(plain, weight=weight, bias=bias)
    if conv.kind == "linear":
        return kernel
    for first in branch.prefix:
        kernel = compose_pointwise_then_conv(kernel_of(first), kernel)
    if any(branch.crop):  # reading a cropped input = padding less
        padding = tuple(p - c for p, c in zip(kernel.padding, branch.crop, strict=True))
        kernel = replace(kernel, padding=padding)
    return kernel


def _check(branches: list[_Branch], summed: bool) -> Fail | None:
    """Why the branches cannot be summed (``summed``) or concatenated into one conv; checked in
    this order: the affines' axis, a mix of linears and convs, the convs' padding and spatial
    dims, each conv branch against the first, an identity branch's channel counts."""
    conv_branches = [b for b in branches if b.conv is not None]
    reference = conv_branches[0].conv
    if (fail := _affine_axis_reason(branches, reference)) is not None:
        return fail
    if len({b.conv.kind == "linear" for b in conv_branches}) > 1:
        return Fail("branches mix linear and conv ops")
    if (fail := _conv_geometry_reason([b.conv for b in conv_branches])) is not None:
        return fail
    if (fail := _conv_branches_reason(conv_branches, summed)) is not None:
        return fail
    identity = any(b.conv is None for b in branches)
    if summed and identity and conv_branches[0].in_channels != reference.out_channels:
        return Fail("an identity branch needs as many input as output channels")
    return None


def _affine_axis_reason(branches: list[_Branch], reference: LinearOp) -> Fail | None:
    """Why a branch's affine cannot be folded into the merged conv's output channels."""
    for b in branches:
        if isinstance(b.axis, Fail) or b.axis not in (None, reference.channel_axis):
            return Fail("a branch's affine does not act on the conv channels")
    return None


def _conv_geometry_reason(convs: list[LinearOp]) -> Fail | None:
    """Why the branch convs' geometries do not fit one conv: padding that is not explicit and
    symmetric, or not zeros; spatial dims unlike the first conv's."""
    reference = convs[0]
    for conv in convs:
        g = conv.geometry
        if g is None and conv.kind != "linear":
            return Fail("a branch conv has no explicit symmetric padding")
        if g is not None and g.padding_mode != "zeros" and any(g.padding):
            return Fail(f"a branch conv pads with {g.padding_mode!r}")
        if conv.spatial_dims != reference.spatial_dims:
            return Fail("branch convs have different spatial dims")
    return None


def _conv_branches_reason(conv_branches: list[_Branch], summed: bool) -> Fail | None:
    """Why a conv branch cannot join the first one (``summed``: in a sum, else in a
    concatenation): it pads a crop, or differs in channel counts, groups or dtype."""
    first = conv_branches[0]
    for b in conv_branches:
        if _pads_a_crop(b):
            return Fail("a branch conv zero-pads a cropped input (the cropped border is not zeros)")
        if not _same_channel_counts(b, first, summed):
            return Fail("branch convs have different channel counts")
        conv = b.conv
        if not summed and any(op.groups != 1 for op in [conv, *b.prefix]):
            return Fail("concatenating grouped convs would make them dense")
        if conv.weight.dtype != first.conv.weight.dtype:
            return Fail("branch convs have different dtypes")
    return None


def _same_channel_counts(branch: _Branch, first: _Branch, summed: bool) -> bool:
    """Does ``branch`` read as many channels as ``first`` (and, ``summed``, write as many)?"""
    same_out = not summed or branch.conv.out_channels == first.conv.out_channels
    return branch.in_channels == first.in_channels and same_out


def _pads_a_crop(branch: _Branch) -> bool:
    """Does an op reading the branch's crop pad the cropped dims? Then the padding holds zeros
    where the uncropped input has values: not the same conv with less padding."""
    reader = branch.prefix[-1] if branch.prefix else branch.conv
    if reader.geometry is None:
        return any(branch.crop)
    return any(c > 0 and p > 0 for c, p in zip(branch.crop, reader.geometry.padding, strict=False))


def _alignment_reason(kernels: list[ConvKernel]) -> Fail | None:
    """Why the branch kernels do not read aligned windows: another stride, another centre, or
    sizes of another parity (no common centre)."""
    first = kernels[0]
    for k in kernels[1:]:
        if k.stride != first.stride:
            return Fail("branches have different strides")
        if k.centre_offset != first.centre_offset:
            return Fail("branches' kernels are not centred on the same input position")
    spans = [undilate(k).kernel_size for k in kernels]
    if any(len({s[dim] % 2 for s in spans}) > 1 for dim in range(len(spans[0]))):
        return Fail("kernel sizes differ by an odd amount: no common centre")
    return None


def _base_path(join: fx.Node) -> str:
    """``<block>.merged_conv``, with ``<block>`` the module whose forward made the join."""
    stack = join.meta.get("nn_module_stack")
    parent = next(reversed(stack.values()))[0] if stack else ""
    return f"{parent}.merged_conv" if parent else "merged_conv"


def _free_path(gm: fx.GraphModule, base: str, new: fx.Node) -> str:
    """``base`` or ``base_N``; a module no node calls any more (such as an earlier merge
    inside this one) does not block its name."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module" and n is not new}
    path, i = base, 1
    while path in called or (path not in called and _is_other_attribute(gm, path)):
        path, i = f"{base}_{i}", i + 1
    return path


def _is_other_attribute(gm: fx.GraphModule, path: str) -> bool:
    """``path`` names something that is not a merged conv left over from an earlier merge."""
    owner, _, name = path.rpartition(".")
    try:
        parent = gm.get_submodule(owner) if owner else gm
    except AttributeError:
        return False
    return hasattr(parent, name) and not isinstance(getattr(parent, name), nn.modules.conv._ConvNd)


def _shares_an_intermediate(ctx: FoldContext, join: fx.Node, u: fx.Node, v: fx.Node) -> bool:
    """Would the branches of ``join = u ± v`` meet at one root, with a conv, if they could walk
    through ops whose result is also used outside them? (Then that use is why they do not
    merge.)"""
    wide_left = _branch(ctx, u, join, past_other_users=True)
    wide_right = _branch(ctx, v, join, past_other_users=True)
    return wide_left.root is wide_right.root and bool(wide_left.conv or wide_right.conv)


def _is_other_fork_join(ctx: FoldContext, node: fx.Node) -> bool:
    """A sum whose two branches do not start at one root, other than because an intermediate
    result is used outside them: a fork-join region of another shape (a residual
    ``x + relu(conv(x))``), not a merge candidate, that :meth:`MergeBranches._explain` may
    explain."""
    operands = join_operands(node)
    if operands is None:
        return False
    u, v, _ = operands
    if _branch(ctx, u, node).root is _branch(ctx, v, node).root:
        return False
    return not _shares_an_intermediate(ctx, node, u, v)


@dataclass
class _Merge:
    """``node`` joins ``branches`` of one root: their sum (``summed``) or their concatenation,
    one conv of kernel ``combine(branch kernels)``."""

    node: fx.Node  # the join
    branches: list[_Branch]
    combine: Callable[[list[ConvKernel]], ConvKernel]
    summed: bool = True

    @property
    def conv(self) -> LinearOp:
        """The first branch conv."""
        return next(b.conv for b in self.branches if b.conv is not None)

    @property
    def ops(self) -> list[fx.Node]:
        """The branches' ops, which the merged conv replaces with the join."""
        return [n for b in self.branches for n in b.ops]

    @cached_property
    def kernels(self) -> list[ConvKernel]:
        return _branch_kernels(self.branches)

    @cached_property
    def combined(self) -> ConvKernel:
        return self.combine(self.kernels)


class MergeBranches(NodeRule):
    name = "merge_branches"
    words = "parallel branches merged"  # one fold, in a report

    def __call__(self, gm: fx.GraphModule, state: PipelineState | None = None) -> PassResult:
        ctx = FoldContext(gm, state)
        result = apply_rule(gm, self.visit, ctx)
        if not result.modified:  # only the final, unchanged round's skips are reported
            joins = [n for n in gm.graph.nodes if _is_other_fork_join(ctx, n)]
            result.skipped += self._explain(ctx, joins)
        return result

    def match(self, ctx: FoldContext, node: fx.Node) -> _Merge | Fail | None:
        """A sum ``u ± α·v`` or a concatenation of branches of one root, one with a conv."""
        if (operands := join_operands(node)) is not None:
            return self._sum(ctx, node, *operands)
        if (tensors := _concat_operands(node)) is not None:
            return self._concat(ctx, node, tensors)
        return None

    def _sum(
        self, ctx: FoldContext, join: fx.Node, u: fx.Node, v: fx.Node, weight: float
    ) -> _Merge | Fail | None:
        left, right = _branch(ctx, u, join), _branch(ctx, v, join)
        if left.root is not right.root:
            if _shares_an_intermediate(ctx, join, u, v):
                return Fail("a branch's intermediate result is also used outside the branches")
            return None  # another fork-join (x + relu(conv(x))): see _is_other_fork_join
        if left.conv is None and right.conv is None:
            return None  # affines only: fold_affine_mixer's job
        return _Merge(join, [left, right], lambda ks: sum_kernels([(1.0, ks[0]), (weight, ks[1])]))

    def _concat(self, ctx: FoldContext, join: fx.Node, operands: list[fx.Node]) -> _Merge | None:
        branches = [_branch(ctx, u, join, convs_first=True) for u in operands]
        if len({id(b.root) for b in branches}) > 1 or all(b.conv is None for b in branches):
            return None
        return _Merge(join, branches, concat_kernels, summed=False)

    def check(self, ctx: FoldContext, merge: _Merge) -> Fail | None:
        """The branches fit one conv (see :func:`_check`), may be replaced, read aligned
        windows, and leave some padding."""
        if not merge.summed and _concat_axis(merge.node) != merge.conv.channel_axis:
            return Fail("concatenation is not along the channels")
        fail = _check(merge.branches, merge.summed)
        if fail is None:
            fail = _region_reason(ctx.gm, merge.branches, merge.summed)
        if fail is not None:
            return fail
        if (fail := _alignment_reason(merge.kernels)) is not None:
            return fail
        if any(p < 0 for p in merge.combined.padding):
            return Fail("every branch crops: no padding is left")
        return None

    def region(self, ctx: FoldContext, merge: _Merge) -> Region:
        return Region([merge.node], [merge.branches[0].root])

    def rewrite(self, ctx: FoldContext, merge: _Merge) -> tuple[list[fx.Node], str]:
        """The branches' ops and the join swapped for one conv, named after the block that
        made the join."""
        join, region, base = merge.node, merge.ops, _base_path(merge.node)
        merged = new_conv(merge.combined, merge.conv.weight.dtype)
        with ctx.gm.graph.inserting_before(join):
            new = ctx.gm.graph.create_node("call_module", base, (merge.branches[0].root,))
        new.meta.update(join.meta)
        new.meta[RANK_KEY] = join.meta.get(RANK_KEY)
        replace_join(join, new, region)
        new.target = _free_path(ctx.gm, base, new)  # names freed by the branches count
        ctx.gm.add_submodule(new.target, merged)
        ops = f"{len(region)} op{'s' if len(region) != 1 else ''}"
        return [new], f"merged {ops} into one conv {new.target}"

    def _explain(self, ctx: FoldContext, joins: list[fx.Node]) -> list[Skipped]:
        """Why fork-join regions that are not sums of conv branches were left alone (one
        dominator tree for all of them)."""
        if not joins:
            return []
        regions, explained = Regions(ctx.gm.graph), []
        for join in joins:
            blocker = regions.first(join, lambda n: not _may_sit_in_a_merge(ctx, n))
            if blocker is not None:
                reason = f"a branch contains a non-affine op ({op_name(ctx.gm, blocker)})"
                explained.append(Skipped(self.name, where(join), reason))
        return explained


def _region_reason(gm: fx.GraphModule, branches: list[_Branch], summed: bool) -> Fail | None:
    """Why the branches' ops may not be replaced: a shape read elsewhere (a concatenation's
    branches are only checked for that), or a hooked module."""
    region = [n for b in branches for n in b.ops]
    if not summed and any(shape_users(n) for n in region):
        return Fail("a branch's shape is read elsewhere")
    hooked = [n for n in region if n.op == "call_module"]
    if any(has_hooks(module_of(gm, n)) for n in hooked):
        return Fail("a branch module has hooks")
    return None


def _branch_kernels(branches: list[_Branch]) -> list[ConvKernel]:
    """Each branch as a conv kernel: its conv's (affines folded in), or a delta kernel of its
    affine over the conv branches' input channels."""
    first = next(b for b in branches if b.conv is not None)
    return [
        _conv_kernel(b)
        if b.conv is not None
        else affine_as_kernel(b.affine, first.in_channels, first.conv.spatial_dims)
        for b in branches
    ]


_CATS = {torch.cat, torch.concat, torch.concatenate}


def _concat_operands(node: fx.Node) -> list[fx.Node] | None:
    if node.op != "call_function" or node.target not in _CATS or not node.args:
        return None
    tensors = node.args[0]
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
        return None
    return list(tensors)


def _concat_axis(node: fx.Node) -> int | None:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    rank = rank_of(node)
    if not isinstance(dim, int) or (dim >= 0 and rank is None):
        return None
    return dim - rank if dim >= 0 else dim
