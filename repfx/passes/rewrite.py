"""Graph surgery used by every pass: replace a view's tensors, insert an affine, prune.

The graph module being rewritten is always repfx's own copy of the user's model, so its
modules may be updated in place — but only after the pass has checked that the module or
tensor has a single call site (see ``repfx.ir.graph.tensor_use_counts``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import fx, nn

from ..algebra import ChannelAffine, ConvKernel
from ..errors import Error
from ..ir.graph import (
    FLOAT_KEY,
    RANK_KEY,
    fetch_attr,
    module_of,
    owner_and_name,
    shape_users,
    where,
)
from ..ir.ops import Slot

_COMMIT_KEY = "repfx_commit_open"  # gm.meta: a commit is applying its rewrite now


class GraphSurgeryError(Error, RuntimeError):
    """Graph surgery outside the commit point (a repfx bug)."""


@contextmanager
def committing(gm: fx.GraphModule) -> Iterator[None]:
    """Mark ``gm`` as being changed by a commit (the primitives below require it)."""
    gm.meta[_COMMIT_KEY] = True
    try:
        yield
    finally:
        gm.meta.pop(_COMMIT_KEY, None)


def require_commit(gm: fx.GraphModule) -> None:
    """Raise unless a commit is open: graph surgery outside the commit point is a bug."""
    if not gm.meta.get(_COMMIT_KEY):
        raise GraphSurgeryError("the graph was changed outside FoldContext.commit (a repfx bug)")


class RewriteRefused(Exception):
    """Raised inside a rewrite that turns out not to be representable (a folded constant
    overflows the model's dtype): the commit point undoes it and reports ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _as_parameter(value: torch.Tensor, like: torch.Tensor | None = None) -> nn.Parameter:
    return nn.Parameter(_stored(value, like), requires_grad=False)


def _stored(value: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """A fresh copy of ``value`` laid out as the tensor it replaces (``like``), else contiguous.

    Fold arithmetic may leave odd strides (an einsum's result can come out channels-last), and
    a weight's memory format decides its conv's output format: one stray channels-last weight
    turns every later activation channels-last.
    """
    value = _finite(value).detach()
    fmt = torch.contiguous_format
    if like is not None and like.shape == value.shape and not like.is_contiguous():
        for candidate in (torch.channels_last, torch.channels_last_3d):
            if like.dim() == (4 if candidate is torch.channels_last else 5) and like.is_contiguous(
                memory_format=candidate
            ):
                fmt = candidate
    return value.clone(memory_format=fmt)


def _finite(value: torch.Tensor) -> torch.Tensor:
    """``value``, if its folded entries are representable in its dtype."""
    if value.is_floating_point() and not all_finite(value):
        raise RewriteRefused(f"a folded constant overflows {value.dtype}")
    return value


def all_finite(value: torch.Tensor) -> bool:
    """Is every entry of the floating ``value`` finite? A finite sum says so at once (a NaN or
    ±Inf entry makes any sum NaN or ±Inf), at a twentieth of the cost of testing each entry;
    only a sum that overflowed from finite entries is settled entry by entry."""
    return bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all())


def readable_name(gm: fx.GraphModule, hint: str) -> str:
    """A fresh top-level attribute name derived from ``hint`` (a module path or node name)."""
    base = re.sub(r"[^0-9a-zA-Z_]", "_", hint).strip("_") or "folded"
    if base[0].isdigit():
        base = f"_{base}"
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def add_constant(gm: fx.GraphModule, hint: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register ``value`` as a frozen parameter of ``gm`` and return a ``get_attr`` node for it."""
    require_commit(gm)
    name = readable_name(gm, hint)
    gm.register_parameter(name, _as_parameter(value))
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta[RANK_KEY] = value.dim()
    node.meta[FLOAT_KEY] = value.is_floating_point()
    return node


def set_slot(gm: fx.GraphModule, slot: Slot, value: torch.Tensor, hint: str) -> None:
    """Make the tensor at ``slot`` equal to ``value``.

    A module attribute is overwritten (the caller checked the module has one call site); a node
    argument that is a single-use ``get_attr`` keeps its attribute name; any other argument gets
    a fresh attribute named after ``hint``.
    """
    require_commit(gm)
    node = slot.node
    if slot.attr is not None:
        module = module_of(gm, node)
        old = getattr(module, slot.attr, None)
        if slot.attr in module._buffers:
            module._buffers[slot.attr] = _stored(value, old)
        else:
            setattr(module, slot.attr, _as_parameter(value, old))
        return
    current = node.args[slot.index] if slot.index is not None else node.kwargs.get(slot.kwarg)
    if (
        isinstance(current, fx.Node)
        and current.op == "get_attr"
        and len(current.users) == 1
        and _single_get_attr(gm, current)
    ):
        owner, name = owner_and_name(gm, current.target)
        old = getattr(owner, name)
        if name in owner._buffers:
            owner._buffers[name] = _stored(value, old)
        else:
            setattr(owner, name, _as_parameter(value, old))
        return
    new_node = add_constant(gm, hint, value, before=node)
    if slot.index is not None:
        args = list(node.args)
        args[slot.index] = new_node
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, slot.kwarg: new_node}


def clear_slot(gm: fx.GraphModule, slot: Slot) -> None:
    """Make the optional tensor at ``slot`` absent (``None``: a norm without γ or β)."""
    require_commit(gm)
    node = slot.node
    if slot.attr is not None:
        module = module_of(gm, node)
        if slot.attr in module._parameters:
            module._parameters[slot.attr] = None
        else:
            setattr(module, slot.attr, None)
    elif slot.index is not None and slot.index < len(node.args):
        node.args = (*node.args[: slot.index], None, *node.args[slot.index + 1 :])
    elif slot.kwarg is not None:
        node.kwargs = {**node.kwargs, slot.kwarg: None}


def _single_get_attr(gm: fx.GraphModule, node: fx.Node) -> bool:
    """No other ``get_attr`` node reads the same tensor."""
    value = fetch_attr(gm, node.target)
    return not any(
        other is not node and other.op == "get_attr" and fetch_attr(gm, other.target) is value
        for other in gm.graph.nodes
    )


def insert_affine(
    gm: fx.GraphModule,
    x: fx.Node,
    affine: ChannelAffine,
    axis: int | None,
    dtype: torch.dtype,
    before: fx.Node,
    hint: str,
) -> fx.Node:
    """Insert ``shift + x * scale`` (one ``addcmul``; a lone ``mul`` / ``add`` when the other
    half is trivial) broadcasting along ``axis``, and return its node. A scale equal on every
    channel is a Python number (``torch.add(shift, x, alpha=s)``, ``x * s``), never a stored
    per-channel tensor: composing ``x * 0.5 + bias`` must not turn a scalar multiply into a
    stored one."""
    shape = (-1,) if axis is None else (-1,) + (1,) * (-axis - 1)
    scale = affine.scale.reshape(shape).to(dtype)
    shift = affine.shift.reshape(shape).to(dtype)
    need_scale = not bool(torch.all(affine.scale == 1))
    need_shift = affine.has_shift()
    uniform = need_scale and bool(torch.all(scale == scale.reshape(-1)[0]))
    with gm.graph.inserting_before(before):
        if uniform:
            number = scale.reshape(-1)[0].item()
            if need_shift:
                t = add_constant(gm, f"{hint}_shift", shift, before)
                out = gm.graph.call_function(torch.add, (t, x), {"alpha": number})
            else:
                out = gm.graph.call_function(torch.mul, (x, number))
        elif need_scale and need_shift:
            s = add_constant(gm, f"{hint}_scale", scale, before)
            t = add_constant(gm, f"{hint}_shift", shift, before)
            out = gm.graph.call_function(torch.addcmul, (t, x, s))
        elif need_scale:
            s = add_constant(gm, f"{hint}_scale", scale, before)
            out = gm.graph.call_function(torch.mul, (x, s))
        elif need_shift:
            t = add_constant(gm, f"{hint}_shift", shift, before)
            out = gm.graph.call_function(torch.add, (x, t))
        else:
            return x
    out.meta.update({k: v for k, v in before.meta.items() if k != "tensor_meta"})
    if "tensor_meta" in x.meta:
        out.meta["tensor_meta"] = x.meta["tensor_meta"]
    out.meta[RANK_KEY] = x.meta.get(RANK_KEY)
    out.meta[FLOAT_KEY] = True
    return out


def hint_for(node: fx.Node) -> str:
    return where(node).replace(":", "_")


def replace_node(old: fx.Node, new: fx.Node) -> None:
    """Route every use of ``old`` to ``new`` and erase ``old`` with its dead constant inputs."""
    require_commit(old.graph.owning_module)
    old.replace_all_uses_with(new)
    erase_dead(old)


def replace_join(join: fx.Node, new: fx.Node, region: list[fx.Node]) -> None:
    """Replace ``join`` by ``new`` and erase the ``region`` ops it made dead.

    Shape-only readers of region ops (``torch._assert(y.ndim == 4)``) read ``new`` instead,
    since every region op has the join's shape; ``new`` (with the attributes it reads) moves
    before the earliest region op so that it is defined before them.
    """
    require_commit(join.graph.owning_module)
    readers = [(node, user) for node in region for user in shape_users(node)]
    if readers:
        order = {n: i for i, n in enumerate(join.graph.nodes)}
        earliest = min(region, key=order.__getitem__)
        for constant in [n for n in new.all_input_nodes if n.op == "get_attr"]:
            earliest.prepend(constant)
        earliest.prepend(new)
        for node, user in readers:
            user.replace_input_with(node, new)
    replace_node(join, new)


def erase_dead(node: fx.Node) -> None:
    """Erase ``node`` if unused, then any of its inputs left unused that are pure (constant
    expressions, ``get_attr``, recognised ops). Placeholders and the output are kept."""
    graph = node.graph
    stack = [node]
    while stack:
        n = stack.pop()
        if n._erased or n.users or n.op in ("placeholder", "output") or n.graph is not graph:
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        stack.extend(inputs)


def delete_unused_attributes(gm: fx.GraphModule) -> None:
    """Drop unused ``get_attr`` nodes (a forward that fetched a tensor it never used), then the
    parameters / buffers / submodules that no node reads any more."""
    _erase_unused_get_attrs(gm)
    whole = _modules_run_whole(gm)
    _delete_unused_submodules(gm, whole)
    used_ids = _used_tensor_ids(gm, whole)
    for path, module in list(gm.named_modules()):
        if path in whole:
            continue
        _delete_unused_tensors(module._parameters, used_ids)
        _delete_unused_tensors(module._buffers, used_ids)


def _erase_unused_get_attrs(gm: fx.GraphModule) -> None:
    """Erase the ``get_attr`` nodes nothing uses."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)


def _modules_run_whole(gm: fx.GraphModule) -> set[str]:
    """Paths of the modules the graph runs whole: called ones, and ones it fetches
    (``repfx.capture.frontend``)."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    fetched = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    return called | {path for path in fetched if isinstance(fetch_attr(gm, path), nn.Module)}


def _used_tensor_ids(gm: fx.GraphModule, whole: set[str]) -> set[int]:
    """``id``s of the tensors the graph reads: fetched by a ``get_attr`` node, or held by a
    module at ``whole`` (its parameters and buffers, its submodules' included)."""
    used_ids = {id(fetch_attr(gm, n.target)) for n in gm.graph.nodes if n.op == "get_attr"}
    for path in whole:
        m = gm.get_submodule(path)
        used_ids.update(id(t) for t in [*m.parameters(), *m.buffers()])
    return used_ids


def _delete_unused_tensors(tensors: dict[str, torch.Tensor | None], used_ids: set[int]) -> None:
    """Delete from a module's ``_parameters`` / ``_buffers`` the tensors not in ``used_ids``."""
    for name, tensor in list(tensors.items()):
        if tensor is not None and id(tensor) not in used_ids:
            del tensors[name]


def _delete_unused_submodules(gm: fx.GraphModule, whole: set[str]) -> None:
    """As ``GraphModule.delete_all_unused_submodules``, keeping every submodule of the
    modules at ``whole`` (a module the graph fetches runs its children too)."""
    used = {""}
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            parts = node.target.split(".")
            used.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    for path, _ in list(gm.named_modules()):
        if not path or path in used or any(path.startswith(f"{w}.") for w in whole):
            continue
        if "." in path and path.rsplit(".", 1)[0] not in used:
            continue  # deleted with its parent
        gm.delete_submodule(path)


_CONV_MODULES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def new_conv(kernel: ConvKernel, dtype: torch.dtype, padding_mode: str = "zeros") -> nn.Module:
    """A frozen ``nn.ConvNd`` holding ``kernel`` (an ``nn.Linear`` when it has no spatial dims)."""
    dims = len(kernel.kernel_size)
    if dims == 0:
        module = nn.Linear(kernel.in_channels, kernel.out_channels, dtype=dtype)
    else:
        module = _CONV_MODULES[dims](
            kernel.in_channels,
            kernel.out_channels,
            kernel.kernel_size,
            stride=kernel.stride,
            padding=kernel.padding,
            dilation=kernel.dilation,
            groups=kernel.groups,
            bias=True,
            padding_mode=padding_mode,
            dtype=dtype,
        )
    module.weight = _as_parameter(kernel.weight.to(dtype))
    module.bias = _as_parameter(kernel.bias.to(dtype))
    return module
