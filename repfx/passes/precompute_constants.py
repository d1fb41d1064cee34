"""precompute_constants: compute once, at fold time, what depends on parameters only.

A value that deterministic torch ops compute from module tensors alone is the same on every run:
weight standardisation (``F.batch_norm(w.reshape(1, O, -1), None, None, training=True)`` on a
conv's own weight, as timm's ``StdConv2d`` / ``ScaledStdConv2d`` do every forward), a gain times
a weight, a masked kernel. Storing the result and reading it instead is exact: the same ops run
once, in the same dtype, on the same device. ``repfx.ir.graph.ConstantFolder`` decides what is
constant (no random op, no write, no input).

The frontier of such a sub-graph — a constant value read by an op that is not constant — becomes
a stored tensor, and the ops before it die. Only what computes something is stored (a chain of
views such as ``gamma[:, None, None]`` costs nothing at run time and is left to the passes that
read through it), and only what does not grow: the result holds at most as many elements as the
module tensors it is computed from (an ``expand`` or an upsampled table stays computed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ..ir.match import Fail
from .base import FoldContext, NodeRule, Region
from .rewrite import add_constant, replace_node

# Methods and functions that only re-view (or copy) their input: no computation to save.
_VIEWS = {
    "getitem", "view", "reshape", "reshape_as", "view_as", "unsqueeze", "squeeze", "expand",
    "expand_as", "permute", "transpose", "t", "flatten", "unflatten", "contiguous", "detach",
    "clone", "narrow", "select", "movedim", "getattr",
}  # fmt: skip


@dataclass
class _Frontier:
    node: fx.Node  # a constant value read by an op that is not constant
    value: torch.Tensor  # its value
    sources: dict[str, list[fx.Node]]  # the ops computing it, the attributes they read


class PrecomputeConstants(NodeRule):
    name = "precompute_constants"
    words = "computed once from parameters"  # one fold, in a report

    def match(self, ctx: FoldContext, node: fx.Node) -> _Frontier | None:
        """A computed constant read by an op that is not constant (views alone do not count)."""
        if node.op not in ("call_function", "call_method") or not _read_by_computed(ctx, node):
            return None
        value = ctx.consts.value(node)
        if value is None:
            return None
        sources = _constant_sources(ctx, node)
        if not any(_computes(n) for n in sources["ops"]):
            return None
        return _Frontier(node, value, sources)

    def check(self, ctx: FoldContext, frontier: _Frontier) -> Fail | None:
        read = sum(ctx.consts.value(n).numel() for n in frontier.sources["attrs"])
        if frontier.value.numel() > read:
            return Fail(
                "the precomputed value would be larger than the parameters it is computed from"
            )
        return None

    def region(self, ctx: FoldContext, frontier: _Frontier) -> Region:
        return Region([frontier.node], [])

    def rewrite(self, ctx: FoldContext, frontier: _Frontier) -> tuple[list[fx.Node], str]:
        node, ops = frontier.node, len(frontier.sources["ops"])
        stored = add_constant(ctx.gm, f"{node.name}_precomputed", frontier.value.detach(), node)
        replace_node(node, stored)
        return [stored], f"precomputed ({ops} ops on parameters only)"


def _read_by_computed(ctx: FoldContext, node: fx.Node) -> bool:
    """Is ``node`` read by something that is not constant (the frontier of a constant part)?"""
    return any(user.op == "output" or not ctx.consts.is_constant(user) for user in node.users)


def _constant_sources(ctx: FoldContext, node: fx.Node) -> dict[str, list[fx.Node]]:
    """The ops of the constant sub-graph ending at ``node`` and the attributes it reads."""
    ops, attrs, seen, stack = [], [], set(), [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "get_attr":
            attrs.append(current)
        else:
            ops.append(current)
            stack.extend(current.all_input_nodes)
    return {"ops": ops, "attrs": attrs}


def _computes(node: fx.Node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name not in _VIEWS
