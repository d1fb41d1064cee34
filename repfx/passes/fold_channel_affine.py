"""fold_channel_affine: per-channel affines (LayerScale, ``x * g``, ``x + b``, ``addcmul``,
depthwise 1×1 convs, and — as producers — batch norms left by ``fold_bn``) into their
neighbours.

For ``a(x) = s ⊙ x + t`` (see ``repfx.passes._absorb``): into the conv / linear before it
(``W' = s ⊙_out W``, ``b' = s·b + t``), into a norm's affine (``γ' = s·γ``, ``β' = s·β + t``),
composed with an affine before it (``s₂s₁ ⊙ x + (s₂t₁ + t₂)``), or into a conv / linear after
it where no zero padding meets ``t``.
"""

from __future__ import annotations

from torch import fx

from ..ir.ops import AffineOp, affine_op
from ._absorb import AbsorbRule
from .base import FoldContext


class FoldChannelAffine(AbsorbRule):
    name = "fold_channel_affine"
    words = "per-channel affine folded"  # one fold, in a report

    def match(self, ctx: FoldContext, node: fx.Node) -> AffineOp | None:
        """A per-channel affine that is not a batch norm (``fold_bn``'s)."""
        op = affine_op(ctx.gm, node, ctx.consts)
        return op if op is not None and op.kind != "batch_norm" else None

    # check (no hooks) and plan (the neighbour that takes it): AbsorbRule, repfx.passes._absorb
