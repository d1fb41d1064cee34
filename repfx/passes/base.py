"""Pass infrastructure: a pass maps a graph module to a :class:`PassResult`; the pipeline runs
an ordered list of passes until none changes the graph.

Termination is by construction, not by a round cap: every modifying pass must strictly reduce
the number of call nodes, and the pipeline raises (naming the pass) when one does not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torch import fx

from ..graph import (
    ConstantFolder,
    attr_tensors_read_by,
    has_hooks,
    module_call_counts,
    tensor_use_counts,
)
from ..report import Folded, Skipped


@dataclass
class PassResult:
    modified: bool
    folded: list[Folded] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


class Pass(Protocol):
    name: str

    def __call__(self, gm: fx.GraphModule) -> PassResult: ...


class FoldContext:
    """What a pass needs to ask about the graph, valid for the whole pass.

    Use counts are taken once, when the pass starts: rewrites only remove call sites of
    existing modules and tensors (so their counts can only be too high, which is safe) and
    create tensors with a single use. The tensors counted are pinned, so that no new tensor
    can inherit a counted one's ``id``. Constants: see ``repfx.graph.ConstantFolder``.
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.consts = ConstantFolder(gm)
        self.tensor_uses = tensor_use_counts(gm, self.consts)
        self.module_calls = module_call_counts(gm)
        self._pinned = list(gm.state_dict(keep_vars=True).values())

    def shared_reason(self, node: fx.Node, what: str) -> str | None:
        """Why ``node``'s module or parameters may not be rewritten (``None``: they may)."""
        if node.op == "call_module":
            calls = self.module_calls[node.target]
            if calls > 1:
                return f"{what} module is shared by {calls} call sites"
            module = self.gm.get_submodule(node.target)
            if has_hooks(module):
                return f"{what} module has hooks"
            tensors = [*module.parameters(), *module.buffers()]
        else:
            tensors = attr_tensors_read_by(node, self.consts)
        for t in tensors:
            if self.tensor_uses[id(t)] > 1:
                return f"{what} parameter is used at {self.tensor_uses[id(t)]} call sites"
        return None


Rule = Callable[[FoldContext, fx.Node], "Folded | Skipped | None"]


def apply_rule(gm: fx.GraphModule, rule: Rule) -> PassResult:
    """Visit every live node in order with ``rule``, which rewrites the graph and returns a
    :class:`Folded`, returns why it did not (:class:`Skipped`), or ``None`` (not a candidate)."""
    result = PassResult(modified=False)
    ctx = FoldContext(gm)
    for node in list(gm.graph.nodes):
        if node._erased:
            continue
        outcome = rule(ctx, node)
        if isinstance(outcome, Folded):
            result.folded.append(outcome)
            result.modified = True
        elif isinstance(outcome, Skipped):
            result.skipped.append(outcome)
    return result


def call_node_count(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op.startswith("call_"))


class PassError(RuntimeError):
    pass


def run_to_fixpoint(
    gm: fx.GraphModule, passes: Sequence[Pass]
) -> tuple[list[Folded], list[Skipped]]:
    """Run ``passes`` in order, repeatedly, until a full round changes nothing.

    Returns every fold made, and the skips of the final (unchanged) round, which describe the
    graph as it is returned.
    """
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
