"""fold_bn: eval-mode batch norm into the conv / linear next to it.

In eval mode ``BN(x) = s ⊙ x + t`` with ``s = γ / sqrt(var + eps)``, ``t = β − mean·s``
(``repfx.algebra.batch_norm_affine``), so BN is absorbed like any per-channel affine
(``repfx.passes._absorb``): into the conv / linear / transposed conv before it
(``W' = s ⊙_out W``, ``b' = s·b + t``), or into the conv / linear after it when that conv reads
no zero padding (``W' = W ⊙_in s``, ``b' = b + W∗t``). A BN with no such neighbour stays, and is
seen as a per-channel affine by ``fold_channel_affine``. Training-mode BN is never folded.
"""

from __future__ import annotations

from torch import fx

from ..ir.match import Fail
from ..ir.ops import AffineOp, affine_op, batch_norm_reason
from ._absorb import AbsorbRule
from .base import FoldContext


class FoldBatchNorm(AbsorbRule):
    name = "fold_bn"
    words = "batch norm folded"  # one fold, in a report

    def match(self, ctx: FoldContext, node: fx.Node) -> AffineOp | Fail | None:
        """``node`` as a batch norm to fold; why not, for a batch norm that is no affine."""
        if (fail := batch_norm_reason(ctx.gm, node, ctx.consts)) is not None:
            return fail
        op = affine_op(ctx.gm, node, ctx.consts)
        return op if op is not None and op.kind == "batch_norm" else None

    # check (no hooks) and plan (the neighbour that takes it): AbsorbRule, repfx.passes._absorb
