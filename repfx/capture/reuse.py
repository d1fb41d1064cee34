"""One capture for two copies of a model: the graph captured from one copy, bound to the tensors
of another copy of the same model (the same module tree, other tensor values).

Verification folds a copy of the model whose foldable parameters are re-drawn. Capturing that
copy again costs a trace and a shape propagation (a forward pass) to get the graph repfx already
has. :meth:`CapturedGraph.keep` keeps the graph as captured, before any pass changes it, with
every tensor shared; :meth:`CapturedGraph.bound_to` gives a graph module that computes the same
graph on the other copy's tensors, found by their names in the module tree. It is kept only when
each parameter and buffer of the graph module is a tensor of the captured copy (torch.fx; not a
front end that made tensors of its own), and when no code the graph does not show ran on it: no
module run opaque, no hook. Such code runs when shapes are propagated and may store Python state
next to a tensor (a detection head caching its anchors and the input size they are for); bound
to the other copy's tensors, that state would describe tensors the copy does not have.

What a trace computed from a tensor's *value* (a constant torch.fx kept, a branch taken) stays
what it was for the first copy, and a tensor of the graph that the other copy does not name
keeps the first copy's value (a copy of it). So a bound graph is a guess that whoever uses it
checks end to end — the re-drawn verification does — capturing afresh when it does not hold.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..ir.graph import global_forward_hooks, has_hooks


@dataclass(frozen=True)
class CapturedGraph:
    """A graph module as captured (``gm``, sharing its tensors with the copy it was captured
    from), the modules it runs opaque, and the name in that copy of each of its tensors."""

    gm: fx.GraphModule
    opaque: dict[str, str]
    names: dict[int, str]  # id of a tensor of the captured copy -> its name there

    @staticmethod
    def keep(gm: fx.GraphModule, opaque: dict[str, str], source: nn.Module) -> CapturedGraph | None:
        """``gm`` (captured from ``source``) kept for :meth:`bound_to`, before a pass changes it;
        ``None`` when a parameter or buffer of ``gm`` is no tensor of ``source``, or code the graph
        does not show ran on it (see the module docstring)."""
        if opaque or global_forward_hooks() or any(has_hooks(m) for m in gm.modules()):
            return None
        names = {id(t): name for name, t in named_tensors(source)}
        if any(id(t) not in names for t in [*gm.parameters(), *gm.buffers()]):
            return None
        shared = {id(t): t for _, t in named_tensors(gm)}
        return CapturedGraph(copy.deepcopy(gm, shared), dict(opaque), names)

    def bound_to(self, other: nn.Module) -> fx.GraphModule:
        """The kept graph on ``other``'s tensors, each found by its name in the captured copy;
        a tensor ``other`` does not name is copied with the captured copy's value."""
        theirs = dict(named_tensors(other))
        bound = {key: theirs[name] for key, name in self.names.items() if name in theirs}
        return copy.deepcopy(self.gm, bound)


def named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter, buffer and plain tensor attribute of ``model``'s module tree, by
    qualified name (a tensor held under two names, under each)."""
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for slots in (module._parameters, module._buffers, vars(module)):
            for name, value in slots.items():
                if isinstance(value, torch.Tensor):
                    yield dot + name, value
