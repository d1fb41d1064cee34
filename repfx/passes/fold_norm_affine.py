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

from torch import fx

from ..algebra import ChannelAffine
from ..ir.graph import value_users, where
from ..ir.match import Fail
from ..ir.ops import AffineOp, norm_op
from ..report.fold_report import Folded, Skipped
from ._absorb import fold_into_input, input_side
from .base import FoldContext, NodeRule
from .rewrite import clear_slot


class FoldNormAffine(NodeRule):
    name = "fold_norm_affine"
    words = "norm affine moved"  # one fold, in a report
    runs_once = True  # see repfx.passes.base.run_to_fixpoint

    def _visit(self, ctx: FoldContext, node: fx.Node) -> Folded | Skipped | None:
        norm = norm_op(ctx.gm, node, ctx.consts)
        if norm is None or (norm.weight is None and norm.bias is None):
            return None
        location = where(node)
        if (shared := ctx.shared_reason(node, norm.kind)) is not None:
            return Skipped(self.name, location, shared.reason)
        affine = ChannelAffine.of(norm.weight, norm.bias, norm.channels)
        op = AffineOp(node, "norm_affine", node, affine, norm.channel_axis, norm.dtype)
        consumers = []
        for user in value_users(node):
            lin = input_side(ctx, op, user, node)
            if isinstance(lin, Fail):
                return Skipped(self.name, location, lin.reason)
            consumers.append(lin)
        if not consumers:
            return None

        def rewrite() -> tuple[list[fx.Node], str]:
            for lin in consumers:
                fold_into_input(ctx, lin, affine)
            clear_slot(ctx.gm, norm.weight_slot)
            if norm.bias_slot is not None:
                clear_slot(ctx.gm, norm.bias_slot)
            into = ", ".join(f"{lin.kind} {where(lin.node)}" for lin in consumers)
            return [lin.node for lin in consumers], f"{norm.kind} affine into {into}"

        inputs = [n for n in node.all_input_nodes if not ctx.consts.is_constant(n)]
        return ctx.commit(self.name, location, [lin.node for lin in consumers], inputs, rewrite)
