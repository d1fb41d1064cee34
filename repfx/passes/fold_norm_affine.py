"""fold_norm_affine (opt-in: ``repfx.fold(model, fold_norm_affine=True)``): a norm's own
``γ, β`` into the linears (or convs) that read its output, leaving an affine-free norm.

For every consumer ``W·(γ ⊙ n + β) + b = (W ⊙_in γ)·n + (W·β + b)`` — the "fuse layer norms"
step that rotation-based quantization (QuaRot, SpinQuant) writes by hand per model, after which
the norm is a pure normalisation. Made only when *every* reader of the norm is a conv / linear
that can take it on its input side (``repfx.passes._absorb.input_side``: no zero padding
meets ``β``, nothing shared); a bias-free linear gains a bias when ``β`` is given.

Not part of the default pipeline: it removes no op (the norm stays, and the linears grow a
bias), so it cannot serve the pipeline's termination measure; it runs once, after the other
passes reach their fixpoint, through the same commit point.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from ..algebra import ChannelAffine
from ..ir.graph import value_users, where
from ..ir.match import Fail
from ..ir.ops import AffineOp, LinearOp, NormOp, norm_op
from ._absorb import fold_into_input, input_side
from .base import FoldContext, NodeRule, Region
from .rewrite import clear_slot


@dataclass
class _NormAffine:
    node: fx.Node  # the norm
    norm: NormOp
    affine: ChannelAffine  # its own γ, β
    consumers: list[LinearOp | Fail]  # each value reader as a conv / linear that can take it


class FoldNormAffine(NodeRule):
    name = "fold_norm_affine"
    words = "norm affine moved"  # one fold, in a report
    runs_once = True  # see repfx.passes.pipeline.run_to_fixpoint

    def match(self, ctx: FoldContext, node: fx.Node) -> _NormAffine | None:
        """A norm with its own ``γ`` or ``β`` whose output is read, each reader viewed as a conv
        / linear that takes ``γ, β`` on its input side (``_absorb.input_side``), or why not."""
        norm = norm_op(ctx.gm, node, ctx.consts)
        if norm is None or (norm.weight is None and norm.bias is None) or not value_users(node):
            return None
        affine = ChannelAffine.of(norm.weight, norm.bias, norm.channels)
        op = AffineOp(node, "norm_affine", node, affine, norm.channel_axis, norm.dtype)
        consumers = [input_side(ctx, op, user, node) for user in value_users(node)]
        return _NormAffine(node, norm, affine, consumers)

    def check(self, ctx: FoldContext, candidate: _NormAffine) -> Fail | None:
        """The norm is not shared, and every reader can take ``γ, β``."""
        if (shared := ctx.shared_reason(candidate.node, candidate.norm.kind)) is not None:
            return shared
        return next((lin for lin in candidate.consumers if isinstance(lin, Fail)), None)

    def region(self, ctx: FoldContext, candidate: _NormAffine) -> Region:
        node = candidate.node
        inputs = [n for n in node.all_input_nodes if not ctx.consts.is_constant(n)]
        return Region([lin.node for lin in candidate.consumers], inputs)

    def rewrite(self, ctx: FoldContext, candidate: _NormAffine) -> tuple[list[fx.Node], str]:
        norm, consumers = candidate.norm, candidate.consumers
        for lin in consumers:
            fold_into_input(ctx, lin, candidate.affine)
        clear_slot(ctx.gm, norm.weight_slot)
        if norm.bias_slot is not None:
            clear_slot(ctx.gm, norm.bias_slot)
        into = ", ".join(f"{lin.kind} {where(lin.node)}" for lin in consumers)
        return [lin.node for lin in consumers], f"{norm.kind} affine into {into}"
