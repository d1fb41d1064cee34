"""What a pass is, and the one way a pass changes the graph.

A pass (:class:`Pass`) maps a graph module to a :class:`PassResult`; the pipeline
(``repfx.passes.pipeline``) runs an ordered list of them until none changes the graph. Most
passes are a :class:`NodeRule`, which visits every node (:func:`apply_rule`) in four steps:
its *pattern* (``match``: is this node a candidate?), its *checks* (``check``: is folding it
exact?), the *region* it replaces (``region``) and the *rewrite* replacing it (``rewrite``). A
candidate that fails a check, or a pattern that says why not, becomes a :class:`Skipped` record
(its :class:`repfx.ir.match.Fail`'s reason); a candidate that passes is handed to the commit
point.

Every rewrite goes through that one commit point, :meth:`FoldContext.commit`: it evaluates the
region being replaced on random probes in float64 *before* the graph changes, lets the pass
rewrite, evaluates the replacement on the same probes, and accepts the rewrite only if both
agree (``repfx.proof.validate``). A rewrite that cannot be proven (no probe shape runs the region)
is not made. A rewrite whose replacement differs raises :class:`RewriteRejected`: the pipeline
undoes it and starts again with it denied (:class:`PipelineState`), or, in strict mode, lets it
propagate. A pass that changes the graph outside a commit is a bug the pass runner reports
(:class:`PassError`).

Two folds are not proven rewrite by rewrite; each repeats the rewrites of a fold that was, and
is then judged whole: the float64 fold of a float64 copy that verification makes to re-check a
fold (judged against float64 truth), and the fold of the copy with re-drawn parameters (judged
against that copy: the rewrites proven on the given values, checked end to end on O(1) ones).
The commit point applies the (rule, location) pairs it is told were proven
(``PipelineState.proven``) without proving them again; any other rewrite such a fold makes is
proven as usual.

Commits are logged on the ``repfx.passes`` logger at DEBUG level (rule, place, proven or why
not).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torch import fx

from ..errors import Error
from ..ir.graph import (
    ConstantFolder,
    attr_tensors_read_by,
    has_hooks,
    module_call_counts,
    tensor_use_counts,
    where,
)
from ..ir.match import Fail
from ..proof.aliasing import aliasing_failure
from ..proof.precision import precision_loss
from ..proof.region import ValidationFailure, reads_module_state
from ..proof.validate import SpecialValuesDiffer, prove_before
from ..report.fold_report import Folded, Skipped
from .rewrite import RewriteRefused, committing

log = logging.getLogger("repfx.passes")

REJECTED = "rejected by local validation — a repfx bug, please report it"
DENIED = "denied after an earlier attempt was undone"


class PassError(Error, RuntimeError):
    """A pass broke the pass contract (a repfx bug)."""


class RewriteRejected(PassError):
    """A rewrite was undone after it changed the graph: its replacement computes something else
    than the region it replaces (``bug``), or it refused itself half-way (a folded constant
    overflows the dtype)."""

    def __init__(self, rule: str, where: str, why: str, bug: bool = True):
        super().__init__(f"{rule} at {where}: {REJECTED + ': ' if bug else ''}{why}")
        self.rule, self.where, self.why, self.bug = rule, where, why, bug

    @property
    def reason(self) -> str:
        return f"{REJECTED}: {self.why}" if self.bug else self.why


# A rewrite changes the graph and returns (the nodes now computing the region's outputs, in
# order; a description of what it did).
Rewrite = Callable[[], "tuple[list[fx.Node], str]"]


@dataclass(frozen=True)
class Region:
    """The part of the graph a rewrite replaces, as the commit point proves it: ``outputs``,
    the values the rewrite must preserve (in order), computed from ``inputs``, the values it
    reads and leaves alone."""

    outputs: Sequence[fx.Node]
    inputs: Sequence[fx.Node]


class Candidate(Protocol):
    """What a rule's pattern matched: any value with the ``node`` whose location names the
    rule's records (the node it folds away, usually the one visited)."""

    node: fx.Node


@dataclass(frozen=True)
class Plan:
    """A checked candidate's region and the rewrite replacing it."""

    region: Region
    rewrite: Rewrite


@dataclass(frozen=True)
class PipelineState:
    """What the pipeline hands each pass it runs: ``denied``, the (rule, location) of the
    rewrites undone earlier in this fold, which the commit point now refuses; ``proven``, those
    another fold of the same model proved, which it applies without proving them again (see the
    module docstring)."""

    denied: frozenset[tuple[str, str]] = frozenset()
    proven: frozenset[tuple[str, str]] = frozenset()


@dataclass
class PassResult:
    modified: bool
    folded: list[Folded] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


class Pass:
    """A step of the pipeline: ``pass_(gm, state)`` folds what it can in ``gm`` and returns a
    :class:`PassResult`.

    ``name``: the rule's name in reports and records. ``words``: what one of its folds does, in
    plain words ("batch norm folded"); its name unless the pass says. ``runs_once``: a pass
    that moves constants without removing an op runs once, after the others reach their
    fixpoint (see ``repfx.passes.pipeline.run_to_fixpoint``).
    """

    name: str
    runs_once: bool = False

    @property
    def words(self) -> str:
        return self.name

    def __call__(self, gm: fx.GraphModule, state: PipelineState | None = None) -> PassResult:
        raise NotImplementedError(f"{type(self).__name__} does not define __call__")


def rule_words(passes: Sequence[Pass]) -> dict[str, str]:
    """Each pass's name → its plain words."""
    return {p.name: p.words for p in passes}


class FoldContext:
    """What a pass needs to ask about the graph, valid for the whole pass.

    Use counts are taken once, when the pass starts: rewrites only remove call sites of
    existing modules and tensors (so their counts can only be too high, which is safe) and
    create tensors with a single use (``repfx.ir.graph.TensorUses`` holds the tensors it
    counts). Constants: see ``repfx.ir.graph.ConstantFolder``.
    ``state``: what the pipeline said (the rewrites it denies); none for a pass run alone.
    """

    def __init__(self, gm: fx.GraphModule, state: PipelineState | None = None):
        self.gm = gm
        self.consts = ConstantFolder(gm)
        self.tensor_uses = tensor_use_counts(gm, self.consts)
        self.module_calls = module_call_counts(gm)
        self.denied = state.denied if state is not None else frozenset()
        self.proven = state.proven if state is not None else frozenset()
        self.commits = 0

    def commit(
        self,
        rule: str,
        location: str,
        outputs: Sequence[fx.Node],
        inputs: Sequence[fx.Node],
        rewrite: Rewrite,
    ) -> Folded | Skipped:
        """The one way a pass changes the graph: prove, then apply, ``rewrite``.

        ``outputs`` are the values the rewrite must preserve, ``inputs`` the values it reads and
        leaves alone (everything between them is the region it replaces); ``rewrite`` returns
        the nodes computing the outputs afterwards. See the module docstring.
        """
        try:
            outcome = self._prove_and_apply(rule, location, Region(outputs, inputs), rewrite)
        except RewriteRejected as exc:
            log.debug("commit %s at %s: %s", rule, location, exc.reason)  # the pipeline undoes it
            raise
        if isinstance(outcome, Folded):
            log.debug("commit %s at %s: proven", rule, location)
        else:
            log.debug("commit %s at %s: not made: %s", rule, location, outcome.reason)
        return outcome

    def _prove_and_apply(
        self, rule: str, location: str, region: Region, rewrite: Rewrite
    ) -> Folded | Skipped:
        if (rule, location) in self.denied:
            return Skipped(rule, location, DENIED)
        if (rule, location) in self.proven:
            return self._apply_proven(rule, location, rewrite)
        try:
            proof = prove_before(self.gm, region.outputs, region.inputs, self.consts)
        except ValidationFailure as exc:
            return Skipped(rule, location, f"cannot be validated: {exc}")
        self.commits += 1
        try:
            with committing(self.gm):
                replacements, detail = rewrite()
        except RewriteRefused as exc:  # the graph is half-changed: the pipeline undoes it
            raise RewriteRejected(rule, location, exc.reason, bug=False) from exc
        if (fail := proof.check(self.gm, replacements)) is not None:
            if isinstance(fail, SpecialValuesDiffer):  # not exact there: a refusal, not a bug
                raise RewriteRejected(rule, location, fail.reason, bug=False)
            lost = precision_loss(self.gm, proof.region, replacements)
            if lost is not None:  # a refusal, not a bug
                raise RewriteRejected(rule, location, lost.reason, bug=False)
            raise RewriteRejected(rule, location, fail.reason)
        if (odd := proof.check_special_values(self.gm, replacements)) is not None:
            raise RewriteRejected(rule, location, odd.reason, bug=False)  # not exact there
        aliased = aliasing_failure(self.gm, proof.region, proof.probes[0], replacements)
        if aliased is not None:  # a refusal, not a bug
            raise RewriteRejected(rule, location, aliased.reason, bug=False)
        return Folded(rule, location, detail, reads_module_state(self.gm, proof.region))

    def _apply_proven(self, rule: str, location: str, rewrite: Rewrite) -> Folded:
        """Apply a rewrite another fold of the same model proved (``PipelineState.proven``)."""
        self.commits += 1
        try:
            with committing(self.gm):
                _, detail = rewrite()
        except RewriteRefused as exc:
            raise RewriteRejected(rule, location, exc.reason, bug=False) from exc
        return Folded(rule, location, detail)

    def shared_reason(self, node: fx.Node, what: str) -> Fail | None:
        """Why ``node``'s module or parameters may not be rewritten (``None``: they may)."""
        if node.op == "call_module":
            calls = self.module_calls[node.target]
            if calls > 1:
                return Fail(f"{what} module is shared by {calls} call sites")
            module = self.gm.get_submodule(node.target)
            if has_hooks(module):
                return Fail(f"{what} module has hooks")
            tensors = [*module.parameters(), *module.buffers()]
        else:
            tensors = attr_tensors_read_by(node, self.consts)
        for t in tensors:
            if self.tensor_uses[t] > 1:
                return Fail(f"{what} parameter is used at {self.tensor_uses[t]} call sites")
        return None


# What a rule does at one node: fold it (through a commit), say why not, or pass (None).
Visit = Callable[[FoldContext, fx.Node], "Folded | Skipped | None"]


def apply_rule(gm: fx.GraphModule, visit: Visit, ctx: FoldContext | None = None) -> PassResult:
    """Call ``visit`` on every live node in order; it rewrites the graph and returns a
    :class:`Folded`, returns why it did not (:class:`Skipped`), or ``None`` (not a candidate).
    ``ctx``: the context to visit in (a new one by default), for a caller that asks it more
    afterwards."""
    result = PassResult(modified=False)
    ctx = FoldContext(gm) if ctx is None else ctx
    for node in list(gm.graph.nodes):
        if node._erased:
            continue
        record(result, visit_once(ctx, visit, node))
    return result


def visit_once(ctx: FoldContext, visit: Visit, node: fx.Node) -> Folded | Skipped | None:
    """``visit(ctx, node)``, checking that it changed the graph only through a commit."""
    nodes, commits = len(ctx.gm.graph.nodes), ctx.commits
    outcome = visit(ctx, node)
    if ctx.commits == commits and len(ctx.gm.graph.nodes) != nodes:
        raise PassError(f"a rule changed the graph at {node.name} without a commit (a repfx bug)")
    if isinstance(outcome, Folded) and ctx.commits == commits:
        raise PassError(f"a rule reported a fold at {node.name} without a commit (a repfx bug)")
    return outcome


def record(result: PassResult, outcome: Folded | Skipped | None) -> None:
    if isinstance(outcome, Folded):
        result.folded.append(outcome)
        result.modified = True
    elif isinstance(outcome, Skipped):
        result.skipped.append(outcome)


class NodeRule(Pass):
    """The usual shape of a rule: at every live node in order (:func:`apply_rule`),

    1. ``match(ctx, node)``, its pattern: the candidate at ``node``; ``None`` when ``node`` is
       not one (nothing to report); a :class:`Fail` for a candidate that does not hold;
    2. ``check(ctx, candidate)``, its checks: each condition for exactness in turn, the first
       that does not hold as a :class:`Fail` (``None``: they all hold);
    3. ``region(ctx, candidate)``: the :class:`Region` the rewrite replaces;
    4. ``rewrite(ctx, candidate)``: changes the graph, and returns the nodes now computing the
       region's outputs and a description. It runs inside the commit point, never directly.

    :meth:`visit` strings them together, once for every rule: a :class:`Fail` becomes a
    :class:`Skipped` record at the candidate's location, a candidate that passes its checks
    goes to ``ctx.commit``. A rule that chooses among several rewrites of one candidate
    overrides :meth:`plan` instead of ``region`` and ``rewrite`` (``repfx.passes._absorb``).

    A subclass sets ``name``, ``words`` and (rarely) ``runs_once``: see :class:`Pass`.
    """

    def __call__(self, gm: fx.GraphModule, state: PipelineState | None = None) -> PassResult:
        return apply_rule(gm, self.visit, FoldContext(gm, state))

    def visit(self, ctx: FoldContext, node: fx.Node) -> Folded | Skipped | None:
        """Pattern → checks → region and rewrite → commit, at ``node``."""
        candidate = self.match(ctx, node)
        if candidate is None:
            return None
        if isinstance(candidate, Fail):
            return Skipped(self.name, where(node), candidate.reason)
        location = where(candidate.node)
        if (fail := self.check(ctx, candidate)) is not None:
            return Skipped(self.name, location, fail.reason)
        plan = self.plan(ctx, candidate)
        if isinstance(plan, Fail):
            return Skipped(self.name, location, plan.reason)
        region = plan.region
        return ctx.commit(self.name, location, region.outputs, region.inputs, plan.rewrite)

    def match(self, ctx: FoldContext, node: fx.Node) -> Candidate | Fail | None:
        raise NotImplementedError(f"{type(self).__name__} defines no match")

    def check(self, ctx: FoldContext, candidate: Candidate) -> Fail | None:
        return None  # a rule whose pattern says it all

    def region(self, ctx: FoldContext, candidate: Candidate) -> Region:
        raise NotImplementedError(f"{type(self).__name__} defines no region")

    def rewrite(self, ctx: FoldContext, candidate: Candidate) -> tuple[list[fx.Node], str]:
        raise NotImplementedError(f"{type(self).__name__} defines no rewrite")

    def plan(self, ctx: FoldContext, candidate: Candidate) -> Plan | Fail:
        """The region to replace and the rewrite replacing it (or why there is none)."""
        return Plan(self.region(ctx, candidate), lambda: self.rewrite(ctx, candidate))
