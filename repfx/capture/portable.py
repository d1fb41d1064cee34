"""A folded graph module that ``torch.save`` / ``pickle`` store with its calling convention.

``fx.GraphModule`` pickles its generated code, not its graph: loading traces that code again
with a plain tracer. Code generated for a pytree convention (a HuggingFace ``ModelOutput``
rebuilt from the graph's leaves, ``torch.export``'s flattened inputs, a decoder's cache) does
not survive that: the re-trace runs ``tree_unflatten`` on proxies, so a ``ModelOutput``
comes back as a plain ``dict`` and an object pytree does not know cannot be traced at all. Its
forward pre-hooks (the check of the call's form) are dropped too, by loading and by
``copy.deepcopy``.

:func:`keep_when_pickled` gives a graph module a reduction that pickles the code of its graph
with plain code generation (flat inputs, the flat leaves out: what a plain re-trace can read)
together with its code generator and its forward hooks, and puts both back after loading.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import fx
from torch.fx.graph import CodeGen

from ..ir.graph import require_none, require_rank

GUARDS = (require_rank, require_none)  # what a re-trace must record, not run

_HOOKS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def keep_when_pickled(gm: fx.GraphModule) -> None:
    """Pickle and deep-copy ``gm`` (and its copies) with its code generator and forward
    hooks."""
    cls = type(gm)  # (each graph module has a class of its own)
    cls.__reduce__, cls.__deepcopy__ = _reduce, _deepcopy


def _deepcopy(gm: fx.GraphModule, memo: dict[int, Any]) -> fx.GraphModule:
    """``fx.GraphModule``'s deep copy, which keeps the code generator but drops the forward
    hooks (export's check of the call's form) and the attributes the graph does not read (what
    that check reads), with both."""
    copied = fx.GraphModule.__deepcopy__(gm, memo)
    for name in _HOOKS:
        getattr(copied, name).update(copy.deepcopy(dict(getattr(gm, name)), memo))
    for name, value in vars(gm).items():
        if not hasattr(copied, name):
            setattr(copied, name, copy.deepcopy(value, memo))
    return copied


def _reduce(gm: fx.GraphModule) -> tuple[Any, ...]:
    codegen = gm.graph._codegen
    gm.graph._codegen = CodeGen()
    try:
        gm.recompile()  # (the reduction copies the code before it recompiles)
        rebuild, arguments = fx.GraphModule.__reduce__(gm)
    finally:
        gm.graph._codegen = codegen
        gm.recompile()
    body, *rest = arguments
    body = {**body, "_tracer_cls": GuardedTracer, "_tracer_extras": {}}
    arguments = (body, *rest)
    hooks = {name: dict(getattr(gm, name)) for name in _HOOKS}
    return (_rebuilt, (rebuild, arguments, codegen, hooks))


class GuardedTracer(fx.Tracer):
    """The tracer a loaded graph module's code is traced again with: it records repfx's guards
    (:data:`GUARDS`) as calls, where a plain one would run them on proxies and drop them."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=GUARDS)


def _rebuilt(
    rebuild: Any, arguments: tuple, codegen: CodeGen, hooks: dict[str, dict]
) -> fx.GraphModule:
    gm = rebuild(*arguments)
    gm.graph._codegen = codegen
    gm.recompile()
    for name, table in hooks.items():
        getattr(gm, name).update(table)
    keep_when_pickled(gm)
    return gm
