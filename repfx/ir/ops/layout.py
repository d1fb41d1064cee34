"""Layout views: ops that only move data, and where a channel axis goes through them.

:func:`layout_source_axis` recognises ``flatten``, ``permute``, ``transpose``, ``view``,
``reshape`` (methods, and the ``torch.`` functions), ``contiguous``, basic indexing
(``x[:, :H, :W, :]``, a crop that takes the channel axis whole) and its ATen spellings in an
exported graph (``aten.slice.Tensor``, ``aten.alias``), and maps the channel
axis of the output back to the axis of the input that holds it whole (counted from the right);
a per-channel affine then commutes with the op: ``a(layout(x)) = layout(a'(x))``. Layout ops
only move data: ``x.view(dtype)`` (a bitcast, which reinterprets the bits) and casts are not
layout ops, and a ``view`` / ``reshape`` is read only where the shapes are known.
"""

from __future__ import annotations

import math
import operator
import sys
from typing import Any

import torch
from torch import fx

from ..graph import arg_of, dtype_argument, known_dtype, rank_of, static_shape
from .operands import MISSING

_LAYOUT_METHODS = {"flatten", "permute", "transpose", "contiguous", "view", "reshape"}
_LAYOUT_FUNCS = {
    torch.flatten: "flatten",
    torch.permute: "permute",
    torch.transpose: "transpose",
    torch.reshape: "reshape",
}
_ATEN_LAYOUT = {torch.ops.aten.slice.Tensor: "slice", torch.ops.aten.alias.default: "contiguous"}
_SIZE_METHODS = {"size"}  # a node that certainly holds sizes (not a dtype)


def layout_source_axis(
    node: fx.Node, axis: int | None
) -> fx.Node | tuple[fx.Node, int | None] | None:
    """If ``node`` only moves data (flatten / permute / transpose / view / reshape /
    contiguous) and keeps the channel ``axis`` of its output intact, return ``(input, axis)``
    with the axis in the input's coordinates (counted from the right). ``None`` otherwise —
    in particular for ``x.view(dtype)`` (a bitcast: it reinterprets the bits) and for casts.

    A per-channel affine then commutes with ``node``: ``a(layout(x)) = layout(a'(x))``.
    """
    kind = _layout_kind(node, axis)
    if kind is None:
        return None
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node) or not _moves_data_only(node, kind, x):
        return None
    if axis is None or kind == "contiguous":
        return x, axis
    r_in, r_out = rank_of(x), rank_of(node)
    if r_in is None or r_out is None or not 0 <= axis + r_out < r_out or r_in == 0:
        return None
    pos = axis + r_out  # positive axis in the output
    source = _source_position(node, kind, pos, r_in, r_out)
    return None if source is None else (x, source - r_in)


def _layout_kind(node: fx.Node, axis: int | None) -> str | None:
    if node.op == "call_method" and node.target in _LAYOUT_METHODS:
        return node.target
    if node.op == "call_function" and node.target in _LAYOUT_FUNCS:
        return _LAYOUT_FUNCS[node.target]
    if node.op == "call_function" and node.target is operator.getitem and axis is not None:
        return "getitem"  # (a crop: only with the channel axis known, and taken whole)
    if node.op == "call_function" and node.target in _ATEN_LAYOUT:
        kind = _ATEN_LAYOUT[node.target]
        return kind if kind != "slice" or axis is not None else None  # (a crop, as getitem)
    return None


def _moves_data_only(node: fx.Node, kind: str, x: fx.Node) -> bool:
    """Not a bitcast: no dtype argument (or a node that may be one), and the same dtype out as
    in where both are known."""
    in_dtype, out_dtype = known_dtype(x), known_dtype(node)
    if in_dtype is not None and out_dtype is not None and in_dtype != out_dtype:
        return False
    if kind == "view" and dtype_argument(node) is not None:
        args = node.args[1:]
        single_size = len(args) == 1 and _holds_sizes(args[0])
        return single_size and "dtype" not in node.kwargs
    return True


def _holds_sizes(arg: Any) -> bool:
    """Is ``arg`` a node that certainly evaluates to sizes (``x.shape``, ``x.size()``)?"""
    if not isinstance(arg, fx.Node):
        return False
    if arg.op == "call_function" and arg.target is getattr:
        return arg.args[1:] == ("shape",)
    return arg.op == "call_method" and arg.target in _SIZE_METHODS and len(arg.args) == 1


def _source_position(node: fx.Node, kind: str, pos: int, r_in: int, r_out: int) -> int | None:
    """The axis of the input (counted from the left) that output axis ``pos`` of the layout op
    ``node`` holds whole; ``None`` when it holds no single input axis, or that is unknown."""
    if kind == "permute":
        return _permute_source(node, pos, r_in, r_out)
    if kind == "transpose":
        return _transpose_source(node, pos, r_in)
    if kind == "flatten":
        return _flatten_source(node, pos, r_in)
    if kind == "getitem":
        return _getitem_source(node, pos, r_in)
    if kind == "slice":
        return _slice_source(node, pos, r_in)
    return _reshape_source(node, pos)


def _permute_source(node: fx.Node, pos: int, r_in: int, r_out: int) -> int | None:
    """``x.permute(*dims)`` / ``x.permute(dims)``: output axis ``pos`` is input axis
    ``dims[pos]``."""
    args = node.args[1:]
    dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
    if len(dims) != r_out or type(dims[pos]) is not int:
        return None
    return dims[pos] % r_in


def _transpose_source(node: fx.Node, pos: int, r_in: int) -> int | None:
    """``x.transpose(dim0, dim1)`` swaps the two axes and keeps the others in place."""
    d0, d1 = arg_of(node, 1, "dim0", MISSING), arg_of(node, 2, "dim1", MISSING)
    if type(d0) is not int or type(d1) is not int:
        return None
    d0, d1 = d0 % r_in, d1 % r_in
    return d1 if pos == d0 else d0 if pos == d1 else pos


def _flatten_source(node: fx.Node, pos: int, r_in: int) -> int | None:
    """``x.flatten(start, end)`` keeps the axes outside ``start..end`` whole, and the merged one
    only when it merges a single axis."""
    start, end = arg_of(node, 1, "start_dim", 0), arg_of(node, 2, "end_dim", -1)
    if type(start) is not int or type(end) is not int:
        return None
    start, end = start % r_in, end % r_in
    if pos < start:
        return pos
    if pos > start:
        return pos + (end - start)
    return pos if start == end else None


def _getitem_source(node: fx.Node, pos: int, r_in: int) -> int | None:
    """``x[index]`` with basic indexing (slices, integers, ``None``, ``...``): output axis
    ``pos`` is the input axis it comes from when the index takes that axis whole (``:``) —
    a crop of the other axes (``x[:, :H, :W, :]``) keeps every channel."""
    entries = _basic_index(node.args[1], r_in)
    if entries is None:
        return None
    axis_in = axis_out = 0
    for entry in entries:
        if entry is None:  # a new axis of size 1
            axis_out += 1
            continue
        if axis_out == pos and type(entry) is slice:
            whole = entry == slice(None) or entry == slice(None, None, 1)
            return axis_in if whole else None
        axis_in += 1
        axis_out += type(entry) is slice  # (an integer removes its axis)
    return None


def _slice_source(node: fx.Node, pos: int, r_in: int) -> int | None:
    """``aten.slice.Tensor(x, dim, start, end, step)`` (``x[..., start:end:step]`` on ``dim``
    under torch.export) keeps every axis in place, and takes axis ``dim`` whole when it runs
    from 0 to at least its size in steps of 1."""
    dim = arg_of(node, 1, "dim", 0)
    start, end = arg_of(node, 2, "start", None), arg_of(node, 3, "end", None)
    if type(dim) is not int:
        return None
    if pos != dim % r_in:
        return pos
    size = _size_at(node.args[0], pos)
    whole_end = end is None or (type(end) is int and (end >= sys.maxsize or end == size))
    return pos if start in (None, 0) and arg_of(node, 4, "step", 1) == 1 and whole_end else None


def _size_at(x: Any, pos: int) -> int | None:
    shape = static_shape(x) if isinstance(x, fx.Node) else None
    return shape[pos] if shape is not None and type(shape[pos]) is int else None


def _basic_index(index: Any, r_in: int) -> list[Any] | None:
    """A basic index as one entry per input axis (``...`` and the missing trailing axes
    become ``:``), ``None`` entries for new axes; ``None`` for advanced indexing (tensors,
    lists, booleans) or an index longer than the input's rank."""
    index = index if isinstance(index, tuple) else (index,)
    if not all(i is None or i is Ellipsis or type(i) in (int, slice) for i in index):
        return None
    consuming = sum(1 for i in index if i is not None and i is not Ellipsis)
    if index.count(Ellipsis) > 1 or consuming > r_in:
        return None
    entries: list[Any] = []
    for i in index:
        entries += [slice(None)] * (r_in - consuming) if i is Ellipsis else [i]
    return entries + [slice(None)] * (r_in - sum(1 for i in entries if i is not None))


def _reshape_source(node: fx.Node, pos: int) -> int | None:
    """``x.view(sizes)`` / ``x.reshape(sizes)``, only with known shapes: output axis ``pos``
    holds input axis ``j`` whole when both have the same size and as many elements before them
    (row-major order: an element's index on that axis is then the same in both) — the axes
    around it may be split or merged (``(B, C, H·W)`` → ``(B, C, H, W)``)."""
    s_in, s_out = static_shape(node.args[0]), static_shape(node)
    if s_in is None or s_out is None or 0 in (*s_in, *s_out):
        return None
    before, size = math.prod(s_out[:pos]), s_out[pos]
    for j, d in enumerate(s_in):
        if math.prod(s_in[:j]) == before and d == size:
            return j
    return None
