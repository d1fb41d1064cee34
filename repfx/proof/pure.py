"""Can a folded graph module be run as it is, without a private copy?

Verification runs models on copies because a forward may change its module (a training-mode
BatchNorm updates its statistics, a forward writes a buffer, a hook records what it saw).
Copying a large model costs about as much as running it, so repfx's own folded graph module is
run as it is when nothing in it can write: every node is a placeholder, an attribute read, a
torch callable that writes to none of its inputs, or a call of a stock ``torch.nn`` module
(its exact class, not a subclass) in eval mode without hooks — or of a graph module that is
itself such a graph — and no node is marked as written by capture (``MUTATED_KEY``: a
functional batch norm updating its running statistics, a write through an alias). Anything else
(a module repfx ran opaque, a training-mode BatchNorm, an in-place op, a functional batch or
instance norm, which may update the statistics it is given) is run on a copy, as before.
"""

from __future__ import annotations

from torch import fx, nn

from ..ir.graph import MUTATED_KEY, has_hooks, is_guard, is_torch_callable, writes_in_place
from ..ir.norms import RUNNING_STATISTICS_FUNCTIONS  # (never judged pure: they may update them)

_STOCK_MODULES = "torch.nn.modules."


def runs_without_writes(module: nn.Module) -> bool:
    """Does running ``module`` leave it (and everything it holds) as it was? Only ever true for
    a ``torch.fx.GraphModule`` whose every node provably writes nothing (module docstring)."""
    if not isinstance(module, fx.GraphModule) or module.training or has_hooks(module):
        return False
    return all(_writes_nothing(module, node) for node in module.graph.nodes)


def _writes_nothing(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.meta.get(MUTATED_KEY) or node.target in RUNNING_STATISTICS_FUNCTIONS:
        return False
    if node.op in ("placeholder", "output", "get_attr"):
        return True
    if node.op in ("call_function", "call_method"):
        if is_guard(node):  # a rank guard reads a shape
            return True
        if writes_in_place(node):
            return False
        return node.op == "call_method" or is_torch_callable(node.target)
    if node.op == "call_module":
        return _stock_in_eval(gm.get_submodule(node.target))
    return False


def _stock_in_eval(module: nn.Module) -> bool:
    """A ``torch.nn`` module of the exact stock class (or a pure graph module), all of it in
    eval mode, without hooks."""
    if isinstance(module, fx.GraphModule):
        return runs_without_writes(module)
    return all(
        type(m).__module__.startswith(_STOCK_MODULES) and not m.training and not has_hooks(m)
        for m in module.modules()
    )
