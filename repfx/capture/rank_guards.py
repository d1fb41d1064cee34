"""Rank guards: the folded module checks, on each call, the input ranks its folds assumed.

A conv, a BatchNormNd or a pool reads axis 1 as the channels of a *batch* (rank N + 2); torch
also accepts an unbatched input (rank N + 1), on which axis 1 is a spatial axis. A fold that
moved a BN or a per-channel scale into the conv is exact on batches only: on an unbatched input
the original normalises or scales another axis than the folded module does.

* **Without example inputs** the ranks are inferred from the graph's structure
  (:func:`repfx.ir.graph.annotate_ranks`), which assumes batches at exactly those ops
  (:func:`repfx.ir.graph.assumed_input_rank`). Each such op whose input has no inferred rank
  (a graph input, the output of code repfx does not know) gets its input guarded.
* **With example inputs** the ranks are the examples'. A graph with such ops gets its tensor
  inputs guarded to the ranks they had.

A guard is one call of :func:`repfx.ir.graph.require_rank` after the value it checks, placed
before the passes run (a pass that replaces the value hands the guard to the replacement): a
comparison of two integers per call. It raises :class:`repfx.GuardError` naming the input, the
rank the fold assumed, the rank it got and what to do. Tracing the folded module again
(``repfx.fold``, ``torch.fx``, ``torch.export``, dynamo) keeps or evaluates the check; it writes
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from ..ir.graph import (
    assumed_input_rank,
    is_guard,
    op_name,
    rank_of,
    require_rank,
    static_shape,
    where,
)


@dataclass(frozen=True)
class RankGuard:
    """``node``'s value must have ``rank`` dimensions; ``reader`` says why."""

    node: fx.Node
    rank: int
    reader: str


def rank_guards(gm: fx.GraphModule, shapes_recorded: bool) -> list[RankGuard]:
    """The ranks the folds of ``gm`` may rely on, before any fold (see the module docstring).
    Call after :func:`repfx.ir.graph.annotate_ranks`."""
    assuming = [n for n in gm.graph.nodes if assumed_input_rank(gm, n) is not None]
    if shapes_recorded:
        if not assuming:
            return []
        reader = _reads_a_batch(gm, assuming[0])
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        shaped = [(n, static_shape(n)) for n in placeholders]
        return [RankGuard(n, len(shape), reader) for n, shape in shaped if shape is not None]
    guards: dict[fx.Node, RankGuard] = {}
    for node in assuming:
        source = node.args[0] if node.args else None
        if isinstance(source, fx.Node) and rank_of(source) is None and source not in guards:
            rank = assumed_input_rank(gm, node)
            guards[source] = RankGuard(source, rank, _reads_a_batch(gm, node))
    return list(guards.values())


def _reads_a_batch(gm: fx.GraphModule, node: fx.Node) -> str:
    return f"{op_name(gm, node)} {where(node)} reads a batch"


def insert_rank_guards(gm: fx.GraphModule, guards: list[RankGuard]) -> None:
    """Check each guard's value right after it is computed (a graph input: after the last
    one)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for guard in reversed(guards):
        node = guard.node
        if node._erased or node.graph is not gm.graph or _guarded(node, guard.rank):
            continue
        anchor = placeholders[-1] if node.op == "placeholder" else node
        with gm.graph.inserting_after(anchor):
            gm.graph.call_function(require_rank, (node, guard.rank, _name(node), guard.reader))


def rename_rank_guards(gm: fx.GraphModule) -> None:
    """Name each guard after the value it checks now: a pass may have handed it to another
    (cleanup replaces an ``Identity`` by the graph input it passes on)."""
    for node in gm.graph.nodes:
        if is_guard(node) and isinstance(node.args[0], fx.Node):
            node.args = (node.args[0], node.args[1], _name(node.args[0]), *node.args[3:])


def _name(node: fx.Node) -> str:
    return f"input {node.target}" if node.op == "placeholder" else f"the value {node.name}"


def _guarded(node: fx.Node, rank: int) -> bool:
    """``node`` is already checked for ``rank`` (a folded module folded again)."""
    return any(is_guard(u) and u.args[:2] == (node, rank) for u in node.users)
