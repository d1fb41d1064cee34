"""Running the passes: an ordered list of them, round after round, until none changes the graph.

Termination is by construction, not by a round cap: every modifying pass must strictly reduce
the number of call nodes, and the pipeline raises (naming the pass) when one does not. A pass
that moves constants without removing an op (``runs_once = True``, e.g. the opt-in
``fold_norm_affine``) runs once, after the others reach their fixpoint, and they run again
after it.

A rewrite the commit point rejects (``repfx.passes.base.RewriteRejected``) leaves the graph
half-changed: the pipeline restores the graph as it was on entry and starts again, with that
rewrite denied (:class:`~repfx.passes.base.PipelineState`, handed to every pass). A rejected
rewrite whose replacement differs from the region is a repfx bug: with ``strict=True`` it
propagates; otherwise it is reported as not folded and a :class:`RewriteRejectedWarning` is
issued (the test suite turns that warning into an error).

Each pass run is logged on the ``repfx.passes`` logger at DEBUG level (name, folds, skips,
seconds), and each pass's running time is summed into :attr:`FixpointResult.seconds`.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import fx, nn

from ..report.fold_report import Folded, Skipped
from .base import DENIED, Pass, PassError, PassResult, PipelineState, RewriteRejected

log = logging.getLogger("repfx.passes")


class RewriteRejectedWarning(UserWarning):
    """A rewrite whose replacement computes something else than the region it replaces was
    undone, and the fold went on without it: a repfx bug (``run_to_fixpoint`` outside strict
    mode). The report lists it as not folded."""


@dataclass
class FixpointResult:
    """What :func:`run_to_fixpoint` returns: every fold made, the skips that describe the graph
    as returned, and each pass's running time in seconds (summed over rounds)."""

    folded: list[Folded]
    skipped: list[Skipped]
    seconds: dict[str, float] = field(default_factory=dict)


def call_node_count(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op.startswith("call_"))


def run_to_fixpoint(
    gm: fx.GraphModule,
    passes: Sequence[Pass],
    *,
    strict: bool = False,
    proven: frozenset[tuple[str, str]] = frozenset(),
) -> FixpointResult:
    """Run ``passes`` in order, repeatedly, until a full round changes nothing.

    Returns every fold made, and the skips of the final (unchanged) round, which describe the
    graph as it is returned. A rejected rewrite restores ``gm`` to its state on entry and
    starts again with that rewrite denied; denied rewrites are reported. ``strict``: a rewrite
    rejected as a repfx bug raises :class:`~repfx.passes.base.RewriteRejected` instead (else
    :class:`RewriteRejectedWarning` is issued). ``proven``: the (rule, location) pairs
    another fold of the same model proved, applied without proving them again
    (``PipelineState.proven``).
    """
    pristine = _Snapshot.of(gm)
    seconds = {p.name: 0.0 for p in passes}
    denied: list[RewriteRejected] = []
    while True:
        state = PipelineState(frozenset((r.rule, r.where) for r in denied), proven)
        try:
            folded, skipped = _Rounds(gm, state, seconds).run(passes)
        except RewriteRejected as exc:
            if (strict and exc.bug) or (exc.rule, exc.where) in state.denied:
                raise
            denied.append(exc)
            pristine.restore(gm)
            if exc.bug:
                message = f"{exc} (undone: the fold goes on without it)"
                warnings.warn(message, RewriteRejectedWarning, stacklevel=2)
            continue
        skipped = [s for s in skipped if s.reason != DENIED]
        skipped += [Skipped(r.rule, r.where, r.reason) for r in denied]
        return FixpointResult(folded, skipped, seconds)


@dataclass
class _Snapshot:
    """What the passes change, kept cheaply: the graph, and every module's dicts of parameters,
    buffers and children. Passes never change a tensor in place (they swap in new ones), so the
    dicts, copied shallowly, restore the module tree."""

    graph: fx.Graph
    modules: list[tuple[nn.Module, dict, dict, dict]]

    @staticmethod
    def of(gm: fx.GraphModule) -> _Snapshot:
        modules = [
            (m, dict(m._parameters), dict(m._buffers), dict(m._modules))
            for _, m in gm.named_modules(remove_duplicate=False)
        ]
        return _Snapshot(copy.deepcopy(gm.graph), modules)

    def restore(self, gm: fx.GraphModule) -> None:
        for module, parameters, buffers, children in self.modules:
            module._parameters, module._buffers = dict(parameters), dict(buffers)
            module._modules = dict(children)
        gm.graph = copy.deepcopy(self.graph)  # (the setter recompiles)


@dataclass
class _Rounds:
    """One attempt at the fixpoint: the passes run on ``gm`` with ``state``, their running
    times added to ``seconds``."""

    gm: fx.GraphModule
    state: PipelineState
    seconds: dict[str, float]

    def run(self, passes: Sequence[Pass]) -> tuple[list[Folded], list[Skipped]]:
        repeated = [p for p in passes if not p.runs_once]
        once = [p for p in passes if p.runs_once]
        folded, skipped = self._fixpoint(repeated)
        if not once:
            return folded, skipped
        once_skipped: list[Skipped] = []
        for p in once:
            result = self._run(p)
            folded.extend(result.folded)
            once_skipped.extend(result.skipped)
            self.gm.graph.lint()
        more, skipped = self._fixpoint(repeated)
        return folded + more, skipped + once_skipped

    def _fixpoint(self, passes: Sequence[Pass]) -> tuple[list[Folded], list[Skipped]]:
        folded: list[Folded] = []
        while True:
            skipped: list[Skipped] = []
            changed = False
            for p in passes:
                before = call_node_count(self.gm)
                result = self._run(p)
                folded.extend(result.folded)
                skipped.extend(result.skipped)
                if result.modified:
                    changed = True
                    if call_node_count(self.gm) >= before:
                        raise PassError(f"pass {p.name!r} reported a change but removed no node")
                    self.gm.graph.lint()
            if not changed:
                return folded, skipped

    def _run(self, p: Pass) -> PassResult:
        """``p`` on the graph, timed and logged."""
        start = time.perf_counter()
        try:
            result = p(self.gm, self.state)
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[p.name] = self.seconds.get(p.name, 0.0) + elapsed
        folds, skips = len(result.folded), len(result.skipped)
        log.debug("pass %s: %d folded, %d skipped, %.3f s", p.name, folds, skips, elapsed)
        return result
