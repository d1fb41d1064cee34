"""Pass infrastructure: a pass maps a graph module to a :class:`PassResult`; the pipeline runs
an ordered list of passes until none changes the graph. Most passes are a :class:`NodeRule`:
they visit every node (:func:`apply_rule`) and turn each candidate into a fold, or its
:class:`repfx.ir.match.Fail` into a :class:`Skipped` record.

Every rewrite goes through one commit point, :meth:`FoldContext.commit`: it evaluates the
region being replaced on random probes in float64 *before* the graph changes, lets the pass
rewrite, evaluates the replacement on the same probes, and accepts the rewrite only if both
agree (``repfx.proof.validate``). A rewrite that cannot be proven (no probe shape runs the region)
is not made. A rewrite whose replacement differs is a repfx bug: with ``REPFX_STRICT=1`` (the
test suite sets it) it raises :class:`RewriteRejected`; otherwise the pipeline starts again from
the graph as it was, with that rewrite denied, and reports it. A pass that changes the graph
outside a commit is a bug the pipeline reports (:class:`PassError`).

Termination is by construction, not by a round cap: every modifying pass must strictly reduce
the number of call nodes, and the pipeline raises (naming the pass) when one does not. A pass
that moves constants without removing an op (``runs_once = True``, e.g. the opt-in
``fold_norm_affine``) runs once, after the others reach their fixpoint, and they run again
after it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torch import fx, nn

from ..errors import Error
from ..ir.graph import (
    ConstantFolder,
    attr_tensors_read_by,
    has_hooks,
    module_call_counts,
    tensor_use_counts,
)
from ..ir.match import Fail
from ..proof.validate import ValidationFailure, prove_before
from ..report.fold_report import Folded, Skipped
from .rewrite import RewriteRefused, committing

STRICT_ENV = "REPFX_STRICT"  # "1": a rejected rewrite raises instead of being denied and retried
DENIED_KEY = "repfx_denied"  # gm.meta: (rule, location) of rewrites rejected in this fold
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


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


@dataclass
class PassResult:
    modified: bool
    folded: list[Folded] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


class Pass(Protocol):
    name: str  # the rule's name in reports and records
    words: str  # what one of its folds does, in plain words ("batch norm folded"); optional

    def __call__(self, gm: fx.GraphModule) -> PassResult: ...


def rule_words(passes: Sequence[Pass]) -> dict[str, str]:
    """Each pass's name → its plain words (its name where it has none)."""
    return {p.name: getattr(p, "words", p.name) for p in passes}


class FoldContext:
    """What a pass needs to ask about the graph, valid for the whole pass.

    Use counts are taken once, when the pass starts: rewrites only remove call sites of
    existing modules and tensors (so their counts can only be too high, which is safe) and
    create tensors with a single use. The tensors counted are pinned, so that no new tensor
    can inherit a counted one's ``id``. Constants: see ``repfx.ir.graph.ConstantFolder``.
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.consts = ConstantFolder(gm)
        self.tensor_uses = tensor_use_counts(gm, self.consts)
        self.module_calls = module_call_counts(gm)
        self.denied: frozenset[tuple[str, str]] = frozenset(gm.meta.get(DENIED_KEY, ()))
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
        if (rule, location) in self.denied:
            return Skipped(rule, location, DENIED)
        try:
            proof = prove_before(self.gm, outputs, inputs, self.consts)
        except ValidationFailure as exc:
            return Skipped(rule, location, f"cannot be validated: {exc}")
        self.commits += 1
        try:
            with committing(self.gm):
                replacements, detail = rewrite()
        except RewriteRefused as exc:  # the graph is half-changed: the pipeline undoes it
            raise RewriteRejected(rule, location, exc.reason, bug=False) from exc
        if (fail := proof.check(self.gm, replacements)) is not None:
            raise RewriteRejected(rule, location, fail.reason)
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


class NodeRule:
    """The usual shape of a rule: visit every live node in order (:func:`apply_rule`).

    A subclass sets ``name`` (the rule's name in reports and records) and ``words`` (one of its
    folds in plain words), and defines ``_visit(ctx, node)``, which returns what
    ``ctx.commit`` returned, a :class:`Skipped` (a candidate that does not hold: its
    :class:`repfx.ir.match.Fail` turned into a record) or ``None`` (not a candidate). ``runs_once``:
    see :func:`run_to_fixpoint`.
    """

    name: str
    words: str
    runs_once = False

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        return apply_rule(gm, self._visit)

    def _visit(self, ctx: FoldContext, node: fx.Node) -> Folded | Skipped | None:
        raise NotImplementedError(f"{type(self).__name__} defines no _visit")


def call_node_count(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op.startswith("call_"))


def run_to_fixpoint(
    gm: fx.GraphModule, passes: Sequence[Pass]
) -> tuple[list[Folded], list[Skipped]]:
    """Run ``passes`` in order, repeatedly, until a full round changes nothing.

    Returns every fold made, and the skips of the final (unchanged) round, which describe the
    graph as it is returned. A rejected rewrite (outside strict mode) restores ``gm`` to its
    state on entry and starts again with that rewrite denied; denied rewrites are reported.
    """
    pristine = _Snapshot.of(gm)
    denied: list[RewriteRejected] = []
    while True:
        gm.meta[DENIED_KEY] = frozenset((r.rule, r.where) for r in denied)
        try:
            folded, skipped = _rounds(gm, passes)
        except RewriteRejected as exc:
            if (strict() and exc.bug) or (exc.rule, exc.where) in gm.meta[DENIED_KEY]:
                raise
            denied.append(exc)
            pristine.restore(gm)
            continue
        finally:
            gm.meta.pop(DENIED_KEY, None)
        skipped = [s for s in skipped if s.reason != DENIED]
        return folded, skipped + [Skipped(r.rule, r.where, r.reason) for r in denied]


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


def _rounds(gm: fx.GraphModule, passes: Sequence[Pass]) -> tuple[list[Folded], list[Skipped]]:
    repeated = [p for p in passes if not getattr(p, "runs_once", False)]
    once = [p for p in passes if getattr(p, "runs_once", False)]
    folded, skipped = _fixpoint(gm, repeated)
    if not once:
        return folded, skipped
    once_skipped: list[Skipped] = []
    for p in once:
        result = p(gm)
        folded.extend(result.folded)
        once_skipped.extend(result.skipped)
        gm.graph.lint()
    more, skipped = _fixpoint(gm, repeated)
    return folded + more, skipped + once_skipped


def _fixpoint(gm: fx.GraphModule, passes: Sequence[Pass]) -> tuple[list[Folded], list[Skipped]]:
    folded: list[Folded] = []
    while True:
        skipped: list[Skipped] = []
        changed = False
        for p in passes:
            before = call_node_count(gm)
            result = p(gm)
            folded.extend(result.folded)
            skipped.extend(result.skipped)
            if result.modified:
                changed = True
                if call_node_count(gm) >= before:
                    raise PassError(f"pass {p.name!r} reported a change but removed no node")
                gm.graph.lint()
        if not changed:
            return folded, skipped
