"""The traced graph returns what the model returns: the container types of its output.

``torch.fx`` rebuilds a traced output's containers from their base types: a ``ModelOutput``
(HuggingFace transformers) or an ``OrderedDict`` (torchvision segmentation) comes back as a
plain ``dict``, which breaks ``out.logits`` and ``isinstance`` checks in the caller's code.
Where the output holds such a container, the traced function returns the output's pytree
leaves instead, and the graph's code generator rebuilds the original containers from them
(``torch.utils._pytree.tree_unflatten`` with the output's ``TreeSpec``) on every call. The
graph itself then ends in a flat list of tensors, which every pass and proof handles as any
other multi-output graph.

Containers ``torch.fx`` keeps as they are (plain tuples, lists, dicts and named tuples) are
left alone, so the graphs of most models do not change.

An object ``torch.utils._pytree`` does not know at all (a HuggingFace ``DynamicCache`` of keys
and values) stops ``torch.export``. :func:`objects_opened` has the model return each such
object as an :class:`OpenedObject` while it is captured: the tensors it holds become output
leaves, and the rest of it is kept as a skeleton in the output's ``TreeSpec``. Rebuilding the
output then makes an object of the original type again, a copy of the skeleton with the call's
tensors in the places of the example's.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections import namedtuple
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo

from ..errors import CaptureError
from ..proof.tolerances import comparable, output_tensors


class RestoreOutputContainers(_PyTreeCodeGen):
    """Code generation for a graph whose output node holds the flat leaves of an output of
    structure ``spec``: the generated ``forward`` keeps the graph's own signature (unlike
    ``torch.fx``'s pytree code generation, which also flattens the inputs) and returns
    ``tree_unflatten(leaves, spec)``."""

    def __init__(self, spec: pytree.TreeSpec) -> None:
        super().__init__(_PyTreeInfo([], None, spec))

    def process_inputs(self, *inputs: Any) -> Any:
        return CodeGen.process_inputs(self, *inputs)

    def gen_fn_def(
        self, free_vars: list[str], maybe_return_annotation: str, *, expanded_def: bool = False
    ) -> str:
        return CodeGen.gen_fn_def(
            self, free_vars, maybe_return_annotation, expanded_def=expanded_def
        )


def flat_output(value: Any) -> tuple[list[Any], pytree.TreeSpec] | None:
    """The leaves and structure of a traced output that holds a container ``torch.fx`` would
    not record as it is (see :func:`_kept_by_fx`); ``None`` where it would.

    Raises ``CaptureError`` for a subclass of ``dict``, ``list`` or ``tuple`` that is not a
    registered pytree node: its type cannot be rebuilt (nor can ``torch.export`` capture it)."""
    leaves, spec = pytree.tree_flatten(value)
    for leaf in leaves:
        if isinstance(leaf, (dict, list, tuple)):
            raise CaptureError(
                f"the model returns a {type(leaf).__qualname__}, a container type torch.fx "
                "cannot rebuild: register it with torch.utils._pytree.register_pytree_node"
            )
    return None if _kept_by_fx(spec) else (leaves, spec)


def _kept_by_fx(spec: pytree.TreeSpec) -> bool:
    """Whether ``torch.fx`` records an output of structure ``spec`` with its container types as
    they are: plain tuples, lists and dicts, named tuples, and leaves. Anything else (a
    ``ModelOutput``, an ``OrderedDict``, a registered dataclass) comes back as a plain ``dict``
    or not at all."""
    if spec.is_leaf():
        return True
    kind = spec.type
    named = kind is namedtuple or (isinstance(kind, type) and hasattr(kind, "_fields"))
    return (kind in (tuple, list, dict) or named) and all(map(_kept_by_fx, spec.children()))


# ------------------------------------------------------------------ objects pytree does not know


class OpenedObject:
    """An output object ``torch.utils._pytree`` does not know, as a pytree node: its tensors
    are the children, its :class:`Skeleton` the context. Unflattening it gives an object of the
    original type, not an ``OpenedObject``."""

    def __init__(self, tensors: list[torch.Tensor], skeleton: Skeleton) -> None:
        self.tensors, self.skeleton = tensors, skeleton


class _Slot:
    """Where the skeleton held a tensor."""


@dataclass(frozen=True, eq=False)
class Skeleton:
    """A copy of an object with each tensor it holds replaced by a :class:`_Slot`."""

    value: Any
    slots: tuple[_Slot, ...]

    def rebuilt(self, tensors: list[torch.Tensor]) -> Any:
        """A copy of the object with ``tensors`` in its slots, in order (what else the object
        holds is copied too)."""
        return copy.deepcopy(self.value, dict(zip(map(id, self.slots), tensors, strict=True)))


pytree.register_pytree_node(
    OpenedObject,
    lambda opened: (opened.tensors, opened.skeleton),
    lambda tensors, skeleton: skeleton.rebuilt(list(tensors)),
    serialized_type_name="repfx.capture.outputs.OpenedObject",
)


@contextlib.contextmanager
def objects_opened(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model`` (repfx's own copy) returns each object of its output that
    ``torch.utils._pytree`` does not know as an :class:`OpenedObject`."""
    own = vars(model).get("forward")
    forward = model.forward

    @functools.wraps(forward)
    def opened_forward(*args: Any, **kwargs: Any) -> Any:
        return pytree.tree_map(_opened, forward(*args, **kwargs))

    model.forward = opened_forward
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


def _opened(leaf: Any) -> Any:
    state = comparable(leaf)
    if not isinstance(state, dict):  # a tensor, a number, a module: left as it is
        return leaf
    held = pytree.tree_leaves(state)
    _check_openable(type(leaf).__qualname__, held)
    tensors = list({id(t): t for t in held if isinstance(t, torch.Tensor)}.values())
    slots = tuple(_Slot() for _ in tensors)
    skeleton = Skeleton(copy.deepcopy(leaf, dict(zip(map(id, tensors), slots, strict=True))), slots)
    if output_tensors(skeleton.value):
        raise CaptureError(
            f"the model returns a {type(leaf).__qualname__} holding tensors too deep inside it "
            "to capture: return its tensors in a tuple, a dict or a registered pytree node"
        )
    return OpenedObject(tensors, skeleton)


def _check_openable(what: str, held: list[Any]) -> None:
    """Refuse an object that a copy of its skeleton cannot stand for: one holding a module,
    or a size of the inputs stored as a number."""
    if any(isinstance(v, nn.Module) for v in held):
        raise CaptureError(
            f"the model returns a {what} that holds a module, which every call of the captured "
            "graph would copy: return the module's tensors instead"
        )
    if any(isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)) for v in held):
        raise CaptureError(
            f"the model returns a {what} that stores a size of its inputs as a number, which "
            "the captured graph would fix to the example's"
        )
