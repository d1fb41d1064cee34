"""Graph utilities shared by views and passes: module lookup, constants, ranks, use counts.

Ranks: with example inputs, ``ShapeProp`` metadata gives every node's shape. Without them,
:func:`annotate_ranks` infers ranks structurally: ConvNd / BatchNormNd (N ≥ 2) / poolNd outputs
have rank N + 2 (repfx assumes batched inputs there — pass example inputs to have this
checked), rank-preserving ops (activations, norms, linear, elementwise arithmetic) keep their
input's rank, ``permute`` / ``view`` / ``reshape`` / ``flatten`` compute it. Anything else is
unknown, and folds that need it are skipped with a reason.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

RANK_KEY = "repfx_rank"
FLOAT_KEY = "repfx_float"


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    return gm.get_submodule(node.target)


def has_hooks(module: nn.Module) -> bool:
    """Hooks observe (and may change) a module's inputs and outputs: such a module is never
    rewritten or removed, since its hooks would then see different values."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or getattr(module, "_forward_hooks_with_kwargs", None)
    )


def where(node: fx.Node) -> str:
    """A readable location: the module path of the op, and the node name for functions."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = next(reversed(stack.values()))[0]
        if path:
            return f"{path}:{node.name}"
    return node.name


# ----------------------------------------------------------------------------- constants


class ConstantFolder:
    """Evaluates nodes that depend only on module attributes (``get_attr``), e.g.
    ``self.gamma[:, None, None]`` or ``self.gamma.view(1, -1, 1, 1)``.

    Results are memoised, except a ``get_attr``'s own value, which is always re-read: passes
    overwrite an attribute in place only when its single reader is the op being rewritten
    (``repfx.rewrite.set_slot``), so no memoised derived value can go stale, and whether a node
    is constant never changes. One folder serves a pass from start to end.
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self._cache: dict[fx.Node, torch.Tensor | None] = {}

    def value(self, arg: Any) -> torch.Tensor | None:
        if not isinstance(arg, fx.Node):
            return None
        if arg.op == "get_attr":
            return self._evaluate(arg)
        # Inputs first, iteratively (a long chain must not exhaust the Python stack), and only
        # until one is known not to be constant.
        stack = [arg]
        while stack:
            node = stack[-1]
            if node in self._cache:
                stack.pop()
                continue
            if node.op in ("call_function", "call_method"):
                inputs = node.all_input_nodes
                if any(n not in self._cache and n.op != "get_attr" for n in inputs):
                    known_none = any(self._cache.get(n, 0) is None for n in inputs)
                    if not known_none:
                        stack.append(
                            next(n for n in inputs if n not in self._cache and n.op != "get_attr")
                        )
                        continue
            self._cache[node] = self._evaluate(node)
            stack.pop()
        return self._cache[arg]

    def is_constant(self, arg: Any) -> bool:
        return self.value(arg) is not None

    def _evaluate(self, node: fx.Node) -> torch.Tensor | None:
        if node.op == "get_attr":
            value = _fetch_attr(self.gm, node.target)
            return value if isinstance(value, torch.Tensor) else None
        if node.op not in ("call_function", "call_method"):
            return None
        inputs = node.all_input_nodes
        if not inputs:
            return None  # e.g. torch.ones(...) factories: not worth folding
        values = {
            n: self._evaluate(n) if n.op == "get_attr" else self._cache.get(n) for n in inputs
        }
        if any(v is None for v in values.values()):
            return None
        args = fx.node.map_arg(node.args, values.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, values.__getitem__)
        try:
            with torch.no_grad():
                if node.op == "call_method":
                    out = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    out = node.target(*args, **kwargs)
        except Exception:
            return None
        return out if isinstance(out, torch.Tensor) else None


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def owner_and_name(gm: fx.GraphModule, target: str) -> tuple[nn.Module, str]:
    path, _, name = target.rpartition(".")
    return (gm.get_submodule(path) if path else gm), name


# ----------------------------------------------------------------------------- use counts


def tensor_use_counts(gm: fx.GraphModule, consts: ConstantFolder) -> Counter[int]:
    """How many call sites read each parameter / buffer (keyed by ``id(tensor)``).

    A module called twice counts each of its tensors twice; a ``get_attr`` counts once per
    non-constant op that consumes it, directly or through constant expressions such as
    ``gamma.view(1, -1, 1, 1)``.
    """
    uses: Counter[int] = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            for t in _module_tensors(module_of(gm, node)):
                uses[id(t)] += 1
        elif node.op == "get_attr":
            value = _fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                uses[id(value)] += max(1, len(consumers_through_constants(node, consts)))
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
            out.append(_fetch_attr(consts.gm, n.target))
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


# ----------------------------------------------------------------------------- ranks


def rank_of(node: Any) -> int | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return len(meta.shape)
    return node.meta.get(RANK_KEY)


_FIXED_RANK_MODULES: tuple[tuple[type, int], ...] = (
    (nn.BatchNorm2d, 4),
    (nn.BatchNorm3d, 5),
    (nn.MaxPool1d, 3),
    (nn.MaxPool2d, 4),
    (nn.MaxPool3d, 5),
    (nn.AvgPool1d, 3),
    (nn.AvgPool2d, 4),
    (nn.AvgPool3d, 5),
    (nn.AdaptiveAvgPool1d, 3),
    (nn.AdaptiveAvgPool2d, 4),
    (nn.AdaptiveAvgPool3d, 5),
)
_FLOAT_MODULES = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
)
_RANK_PRESERVING_MODULES = (
    nn.Linear,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.Identity,
    nn.modules.dropout._DropoutNd,
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.Mish,
    nn.ELU,
    nn.PReLU,
    nn.Softmax,
)
_ELEMENTWISE_FUNCS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.addcmul,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    F.relu,
    F.gelu,
    F.silu,
    F.hardswish,
    F.hardsigmoid,
    F.layer_norm,
    F.group_norm,
    F.batch_norm,
    F.linear,
    F.dropout,
    F.softmax,
    F.leaky_relu,
    F.mish,
}
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "addcmul", "relu", "sigmoid", "tanh", "contiguous", "softmax",
    "clone", "mul_", "add_", "sub_", "div_", "neg",
}  # fmt: skip
_FLOAT_FUNCS = {F.gelu, F.layer_norm, F.group_norm, F.batch_norm, F.linear, F.conv1d, F.conv2d}


def annotate_ranks(gm: fx.GraphModule) -> None:
    """Store a structurally inferred rank (and whether the value is floating) on every node.

    Constant expressions (``gamma.unsqueeze(-1)``, ``gamma[:, None, None]``) get their value's.
    """
    consts = ConstantFolder(gm)
    for node in gm.graph.nodes:
        value = consts.value(node)
        if value is not None:
            rank, is_float = value.dim(), value.is_floating_point()
        else:
            rank, is_float = _infer(gm, node)
        node.meta[RANK_KEY] = rank
        node.meta[FLOAT_KEY] = is_float


def _infer(gm: fx.GraphModule, node: fx.Node) -> tuple[int | None, bool]:
    inputs = [n for n in node.all_input_nodes]
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    in_float = any(n.meta.get(FLOAT_KEY, False) for n in inputs)
    if node.op == "get_attr":
        value = _fetch_attr(gm, node.target)
        if isinstance(value, torch.Tensor):
            return value.dim(), value.is_floating_point()
        return None, False
    if node.op == "call_module":
        m = module_of(gm, node)
        is_float = isinstance(m, _FLOAT_MODULES) or in_float
        if isinstance(m, nn.modules.conv._ConvNd):
            return len(m.kernel_size) + 2, is_float  # batched input assumed
        for base, rank in _FIXED_RANK_MODULES:
            if isinstance(m, base):
                return rank, is_float
        if isinstance(m, _RANK_PRESERVING_MODULES):
            return rank_of(first), is_float
        if isinstance(m, nn.Flatten):
            return _flatten_rank(rank_of(first), m.start_dim, m.end_dim), is_float
        return None, False
    if node.op == "call_function":
        if node.target in (F.conv1d, F.conv2d, F.conv3d):
            return {F.conv1d: 3, F.conv2d: 4, F.conv3d: 5}[node.target], True
        if node.target in _ELEMENTWISE_FUNCS:
            ranks = [rank_of(n) for n in inputs]
            known = None if not ranks or None in ranks else max(ranks)
            return known, in_float or node.target in _FLOAT_FUNCS
        if node.target is torch.flatten:
            start = _get(node, 1, "start_dim", 0)
            end = _get(node, 2, "end_dim", -1)
            return _flatten_rank(rank_of(first), start, end), in_float
        if node.target in _REDUCTIONS:
            return _reduced_rank(node, rank_of(first)), in_float
        if node.target in (torch.permute,):
            return _shape_arg_len(node), in_float
        return None, False
    if node.op == "call_method":
        if node.target in _ELEMENTWISE_METHODS:
            ranks = [rank_of(n) for n in inputs]
            return (None if None in ranks else max(ranks, default=None)), in_float
        if node.target in ("permute", "view", "reshape"):
            return _shape_arg_len(node), in_float
        if node.target in _REDUCTIONS:
            return _reduced_rank(node, rank_of(first)), in_float
        if node.target == "transpose":
            return rank_of(first), in_float
        if node.target == "flatten":
            start = _get(node, 1, "start_dim", 0)
            end = _get(node, 2, "end_dim", -1)
            return _flatten_rank(rank_of(first), start, end), in_float
    return None, False


_REDUCTIONS = {torch.mean, torch.sum, torch.amax, "mean", "sum", "amax"}


def _reduced_rank(node: fx.Node, rank: int | None) -> int | None:
    """Rank after ``x.mean(dims, keepdim)`` and friends."""
    dims = _get(node, 1, "dim", None)
    keepdim = _get(node, 2, "keepdim", False)
    if rank is None or dims is None or not isinstance(keepdim, bool):
        return None
    if keepdim:
        return rank
    return rank - (len(dims) if isinstance(dims, (tuple, list)) else 1)


def _get(node: fx.Node, index: int, name: str, default: Any) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _flatten_rank(rank: int | None, start: Any, end: Any) -> int | None:
    if rank is None or not isinstance(start, int) or not isinstance(end, int):
        return None
    start, end = start % rank, end % rank
    return rank - (end - start)


def _shape_arg_len(node: fx.Node) -> int | None:
    """Rank produced by ``x.view(a, b, c)`` / ``x.view((a, b, c))`` / ``x.permute(...)``."""
    dims = node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    elif len(dims) == 1 and isinstance(dims[0], fx.Node):
        return None  # a shape computed at run time
    return len(dims) or None


_SHAPE_METHODS = {"size", "dim"}
_SHAPE_LIKE_METHODS = {"reshape_as", "view_as", "expand_as"}


def reads_only_shape(user: fx.Node, node: fx.Node) -> bool:
    """True when ``user`` reads nothing of ``node`` but its shape (``x.shape``, ``x.size()``,
    ``y.reshape_as(x)``): such a use survives any rewrite that keeps ``node``'s shape."""
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
