"""In-place ops out of place where that is exact, marked where it is not (:func:`functionalize`).

An in-place write to a tensor that nothing else can observe — a fresh result of an op that
allocates its output, read before the write only by ops that allocate theirs — becomes its
out-of-place form (``relu_`` → ``relu``, ``y += c`` → ``y + c``, ``F.relu(y, inplace=True)`` →
``inplace=False``, ``nn.ReLU(inplace=True)`` → ``inplace=False`` when every call of the module
qualifies, ``y[i] = v`` → a copy with the item set), and every later reader of the written
tensor reads the new value. Any other write — to a graph input, a parameter or buffer, a view,
a tensor an alias of which is live, by a random in-place op, or by code that is not known (an
opaque leaf, a user function, a hook whose code does more than compute out of place may write
to its inputs) — stays, and the written tensor, the writing node and every node that may alias
them are marked ``node.meta[repfx.ir.graph.MUTATED_KEY] = True``: such nodes are never
constants, and the commit point refuses rewrites that touch them. The folded model therefore
writes to the caller's inputs exactly where the original does. Out of place, ``a + b`` may
promote the dtype where ``a += b`` keeps ``a``'s: such a rewrite is followed by
``.type_as(a)``, which :func:`repfx.capture.drop_no_op_dtype_guards` (run by
:func:`repfx.capture.propagate_shapes`) drops where the recorded dtypes show it does nothing
(the fold is then exact for inputs of the example inputs' dtypes).

A tensor is *private* to an in-place write when it was allocated by one op, and every op
reading it before the write allocates its own result (so no alias of it is live): rewriting the
write out of place and sending every later reader to the new value is then exact. What a node
writes, allocates and may alias is :mod:`.writes`'s.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import fx, nn

from ..ir.graph import (
    HANDED_KEY,
    MUTATED_KEY,
    VALUE_KEYS,
    arg_of,
    fetch_attr,
    keys_of,
    module_of,
    reads_only_shape,
    storage_key,
)
from ..ir.norms import RUNNING_STATISTICS_FUNCTIONS
from .hooks import forward_hooks_of
from .live_state import leaf_state
from .writes import (
    Write,
    alias_source,
    allocates,
    may_alias_inputs,
    tensor_inputs,
    torch_module_class,
    write_of,
)

DTYPE_GUARD_KEY = "repfx_dtype_guard"  # node.meta: a cast added by functionalize (see there)


def functionalize(gm: fx.GraphModule) -> None:
    """Rewrite in-place writes to private tensors out of place; mark every other write
    (:data:`repfx.ir.graph.MUTATED_KEY`) with what it may reach. See the module docstring."""
    module_sites: dict[int, list[tuple[fx.Node, bool]]] = {}
    for node in list(gm.graph.nodes):
        write = write_of(gm, node)
        if write is None:
            continue
        private = len(write.targets) == 1 and _is_private(gm, write.targets[0], node)
        if node.op == "call_module" and _flippable(gm, node):
            if private:
                _redirect_later_readers(write.targets[0], node, node)
            module_sites.setdefault(id(module_of(gm, node)), []).append((node, private))
        elif private and write.out_of_place is not None:
            _rewrite_out_of_place(write)
        elif write.unknown_code:
            _mark_unknown_write(gm, write)
        else:
            mark_mutated(gm, [*write.targets, node])
    _settle_inplace_modules(gm, module_sites)
    _mark_live_state(gm)
    gm.graph.lint()
    gm.recompile()


def _flippable(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A ``torch.nn`` module with ``inplace=True`` whose ``inplace=False`` form is exact: not a
    random one (training-mode dropout or RReLU)."""
    m = module_of(gm, node)
    if getattr(m, "inplace", False) is not True or not torch_module_class(m):
        return False
    random = isinstance(m, (nn.modules.dropout._DropoutNd, nn.RReLU)) and m.training
    return not random and not forward_hooks_of(m)


def _settle_inplace_modules(
    gm: fx.GraphModule, sites: dict[int, list[tuple[fx.Node, bool]]]
) -> None:
    """A module is switched to ``inplace=False`` when every call of it writes a private tensor;
    otherwise all its calls stay in place and are marked."""
    for calls in sites.values():
        module = module_of(gm, calls[0][0])
        if all(private for _, private in calls):
            module.inplace = False
            continue
        for node, _ in calls:
            mark_mutated(gm, [*tensor_inputs(node), node])


def _is_private(gm: fx.GraphModule, tensor: fx.Node, writer: fx.Node) -> bool:
    """May ``writer`` write to ``tensor`` with nobody else seeing it? ``tensor`` was allocated
    by one op (or is a view / cast of such a tensor read by nothing else), and every op reading
    it before ``writer`` allocates its own result."""
    if tensor.meta.get(MUTATED_KEY) or tensor.op not in (
        "call_function",
        "call_method",
        "call_module",
    ):
        return False
    earlier = [u for u in tensor.users if u is not writer and u < writer]  # (graph order)
    if any(not (allocates(gm, u) or reads_only_shape(u, tensor)) for u in earlier):
        return False
    if allocates(gm, tensor):
        return True
    source = alias_source(gm, tensor)
    if source is None:
        return False
    readers = [u for u in source.users if not reads_only_shape(u, source)]
    return readers == [tensor] and _is_private(gm, source, tensor)


def _mark_unknown_write(gm: fx.GraphModule, write: Write) -> None:
    """Code repfx does not know may write to each tensor it is given, before its own result
    exists. Marked: the tensors it is given and what may alias them *up to* the call. Not
    marked: the call's result and the nodes after it, which only ever see the values after the
    write (a later write to them is marked in its turn).

    A target private to the call (:func:`_is_private`) that nothing reads after it is
    *handed* over instead (:data:`HANDED_KEY`): nobody else sees what the call does to it, so
    it may be folded like any value, as long as the rewrite computes it into memory of its own.
    A rewrite that would make it an alias of another value (``y * 1`` becoming ``y``), which
    the call's write would then change, is refused at the commit point."""
    node = write.node
    handed = [
        t
        for t in write.targets
        if _is_private(gm, t, node) and not any(u > node for u in t.users)  # (graph order)
    ]
    for tensor in handed:
        tensor.meta[HANDED_KEY] = node.name
    mark_mutated(gm, [t for t in write.targets if t not in handed], until=node)


def _redirect_later_readers(tensor: fx.Node, writer: fx.Node, new: fx.Node) -> None:
    """Every reader of ``tensor`` after ``writer`` reads ``new`` (the value after the write)."""
    for user in list(tensor.users):
        if user is not writer and user is not new and user > writer:  # (graph order)
            user.replace_input_with(tensor, new)


def _rewrite_out_of_place(write: Write) -> None:
    node, target = write.node, write.targets[0]
    graph = node.graph
    meta = {k: v for k, v in node.meta.items() if k != MUTATED_KEY}
    with graph.inserting_before(node):
        new = write.out_of_place()
        if write.guard:  # the in-place result is the cast's; the op's own dtype may be wider
            new.meta.update({k: v for k, v in meta.items() if k not in VALUE_KEYS})
            cast = graph.call_method("type_as", (new, target))
            cast.meta.update(meta)
            cast.meta[DTYPE_GUARD_KEY] = True
            new = cast
        else:
            new.meta.update(meta)
    node.replace_all_uses_with(new)
    _redirect_later_readers(target, node, new)
    graph.erase_node(node)


def mark_mutated(gm: fx.GraphModule, seeds: Iterable[Any], until: fx.Node | None = None) -> None:
    """Mark ``seeds`` and every node that may alias one of them (through views, casts,
    identities, in-place results, unknown code; a ``get_attr`` through every other ``get_attr``
    of the same tensor) with :data:`MUTATED_KEY`; with ``until``, only nodes before it."""
    stack = [n for n in seeds if isinstance(n, fx.Node)]
    marked: set[fx.Node] = set()
    while stack:
        node = stack.pop()
        if node in marked or node.op == "output" or (until is not None and node >= until):
            continue
        marked.add(node)
        node.meta[MUTATED_KEY] = True
        if may_alias_inputs(gm, node):
            stack.extend(node.all_input_nodes)
        stack.extend(u for u in node.users if may_alias_inputs(gm, u))
        if node.op == "get_attr":
            stack.extend(_same_tensor_reads(gm, node))


def _same_tensor_reads(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    value = fetch_attr(gm, node.target)
    return [
        n
        for n in gm.graph.nodes
        if n.op == "get_attr" and n is not node and fetch_attr(gm, n.target) is value
    ]


def _mark_live_state(gm: fx.GraphModule) -> None:
    """A batch or instance norm using batch statistics updates its running statistics on every
    call, and a leaf module may update its own tensors (:func:`.live_state.leaf_state`): any
    other read of those tensors reads a value that changes."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in RUNNING_STATISTICS_FUNCTIONS:
            mean_at, var_at, flag = RUNNING_STATISTICS_FUNCTIONS[node.target]
            if arg_of(node, 5, flag, None) is not False:
                mark_mutated(gm, [arg_of(node, mean_at, "running_mean", None)])
                mark_mutated(gm, [arg_of(node, var_at, "running_var", None)])
    # (by storage: fx records ``bn.running_mean.view(...)``, run eagerly while tracing, as a
    # tensor constant that is a view of the buffer)
    storages = keys_of(leaf_state(gm))
    reads = [n for n in gm.graph.nodes if n.op == "get_attr" and _storage_of(gm, n) in storages]
    mark_mutated(gm, reads)


def _storage_of(gm: fx.GraphModule, node: fx.Node) -> int | None:
    return storage_key(fetch_attr(gm, node.target))
