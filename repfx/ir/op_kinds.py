"""What a graph computes, counted by op kind — for reports and structural tests."""

from __future__ import annotations

from collections import Counter

from torch import fx

from .graph import ConstantFolder
from .norms import NORMS
from .ops import affine_op, identity_input, is_batch_norm, linear_op, norm_op

OP_KINDS = (
    "conv",
    "conv_transpose",
    "linear",
    "batch_norm",
    *(norm.kind for norm in NORMS),
    "channel_affine",
    "no_op",
)


def op_kind(gm: fx.GraphModule, node: fx.Node, consts: ConstantFolder) -> str | None:
    """``conv`` / ``conv_transpose`` / ``linear`` / ``batch_norm`` / a norm's kind
    (``layer_norm``, … from :data:`repfx.ir.norms.NORMS`) / ``channel_affine`` / ``no_op``, or
    ``None`` for anything else."""
    if not node.op.startswith("call_") or consts.is_constant(node):
        return None
    if (lin := linear_op(gm, node, consts)) is not None:
        return lin.kind
    if (norm := norm_op(gm, node, consts)) is not None:
        return norm.kind
    if is_batch_norm(gm, node):
        return "batch_norm"
    if affine_op(gm, node, consts) is not None:
        return "channel_affine"
    if identity_input(gm, node) is not None:
        return "no_op"
    return None


def op_counts(gm: fx.GraphModule) -> Counter[str]:
    consts = ConstantFolder(gm)
    kinds = (op_kind(gm, n, consts) for n in gm.graph.nodes)
    return Counter(k for k in kinds if k is not None)
