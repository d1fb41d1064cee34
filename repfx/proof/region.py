"""The region a rewrite must preserve: the ops between the values it keeps and the inputs the
pass names (step 1 of the proof in :mod:`.validate`).

Walking back from the ``outputs`` to the ``stops``, every node met is one of:

* a **stop** (an input the pass named), or an **operand** the region reads from outside — a
  graph input, a non-tensor attribute — which the probes feed;
* a **constant** (module attributes and expressions of them only), taken with its value;
* an **op** of the region, whose inputs are walked in turn;
* a **shape source**: a value the region reads only the shape of (a crop bound
  ``x.shape[1]``) and does not compute itself. It is an operand too: its shape, not the ops
  that computed it, is what the region depends on, and walking through them would pull in the
  model up to that point.

A node the capture marked as written in place cannot be part of a proof, nor a module whose
tensors the forward writes through another node: the proof would hold for their values now.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..ir.graph import MUTATED_KEY, ConstantFolder, fetch_attr, reads_only_shape

MAX_REGION_NODES = 400  # a region this large means a pass named the wrong inputs


class ValidationFailure(Exception):
    """The old region cannot be evaluated (no probe runs it): the rewrite cannot be proven."""


@dataclass
class Region:
    """Ops between ``inputs`` / ``operands`` and ``outputs``, in topological order."""

    outputs: list[fx.Node]
    inputs: list[fx.Node]  # declared by the pass, or values the region reads from outside
    ops: list[fx.Node]  # computed nodes (including constant expressions), inputs first
    constants: dict[fx.Node, torch.Tensor] = field(default_factory=dict)


def reads_module_state(gm: fx.GraphModule, region: Region) -> bool:
    """Does ``region`` read a parameter, a buffer or another constant of the model? Its proof
    then holds for the values they have now — an identity batch norm, a zero bias — and only a
    fold of the model with those values re-drawn (``repfx.proof.redraw``) tests the rewrite on
    others. A region of parameter-free ops is proven on random values of everything it reads."""
    if region.constants:
        return True
    return any(
        node.op == "call_module" and _holds_tensors(fetch_attr(gm, node.target))
        for node in region.ops
    )


def _holds_tensors(module: nn.Module) -> bool:
    return next(itertools.chain(module.parameters(), module.buffers()), None) is not None


def collect_region(
    outputs: Sequence[fx.Node], stops: Iterable[fx.Node], consts: ConstantFolder
) -> Region:
    """Walk back from ``outputs`` to ``stops``; everything in between is the region."""
    return _Walk(list(dict.fromkeys(stops)), consts).run(list(outputs))


class _Walk:
    def __init__(self, stops: list[fx.Node], consts: ConstantFolder):
        self.stops, self.consts = set(stops), consts
        self.region = Region([], list(stops), [])
        self.seen: set[fx.Node] = set()
        self.shape_sources: list[fx.Node] = []

    def run(self, outputs: list[fx.Node]) -> Region:
        self.region.outputs = outputs
        stack: list[tuple[fx.Node, bool]] = [(o, False) for o in reversed(outputs)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                self.region.ops.append(node)
            elif node not in self.seen and self._is_op(node):
                stack.append((node, True))
                stack.extend((n, False) for n in reversed(self._walked_inputs(node)))
        sources = dict.fromkeys(self.shape_sources)
        self.region.inputs += [n for n in sources if n not in self.seen and n not in self.stops]
        return self.region

    def _is_op(self, node: fx.Node) -> bool:
        """Record ``node`` as a stop, operand or constant (``False``) or as an op (``True``)."""
        self.seen.add(node)
        if node.meta.get(MUTATED_KEY):
            raise ValidationFailure(f"{node.name} is mutated in place")
        if node in self.stops:
            return False
        if node.op == "call_module":
            self._refuse_written_state(node)
        value = self.consts.value(node) if node.op != "placeholder" else None
        if value is not None:
            self.region.constants[node] = value
            return False
        if node.op in ("placeholder", "output") or (
            node.op == "get_attr" and not isinstance(self._attribute(node), nn.Module)
        ):
            self.region.inputs.append(node)  # an operand: a graph input, a non-tensor attribute
            return False
        if len(self.seen) > MAX_REGION_NODES:
            raise ValidationFailure(f"region exceeds {MAX_REGION_NODES} nodes")
        return True

    def _refuse_written_state(self, node: fx.Node) -> None:
        """A module whose tensors the forward writes elsewhere (``self.bn.running_mean[:2] +=
        1`` before ``self.bn(x)``) would be proven, and folded, with the values they hold now."""
        module = fetch_attr(self.consts.gm, node.target)
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor is not None and self.consts.written(tensor):
                raise ValidationFailure(
                    f"{node.target}.{name} is written in place by the forward, before or "
                    f"after {node.target} reads it"
                )

    def _attribute(self, node: fx.Node) -> object:
        return fetch_attr(self.consts.gm, node.target)

    def _walked_inputs(self, node: fx.Node) -> list[fx.Node]:
        """``node``'s inputs to walk; those it reads only the shape of are set aside."""
        walked = []
        for n in node.all_input_nodes:
            if self._only_shape_read(node, n):
                self.shape_sources.append(n)
            else:
                walked.append(n)
        return walked

    def _only_shape_read(self, node: fx.Node, source: fx.Node) -> bool:
        return (
            reads_only_shape(node, source)
            and source.op != "placeholder"
            and self.consts.value(source) is None
        )
