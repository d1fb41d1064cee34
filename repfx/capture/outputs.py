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
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import torch.utils._pytree as pytree
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo

from ..errors import CaptureError


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
