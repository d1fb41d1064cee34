"""Module tensors the captured graph itself writes when it runs (*live* state), and which
tensors a trace computed from while it ran.

torch.fx reads a buffer as the tensor it is, unless it is traced as a graph value: whatever the
forward computes from it in Python — ``2 * self.bn.running_mean.view(...)``,
``self.bn.running_var.sqrt()``, ``float(self.count)`` — runs once while tracing, and the graph
keeps the result (a tensor constant, a number). That is exact for a tensor nothing writes, and
wrong for one the model writes on every call:

* the buffers of a leaf module that updates them when it runs (:func:`leaf_state`): a
  ``torch.nn`` module in training mode (a batch norm's or instance norm's running statistics and
  batch count), and every parameter, buffer and plain tensor attribute of code repfx does not
  know (an opaque leaf, a module whose hooks may write);
* every tensor an in-place op in the graph may write, which capture marks
  (:func:`live_tensors`, after :func:`repfx.capture.functionalize`).

A trace also records what it computed from (:class:`EagerReads`): the memory every ATen op run
while tracing read, other than to make a view of it (a view of a buffer stays that buffer's
memory, which is judged by storage: :class:`repfx.ir.graph.ConstantFolder`). Where the two
meet, :func:`repfx.capture.fx.capture` traces again with those buffers as graph values, and
refuses where that cannot help.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..errors import CaptureError
from ..ir.graph import (
    MUTATED_KEY,
    draws_random,
    fetch_attr,
    keys_of,
    may_be_written,
    storage_key,
    written_values,
)
from .hooks import hooks_may_write
from .state import module_tensors, tensor_attributes
from .writes import torch_module_class


def own_state_written(module: nn.Module) -> list[torch.Tensor]:
    """The tensors a call of ``module`` (a leaf of the graph) may write to: a ``torch.nn``
    module's buffers in training mode (running statistics, batch counts), none in eval mode;
    every parameter, buffer and plain tensor attribute of code repfx does not know (a module
    of another library, one whose hooks may write)."""
    if torch_module_class(module) and not hooks_may_write(module):
        return list(module.buffers()) if module.training else []
    return [*module.buffers(), *module.parameters(), *(t for _, t in tensor_attributes(module))]


def leaf_state(gm: fx.GraphModule) -> list[torch.Tensor]:
    """The tensors the graph's leaf modules may write when they run (:func:`own_state_written`
    of each)."""
    called = dict.fromkeys(n.target for n in gm.graph.nodes if n.op == "call_module")
    return [t for target in called for t in own_state_written(gm.get_submodule(target))]


def live_tensors(gm: fx.GraphModule) -> list[torch.Tensor]:
    """Every module tensor the graph may write when it runs: :func:`leaf_state`, and the
    tensors of the ``get_attr`` nodes capture marked as written (:data:`MUTATED_KEY`)."""
    marked = [
        fetch_attr(gm, n.target)
        for n in gm.graph.nodes
        if n.op == "get_attr" and n.meta.get(MUTATED_KEY)
    ]
    return [*leaf_state(gm), *(t for t in marked if isinstance(t, torch.Tensor))]


class EagerReads:
    """A context manager around a trace that records the memory of every tensor an ATen op run
    while tracing reads (``read``: any input of an op that does more than return a view of it,
    and a tensor whose data ``tolist`` / ``numpy`` read) or writes in place (``written``: an
    argument its schema marks written), and the random ops it ran (``random``: a draw from
    arguments torch.fx does not record, ``torch.randn(4)``, which the graph would keep as a
    constant)."""

    def __init__(self) -> None:
        self.read: set[int] = set()
        self.written: set[int] = set()
        self.random: list[str] = []  # random ops run eagerly: the trace keeps one draw of each
        self._modes = (_Dispatched(self), _DataReads(self))

    def __enter__(self) -> EagerReads:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


class _Dispatched(TorchDispatchMode):
    def __init__(self, record: EagerReads) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        if draws_random(func):
            self.record.random.append(schema.name.removeprefix("aten::"))
        if not _returns_views_only(schema):
            self.record.read |= keys_of(tree_leaves((args, kwargs)))
        self.record.written |= keys_of(tree_leaves(written_values(func, args, kwargs)))
        return func(*args, **kwargs)


# Methods that read a tensor's data without dispatching an ATen op.
_DATA_READERS = frozenset({torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__})


class _DataReads(TorchFunctionMode):
    def __init__(self, record: EagerReads) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _DATA_READERS and args:
            self.record.read |= keys_of(args[:1])
        return func(*args, **(kwargs or {}))


def copy_written_constants(gm: fx.GraphModule, created: set[str]) -> None:
    """A tensor the forward creates while traced (``t = torch.zeros(4)``) is stored as a tensor
    constant (its name in ``created``). Where the graph then writes it in place
    (``t += x.mean()``), every run would start from what the last one left, where the model
    starts from a new tensor: the graph reads a copy of it per run, and writes that. A write to a
    constant that shares memory with another is refused (a copy would part them)."""
    kept = keys_of(t for name, t in module_tensors(gm) if name not in created)
    reads: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in created:
            reads.setdefault(node.target, []).append(node)
    keys = [storage_key(fetch_attr(gm, target)) for target in reads]
    for (target, nodes), key in zip(reads.items(), keys, strict=True):
        if key is None or key in kept or not any(may_be_written(n) for n in nodes):
            continue
        if keys.count(key) > 1:
            raise CaptureError(
                f"the forward writes in place to a tensor it creates ({target}), which torch.fx "
                "stores as a constant read through several names (views of it): each run would "
                "start from what the last one left. Create it from the input's size or device"
            )
        _copy_per_run(gm, nodes)


def _copy_per_run(gm: fx.GraphModule, reads: list[fx.Node]) -> None:
    """Every one of ``reads`` (``get_attr`` nodes of one constant, in graph order) replaced by
    one copy of the constant made where the first one is."""
    first = reads[0]
    with gm.graph.inserting_after(first):
        copy = gm.graph.call_method("clone", (first,))
    copy.meta.update({k: v for k, v in first.meta.items()})
    for node in reads:
        node.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
    for node in reads[1:]:
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def _returns_views_only(schema: torch._C.FunctionSchema) -> bool:
    """Does the op only return views of its inputs (``view``, ``select``, ``detach``)?"""
    returns = schema.returns
    return bool(returns) and all(
        r.alias_info is not None and not r.alias_info.is_write for r in returns
    )
