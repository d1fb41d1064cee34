"""Ranks, dtypes and static shapes of nodes: recorded by shape propagation, or inferred from the
graph's structure.

With example inputs, ``ShapeProp`` metadata, or the fake tensor dynamo / export attach, gives
every node's shape (:data:`VALUE_KEYS`). Without them, :func:`annotate_ranks` infers ranks
structurally (stored under :data:`RANK_KEY`, with the floating flag under :data:`FLOAT_KEY`):
ConvNd / BatchNormNd (N ≥ 2) / poolNd outputs have rank N + 2 (repfx assumes batched inputs
there; :func:`assumed_input_rank` names where, and the folded module checks it on each call),
rank-preserving ops (activations, norms, linear, elementwise arithmetic) keep their input's
rank, ``permute`` / ``view`` / ``reshape`` / ``flatten`` compute it. Anything else is unknown,
and folds that need it are skipped with a reason. Casts (``x.long()``, ``x.to(dtype)``,
``x.view(dtype)``) keep the rank and set the floating flag from the dtype they produce.
:func:`forget_annotations` removes the annotations before a graph is returned.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..norms import NORM_FUNCTIONS, NORM_MODULES
from .constants import ConstantFolder, is_torch_callable
from .modules import fetch_attr, is_plain, module_of

RANK_KEY = "repfx_rank"
FLOAT_KEY = "repfx_float"
# node.meta entries that describe a node's value (shape propagation, dynamo, export)
VALUE_KEYS = ("tensor_meta", "val", "example_value")


def _meta_tensor(node: fx.Node) -> Any:
    """What is recorded about the value of ``node``: ``tensor_meta`` (shape propagation), or the
    fake tensor dynamo / export attach (``val`` / ``example_value``); ``None`` when neither."""
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return meta
    for key in VALUE_KEYS[1:]:
        value = node.meta.get(key)
        if isinstance(value, torch.Tensor):
            return value
    return None


def rank_of(node: Any) -> int | None:
    if not isinstance(node, fx.Node):
        return None
    meta = _meta_tensor(node)
    if meta is not None:
        return len(meta.shape)
    return node.meta.get(RANK_KEY)


def known_dtype(node: Any) -> torch.dtype | None:
    """The dtype of ``node``'s value when shapes were recorded, else ``None``."""
    meta = _meta_tensor(node) if isinstance(node, fx.Node) else None
    return None if meta is None else meta.dtype


class _UnknownOperand(Exception):
    pass


def dtype_on_meta_tensors(node: fx.Node) -> torch.dtype | None:
    """The dtype a torch function / tensor method node computes, found by running it on meta
    tensors with its tensor operands' recorded dtypes and ranks (every size 1, so that any
    broadcast works; ranks matter to type promotion: a 0-d tensor promotes like a scalar).
    ``None`` when an operand's dtype or rank is unknown, or the op does not run on meta."""
    if node.op == "call_function" and not is_torch_callable(node.target):
        return None
    if node.op not in ("call_function", "call_method"):
        return None

    def on_meta(arg: fx.Node) -> torch.Tensor:
        dtype, rank = known_dtype(arg), rank_of(arg)
        if dtype is None or rank is None:
            raise _UnknownOperand
        return torch.empty((1,) * rank, dtype=dtype, device="meta")

    try:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), on_meta)
        if node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            out = node.target(*args, **kwargs)
    except Exception:  # an unknown operand, or an op meta tensors do not support
        return None
    return out.dtype if isinstance(out, torch.Tensor) else None


def is_floating(node: Any) -> bool:
    """True only when ``node`` is known to be a floating-point tensor (recorded dtype, or the
    structural flag :data:`FLOAT_KEY`); unknown is ``False``."""
    if not isinstance(node, fx.Node):
        return False
    dtype = known_dtype(node)
    if dtype is not None:
        return dtype.is_floating_point
    return bool(node.meta.get(FLOAT_KEY, False))


def static_shape(node: Any) -> tuple[int, ...] | None:
    """The recorded shape of ``node`` when every dim is a plain int (not symbolic)."""
    meta = _meta_tensor(node) if isinstance(node, fx.Node) else None
    if meta is None or not all(type(d) is int for d in meta.shape):
        return None
    return tuple(meta.shape)


_FIXED_RANK_MODULES: tuple[tuple[type, int], ...] = (
    (nn.Conv1d, 3),
    (nn.Conv2d, 4),
    (nn.Conv3d, 5),
    (nn.ConvTranspose1d, 3),
    (nn.ConvTranspose2d, 4),
    (nn.ConvTranspose3d, 5),
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
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    *NORM_MODULES,
)
_RANK_PRESERVING_MODULES = (
    nn.Linear,
    *NORM_MODULES,
    nn.BatchNorm1d,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
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
    *NORM_FUNCTIONS,
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
_FLOAT_FUNCS = {F.gelu, *NORM_FUNCTIONS, F.batch_norm, F.linear, F.conv1d, F.conv2d}
_CONV_FUNC_RANKS = {F.conv1d: 3, F.conv2d: 4, F.conv3d: 5}

# Casts keep the rank; the value is floating exactly when the dtype they produce is.
_CAST_DTYPES: dict[str, torch.dtype] = {
    "float": torch.float32,
    "double": torch.float64,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "long": torch.int64,
    "int": torch.int32,
    "short": torch.int16,
    "char": torch.int8,
    "byte": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_ARG_METHODS = {"to", "type", "view"}  # x.to(dtype), x.type(dtype), x.view(dtype)


def annotate_ranks(gm: fx.GraphModule) -> None:
    """Store a structurally inferred rank (and whether the value is floating) on every node.

    Constant expressions (``gamma.unsqueeze(-1)``, ``gamma[:, None, None]``) get their value's.
    Inference never fails: what cannot be inferred (symbolic shape arithmetic, unknown ops) is
    unknown (``None``, not floating).
    """
    consts = ConstantFolder(gm)
    for node in gm.graph.nodes:
        value = consts.value(node)
        if value is not None:
            rank, is_float = value.dim(), value.is_floating_point()
        else:
            rank, is_float = _infer(gm, node)
        node.meta[RANK_KEY] = rank if type(rank) is int else None
        node.meta[FLOAT_KEY] = bool(is_float)


def forget_annotations(module: nn.Module) -> None:
    """Remove what :func:`annotate_ranks` stored from every graph in ``module``'s tree: the
    annotations serve the passes, and a returned graph's ``node.meta`` holds no repfx keys."""
    for gm in module.modules():
        if isinstance(gm, fx.GraphModule):
            for node in gm.graph.nodes:
                node.meta.pop(RANK_KEY, None)
                node.meta.pop(FLOAT_KEY, None)


def assumed_input_rank(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """The rank inference takes ``node``'s first input to have without knowing it: a ConvNd /
    BatchNormNd / poolNd module or ``F.convNd`` reads a *batch* (rank N + 2), though torch also
    accepts an unbatched input (rank N + 1) that reads the channel axis elsewhere. ``None``
    for other nodes."""
    if node.op == "call_module":
        m = module_of(gm, node)
        return next((rank for base, rank in _FIXED_RANK_MODULES if is_plain(m, base)), None)
    if node.op == "call_function" and node.target in _CONV_FUNC_RANKS:
        return _CONV_FUNC_RANKS[node.target]
    return None


def _infer(gm: fx.GraphModule, node: fx.Node) -> tuple[int | None, bool]:
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    in_float = any(n.meta.get(FLOAT_KEY, False) for n in node.all_input_nodes)
    if node.op == "get_attr":
        value = fetch_attr(gm, node.target)
        if isinstance(value, torch.Tensor):
            return value.dim(), value.is_floating_point()
        return None, False
    if node.op == "call_module":
        return _infer_module(module_of(gm, node), first, in_float)
    if node.op == "call_function":
        return _infer_function(node, first, in_float)
    if node.op == "call_method" and isinstance(node.target, str):
        return _infer_method(node, first, in_float)
    return None, False


def _infer_module(m: nn.Module, first: fx.Node | None, in_float: bool) -> tuple[int | None, bool]:
    """Modules that provably are the ``torch.nn`` class they derive from (:func:`is_plain`)."""
    is_float = is_plain(m, _FLOAT_MODULES) or in_float
    for base, rank in _FIXED_RANK_MODULES:
        if is_plain(m, base):
            return rank, is_float  # batched input assumed
    if is_plain(m, _RANK_PRESERVING_MODULES):
        return rank_of(first), is_float
    if is_plain(m, nn.Flatten):
        return _flatten_rank(rank_of(first), m.start_dim, m.end_dim), is_float
    return None, False


def _infer_function(
    node: fx.Node, first: fx.Node | None, in_float: bool
) -> tuple[int | None, bool]:
    target = node.target
    if target in _CONV_FUNC_RANKS:
        return _CONV_FUNC_RANKS[target], True
    if target in _ELEMENTWISE_FUNCS:
        return _max_rank(node), in_float or target in _FLOAT_FUNCS
    if target is torch.flatten:
        start = arg_of(node, 1, "start_dim", 0)
        end = arg_of(node, 2, "end_dim", -1)
        return _flatten_rank(rank_of(first), start, end), in_float
    if target in _REDUCTIONS:
        return _reduced_rank(node, rank_of(first)), in_float
    if target is torch.permute:
        return _shape_arg_len(node), in_float
    return None, False


def _infer_method(node: fx.Node, first: fx.Node | None, in_float: bool) -> tuple[int | None, bool]:
    target = node.target
    cast = _cast_result(node, first)
    if cast is not None:
        return rank_of(first), cast
    if target in _ELEMENTWISE_METHODS:
        return _max_rank(node), in_float
    if target in ("permute", "view", "reshape"):
        return _shape_arg_len(node), in_float
    if target in _REDUCTIONS:
        return _reduced_rank(node, rank_of(first)), in_float
    if target == "transpose":
        return rank_of(first), in_float
    if target == "flatten":
        start = arg_of(node, 1, "start_dim", 0)
        end = arg_of(node, 2, "end_dim", -1)
        return _flatten_rank(rank_of(first), start, end), in_float
    return None, False


def _max_rank(node: fx.Node) -> int | None:
    ranks = [rank_of(n) for n in node.all_input_nodes]
    return None if not ranks or None in ranks else max(ranks)


def dtype_argument(node: fx.Node) -> Any:
    """The dtype a ``view`` / ``to`` / ``type`` call converts to: a ``torch.dtype``, a node that
    may be one (``x.to(y.dtype)``, ``x.to(y)``), or ``None`` when it certainly converts to none
    (``x.view(2, 3)``, ``x.to("cpu")``)."""
    if node.op != "call_method" or node.target not in _DTYPE_ARG_METHODS:
        return None
    if "dtype" in node.kwargs:
        return node.kwargs["dtype"]
    args = node.args[1:]
    if node.target == "view":
        if len(args) == 1 and not isinstance(args[0], (int, tuple, list, torch.Size)):
            return args[0]  # a dtype, or a node that may be one
        return None
    for arg in args:
        if isinstance(arg, (torch.dtype, fx.Node)):
            return arg
    return None


def _cast_result(node: fx.Node, first: fx.Node | None) -> bool | None:
    """Is the result of a cast floating? ``None`` when ``node`` is not a cast."""
    target = node.target
    if target in _CAST_DTYPES:
        return _CAST_DTYPES[target].is_floating_point
    if target == "type_as" and len(node.args) == 2:
        return is_floating(node.args[1])
    if target not in _DTYPE_ARG_METHODS or (target == "type" and len(node.args) == 1):
        return None  # not a cast (x.type() is the type's name, not a tensor)
    dtype = dtype_argument(node)
    if dtype is None:
        # x.view(sizes) is no cast; x.to("cpu") keeps the dtype; x.type("torch.HalfTensor")
        # converts to a dtype named by a string: unknown
        return None if target == "view" else is_floating(first) if target == "to" else False
    if isinstance(dtype, torch.dtype):
        return dtype.is_floating_point
    if isinstance(dtype, fx.Node) and known_dtype(dtype) is not None:
        return is_floating(dtype)  # x.to(other_tensor)
    return False  # converts to a dtype known only at run time


_REDUCTIONS = {torch.mean, torch.sum, torch.amax, "mean", "sum", "amax"}


def _reduced_rank(node: fx.Node, rank: int | None) -> int | None:
    """Rank after ``x.mean(dims, keepdim)`` and friends."""
    dims = arg_of(node, 1, "dim", None)
    keepdim = arg_of(node, 2, "keepdim", False)
    if type(rank) is not int or not isinstance(keepdim, bool):
        return None
    dims = (dims,) if type(dims) is int else dims
    if not isinstance(dims, (tuple, list)) or not dims or any(type(d) is not int for d in dims):
        return None
    if keepdim:
        return rank
    return rank - len({d % rank for d in dims}) if rank > 0 else None


def arg_of(node: fx.Node, index: int, name: str, default: Any) -> Any:
    """Argument ``index`` of a call, or its keyword ``name``, or ``default``."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _flatten_rank(rank: int | None, start: Any, end: Any) -> int | None:
    if type(rank) is not int or type(start) is not int or type(end) is not int:
        return None
    if rank == 0:
        return 1  # flattening a 0-d tensor gives a 1-d one
    start, end = start % rank, end % rank
    return rank - (end - start) if start <= end else None


def _shape_arg_len(node: fx.Node) -> int | None:
    """Rank produced by ``x.view(a, b, c)`` / ``x.view((a, b, c))`` / ``x.permute(...)``."""
    dims = node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    elif len(dims) == 1 and isinstance(dims[0], fx.Node):
        return None  # a shape computed at run time
    if any(isinstance(d, torch.dtype) for d in dims):
        return None
    return len(dims) or None
