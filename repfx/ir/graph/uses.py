"""Who reads what: call sites per parameter / buffer and per module, and a node's users by what
they read.

A rewrite may change a module or a tensor in place only when nothing else reads it: a pass
counts the call sites once, when it starts (:func:`tensor_use_counts`, a :class:`TensorUses`
keyed by the tensors themselves; :func:`module_call_counts`). :func:`value_users` and
:func:`shape_users` split a node's users into those that read its values and those that read
only its shape, a use that survives any rewrite keeping the shape.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx, nn

from .constants import ConstantFolder
from .guards import is_guard
from .modules import fetch_attr, module_of


class TensorUses:
    """Call sites per parameter / buffer, keyed by the tensor itself (its identity, not its
    value); a tensor never counted has none. The tensors counted are held here, so that no
    tensor created while the counts are in use can take a counted one's ``id``."""

    def __init__(self) -> None:
        self._counts: dict[int, tuple[torch.Tensor, int]] = {}

    def add(self, tensor: torch.Tensor, uses: int = 1) -> None:
        _, before = self._counts.get(id(tensor), (tensor, 0))
        self._counts[id(tensor)] = (tensor, before + uses)

    def __getitem__(self, tensor: torch.Tensor) -> int:
        held, uses = self._counts.get(id(tensor), (None, 0))
        return uses if held is tensor else 0


def tensor_use_counts(gm: fx.GraphModule, consts: ConstantFolder) -> TensorUses:
    """How many call sites read each parameter / buffer.

    A module called twice counts each of its tensors twice; a ``get_attr`` counts once per
    non-constant op that consumes it, directly or through constant expressions such as
    ``gamma.view(1, -1, 1, 1)``.
    """
    uses = TensorUses()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            for t in _module_tensors(module_of(gm, node)):
                uses.add(t)
        elif node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                uses.add(value, max(1, len(consumers_through_constants(node, consts))))
    return uses


def consumers_through_constants(node: fx.Node, consts: ConstantFolder) -> list[fx.Node]:
    """The non-constant nodes that read ``node``, looking through constant expressions."""
    found: list[fx.Node] = []
    stack = list(node.users)
    while stack:
        user = stack.pop()
        if consts.is_constant(user):
            stack.extend(user.users)
        elif user not in found:
            found.append(user)
    return found


def attr_tensors_read_by(node: fx.Node, consts: ConstantFolder) -> list[torch.Tensor]:
    """The module tensors that a ``call_function`` / ``call_method`` node reads through its
    constant inputs."""
    out: list[torch.Tensor] = []
    stack = [n for n in node.all_input_nodes if consts.is_constant(n)]
    while stack:
        n = stack.pop()
        if n.op == "get_attr":
            out.append(fetch_attr(consts.gm, n.target))
        else:
            stack.extend(n.all_input_nodes)
    return out


def _module_tensors(m: nn.Module) -> list[torch.Tensor]:
    return [*m.parameters(), *(b for b in m.buffers() if b is not None)]


def module_call_counts(gm: fx.GraphModule) -> Counter[str]:
    """Call sites per module object (keyed by the node target of its first path)."""
    by_id: Counter[int] = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            by_id[id(module_of(gm, node))] += 1
    counts: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = by_id[id(module_of(gm, node))]
    return counts


# --------------------------------------------------------------- users by what they read

_SHAPE_METHODS = {"size", "dim"}
_SHAPE_LIKE_METHODS = {"reshape_as", "view_as", "expand_as"}


def reads_only_shape(user: fx.Node, node: fx.Node) -> bool:
    """True when ``user`` reads nothing of ``node`` but its shape (``x.shape``, ``x.size()``,
    ``y.reshape_as(x)``, a rank guard): such a use survives any rewrite that keeps ``node``'s
    shape."""
    if is_guard(user):
        return user.args[0] is node and node not in user.args[1:]
    if user.op == "call_function" and user.target is getattr:
        return user.args[0] is node and user.args[1:] in (("shape",), ("ndim",))
    if user.op == "call_method" and user.target in _SHAPE_METHODS:
        return user.args[0] is node
    if user.op == "call_method" and user.target in _SHAPE_LIKE_METHODS:
        return user.args[0] is not node and all(a is node for a in user.args[1:])
    return False


def shape_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read only its shape."""
    return [u for u in node.users if reads_only_shape(u, node)]


def value_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values (not only its shape)."""
    return [u for u in node.users if not reads_only_shape(u, node)]
